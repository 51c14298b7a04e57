"""Writes the CLI reference from hangkit's own argparse parser, so it cannot drift."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def _subparsers(parser: argparse.ArgumentParser):
    for action in parser._actions:  # argparse keeps subcommands only here
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.items()


def write_cli_reference(path: Path) -> None:
    from hangkit.cli import build_parser

    os.environ["COLUMNS"] = "100"  # argparse wraps help at the terminal's width
    parser = build_parser()
    lines = ["# CLI reference", "",
             "Generated from `hangkit.cli.build_parser()` when the docs are built.", "",
             "```text", parser.format_help().rstrip(), "```", ""]
    for name, sub in _subparsers(parser):
        lines += [f"## hangkit {name}", "", "```text", sub.format_help().rstrip(), "```", ""]
        for inner_name, inner in _subparsers(sub):
            lines += [f"### hangkit {name} {inner_name}", "", "```text",
                      inner.format_help().rstrip(), "```", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
