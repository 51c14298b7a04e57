"""Every command in the docs runs as written: each `$ ` line of a ```console block in docs/*.md,
in order, in one scratch directory per page (with the project's examples/), must exit 0, or
the code its trailing `# exit N` names."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
DOCS = ROOT / "docs"
BLOCK = re.compile(r"```console\n(.*?)```", re.DOTALL)
EXIT = re.compile(r"\s+#\s*exit (\d+)\s*$")


def commands(page: Path) -> list[tuple[str, int]]:
    found = []
    for block in BLOCK.findall(page.read_text()):
        for line in block.splitlines():
            if line.startswith("$ "):
                command, code = line[2:], 0
                if m := EXIT.search(command):
                    command, code = command[:m.start()], int(m.group(1))
                found.append((command, code))
    return found


PAGES = sorted(p for p in DOCS.glob("*.md") if commands(p))


def test_the_docs_have_commands_to_run():
    assert {p.name for p in PAGES} >= {"quickstart.md", "polaris.md"}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_command_on_the_page_runs(page, tmp_path):
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           "HOME": str(tmp_path)}
    env = {k: v for k, v in env.items() if not k.startswith("WANDB_")}
    for command, code in commands(page):
        done = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=180)
        assert done.returncode == code, (
            f"{page.name}: `{command}` exited {done.returncode}, not {code}\n"
            f"{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
        # Commands are shell lines as a user types them: they must also parse as such.
        assert shlex.split(command)
