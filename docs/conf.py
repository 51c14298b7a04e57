"""Sphinx configuration: the docs are Markdown (MyST); the CLI reference is generated from the
parser at build time, the API reference from docstrings. Built with warnings as errors."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

project = "hangkit"
author = "the hangkit developers"
extensions = ["myst_parser", "sphinx.ext.autodoc"]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build"]
myst_heading_anchors = 3
autodoc_member_order = "bysource"
autodoc_typehints = "description"
html_theme = "alabaster"
suppress_warnings = ["myst.xref_missing"]  # README-style links to files outside the docs


def setup(app):
    from cli_reference import write_cli_reference

    write_cli_reference(Path(app.srcdir) / "generated" / "cli.md")
