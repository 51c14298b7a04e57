"""Report directories that are the user's: a directory (or a link) another user prepared at the
report's path is never written through; watch writes to a fresh private one and says where."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import program

from hangkit.bundle.archive import write_archive
from hangkit.files import NotYourDirectory, private_directory, writable_directory, write_atomic

HANG = 124
NOBODY = 65534
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="making another user's directory "
                             "(chown to uid 65534) needs root, as in CI")


def others_directory(path: Path, mode: int = 0o777) -> Path:
    path.mkdir()
    os.chown(path, NOBODY, NOBODY)
    os.chmod(path, mode)
    return path


def prepared(kind: str, tmp_path: Path) -> tuple[Path, Path | None]:
    """A shared directory (1777, like /tmp) holding `hangkit-demo-report` as `kind` left it;
    and the directory whose contents must stay as they are (None: the report belongs there)."""
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    path = shared / "hangkit-demo-report"
    if kind == "link to another user's 0777 directory":
        victim = others_directory(tmp_path / "victim")
        path.symlink_to(victim)
        os.lchown(path, NOBODY, NOBODY)
        return path, victim
    if kind == "another user's directory":
        return path, others_directory(path, 0o755)
    path.mkdir()
    os.chmod(path, 0o777 if kind == "our 0777 directory" else 0o700)
    return path, None if kind == "our 0700 directory" else path


def watch(report_dir: Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hangkit", "watch", "--timeout", "1", "--grace", "1",
         "--report-dir", str(report_dir), "--", *program("prints_secrets.py"),
         "--thread-name", "waiter"],
        capture_output=True, text=True, cwd=cwd, timeout=150,
        env={**os.environ, "HANGKIT_READY_DIR": str(cwd)})


@pytest.mark.timeout(200)
@pytest.mark.parametrize("kind", [
    pytest.param("link to another user's 0777 directory", marks=as_root),
    pytest.param("another user's directory", marks=as_root),
    "our 0777 directory",
])
def test_a_report_directory_someone_else_could_change_is_not_used(kind, tmp_path):
    path, untouched = prepared(kind, tmp_path)
    before = sorted(os.listdir(untouched))
    done = watch(path, tmp_path)
    assert done.returncode == HANG, done.stderr[-3000:]
    assert sorted(os.listdir(untouched)) == before  # nothing written through it
    (line,) = [x for x in done.stderr.splitlines() if "not using" in x]
    assert f"not using {path}:" in line, line
    fresh = Path(line.rsplit("writing it to ", 1)[1].removesuffix(" instead"))
    assert fresh.parent == path.parent and fresh != path  # beside it
    st = fresh.lstat()
    assert stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid()
    assert stat.S_IMODE(st.st_mode) == 0o700
    assert (fresh / "hang-report.json").is_file()
    assert str(fresh / "hang-report.md") in done.stderr.splitlines()[-1]
    if path.is_symlink():
        assert Path(os.readlink(path)) == untouched  # the link itself left alone


@pytest.mark.timeout(200)
def test_our_own_private_directory_is_used(tmp_path):
    path, _ = prepared("our 0700 directory", tmp_path)
    done = watch(path, tmp_path)
    assert done.returncode == HANG, done.stderr[-3000:]
    assert "not using" not in done.stderr
    assert (path / "hang-report.json").is_file()
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no other made


@pytest.mark.timeout(30)
def test_private_directory_rules(tmp_path):
    new = private_directory(tmp_path / "a" / "new")
    assert stat.S_IMODE(new.stat().st_mode) == 0o700
    assert private_directory(new) == new  # ours and private: used again
    mine = tmp_path / "readable"
    mine.mkdir()
    os.chmod(mine, 0o755)
    assert private_directory(mine) == mine  # others may read, not write: used, left as it is
    assert stat.S_IMODE(mine.stat().st_mode) == 0o755
    for mode in (0o777, 0o770, 0o722):
        os.chmod(mine, mode)
        with pytest.raises(NotYourDirectory, match="writable by group or others"):
            private_directory(mine)
    link = tmp_path / "link"
    link.symlink_to(new)  # even to a directory of ours: a link is not followed
    with pytest.raises(NotYourDirectory, match="symbolic link"):
        private_directory(link)
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotYourDirectory, match="not a directory"):
        private_directory(tmp_path / "file")
    assert issubclass(NotYourDirectory, PermissionError)  # callers' `except OSError` still hold


@as_root
@pytest.mark.timeout(30)
def test_another_users_directory_is_refused(tmp_path):
    theirs = others_directory(tmp_path / "theirs", 0o700)
    with pytest.raises(NotYourDirectory, match=f"uid {NOBODY}"):
        private_directory(theirs)
    assert os.listdir(theirs) == []


@pytest.mark.timeout(30)
def test_a_link_at_a_files_name_is_replaced_not_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("theirs")
    planted = tmp_path / "hangkit-report-host-1.tar.gz"
    planted.symlink_to(victim)
    write_atomic(planted, "ours", mode=0o600)
    assert not planted.is_symlink() and planted.read_text() == "ours"
    assert victim.read_text() == "theirs"
    assert stat.S_IMODE(planted.stat().st_mode) == 0o600


@pytest.mark.timeout(30)
def test_the_bundle_is_not_written_where_anyone_can_write(tmp_path):
    open_to_all = tmp_path / "open"
    open_to_all.mkdir()
    os.chmod(open_to_all, 0o777)
    with pytest.raises(NotYourDirectory, match="anyone can write"):
        write_archive({"a.txt": "x"}, open_to_all / "b.tar.gz")
    assert os.listdir(open_to_all) == []
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)  # like /tmp: others cannot replace what is ours there
    assert writable_directory(sticky) == sticky
    write_archive({"a.txt": "x"}, sticky / "b.tar.gz")
    done = subprocess.run([sys.executable, "-m", "hangkit", "report", "--out", str(open_to_all)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert done.returncode == 1, done.stderr
    assert f"{open_to_all}:" in done.stderr and "anyone can write" in done.stderr
    assert os.listdir(open_to_all) == []
