"""`hangkit report`: the bundle of what users send when a hang persists (hangkit/bundle/).

One real run of `python -m hangkit.bundle` in a fake PBS job (module fixture `made`) is read by
several tests; the rest call the pure parts, or collect() with a short child deadline."""

from __future__ import annotations

import argparse
import gzip
import importlib.metadata
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tarfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from conftest import TAG_VARIABLE, tagged_processes

import hangkit
from hangkit.bundle import (
    add_arguments,
    collect,
    gather,
    job_config,
    main,
    redact_member,
    secret_values,
    tail_lines,
)
from hangkit.redact import REDACTED, redact_text

SECRETS = {"WANDB_API_KEY": "wandb-7f3a9c1e5b2d", "MY_SECRET_TOKEN": "tok-Q8v2LmZr4xNp",
           "DB_PASSWORD": "pw-Hx93kTq0saVv"}
# Only in the log, never in the environment: only the NAME=value rule can hide it.
LOG_ONLY_SECRET = "xyz-LogOnly-55219Qa"
JOBID = "8812345.polaris-pbs-01.hsn.cm.polaris.alcf.anl.gov"
HOSTS = ["x3005c0s13b0n0.hsn.cm.polaris.alcf.anl.gov", "x3005c0s13b1n0.hsn.cm.polaris.alcf.anl.gov",
         "x3005c0s19b0n0.hsn.cm.polaris.alcf.anl.gov"]
MEMBERS = {"job.json", "versions.json", "environment.json", "doctor.json",
           "hang-report/hang-report.json", "hang-report/hang-report.md", "output-tail.txt",
           "README.txt"}


def log_line(i: int) -> tuple[str, str]:
    """Line i (1-based) of the fake job output, and what it must become in the bundle."""
    secret_lines = {
        5: ("WANDB_API_KEY=" + SECRETS["WANDB_API_KEY"], "WANDB_API_KEY=" + REDACTED),
        160: ("WANDB_API_KEY=" + SECRETS["WANDB_API_KEY"], "WANDB_API_KEY=" + REDACTED),
        170: ("export MY_SECRET_TOKEN=" + SECRETS["MY_SECRET_TOKEN"],
              "export MY_SECRET_TOKEN=" + REDACTED),
        180: ("DB_PASSWORD: " + SECRETS["DB_PASSWORD"], "DB_PASSWORD: " + REDACTED),
        190: ("export MY_TOKEN=" + LOG_ONLY_SECRET, "export MY_TOKEN=" + REDACTED),
        195: ("wandb login --relogin " + SECRETS["WANDB_API_KEY"],
              "wandb login --relogin " + REDACTED),
    }
    if i in secret_lines:
        return secret_lines[i]
    text = f"rank 0: step {i:03d} loss {1.0 / i:.4f} KeyError: 'lr' tokens/s 1{i}"
    return text, text


DOCTOR = {"probes": [{"name": "environment", "rank": None, "status": "ok", "seconds": 0.1,
                      "detail": "PYTHONUNBUFFERED=1", "advice": None, "data": {}}],
          "ranks": None, "timeout": 30.0, "seconds": 0.4, "host": "x3005c0s13b0n0",
          "finished_at": "2025-01-01T00:00:00+0000", "exit_code": 0}
HANG = {"hang": True, "reason": "no output for 10 s", "ranks": [{"key": "rank 0", "step": 7}],
        "last_lines": ["rank 0: step 7"], "context": {"pbs_jobid": JOBID}}


def _clean_environ() -> dict[str, str]:
    """This environment without anything a scheduler or launcher set: the test sets its own."""
    drop = ("PBS_", "PALS_", "PMI_", "NRANKS", "PPN", "NTOTRANKS", "RANKS_PER_NODE",
            "MPI_LOCALNRANKS", "LOCAL_WORLD_SIZE", "WORLD_SIZE")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


@dataclass
class Made:
    returncode: int
    stdout: str
    stderr: str
    archive: Path
    infos: list[tarfile.TarInfo]
    members: dict[str, bytes]  # name under the archive's directory -> bytes
    inputs: Path


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Made:
    """`python -m hangkit.bundle` with every input, in a fake 3-node PBS job, umask 0."""
    tmp = tmp_path_factory.mktemp("bundle")
    nodefile = tmp / "nodefile"
    nodefile.write_text("".join(h + "\n" for h in HOSTS))
    log = tmp / "job.o8812345"
    log.write_text("".join(log_line(i)[0] + "\n" for i in range(1, 201)))
    (tmp / "hangkit-doctor.json").write_text(json.dumps(DOCTOR, indent=2) + "\n")
    report = tmp / "hangkit-report"
    report.mkdir()
    (report / "hang-report.json").write_text(json.dumps(HANG, indent=2) + "\n")
    (report / "hang-report.md").write_text("# hangkit hang report\n\n- **Reason:** no output\n")
    (tmp / "out").mkdir()
    tag = uuid.uuid4().hex
    env = {**_clean_environ(), **SECRETS, "PBS_JOBID": JOBID, "PBS_NODEFILE": str(nodefile),
           "PBS_O_WORKDIR": str(tmp), "PBS_QUEUE": "debug", "PPN": "4", "NRANKS": "12",
           "SHORT_KEY": "k9z", TAG_VARIABLE: tag}
    argv = [sys.executable, "-m", "hangkit.bundle", "--out", str(tmp / "out" / "b.tar.gz"),
            "--doctor-json", str(tmp / "hangkit-doctor.json"), "--hang-report", str(report),
            "--log", str(log), "--lines", "50"]
    done = subprocess.run(argv, cwd=tmp, env=env, capture_output=True, text=True, timeout=150,
                          umask=0)
    left = tagged_processes(tag)
    for proc in left:
        proc.kill()
    assert not left, f"processes left behind: {[p.pid for p in left]}"
    archive = tmp / "out" / "b.tar.gz"
    infos, members = [], {}
    if archive.exists():
        with tarfile.open(archive) as tar:
            infos = tar.getmembers()
            for info in infos:
                if info.isfile():
                    members[info.name.split("/", 1)[1]] = tar.extractfile(info).read()
    return Made(done.returncode, done.stdout, done.stderr, archive, infos, members, tmp)


@pytest.mark.timeout(200)
def test_writes_the_archive_and_says_what_it_holds(made):
    assert made.returncode == 0, made.stderr
    lines = made.stdout.splitlines()
    assert lines[0] == str(made.archive), made.stdout
    assert len(lines) == 2, made.stdout
    assert lines[1].startswith("holds job.json (3 nodes), versions.json, environment.json ("), \
        lines[1]
    assert "output-tail.txt (50 lines)" in lines[1] and lines[1].endswith("missing: nothing")
    assert set(made.members) == MEMBERS


@pytest.mark.timeout(200)
def test_archive_and_members_are_private_even_with_umask_0(made):
    assert made.archive.exists(), made.stderr
    assert made.archive.stat().st_mode & 0o777 == 0o600
    assert {i.name.split("/")[0] for i in made.infos} == {"b"}  # one directory, named like it
    assert all(i.mode == 0o600 for i in made.infos if i.isfile())
    assert not [p for p in made.archive.parent.iterdir() if p.name != "b.tar.gz"]  # no temp file


@pytest.mark.timeout(200)
def test_no_secret_value_survives_anywhere(made):
    assert set(made.members) == MEMBERS, made.stderr
    whole = gzip.decompress(made.archive.read_bytes())
    for value in [*SECRETS.values(), LOG_ONLY_SECRET]:
        for name, data in made.members.items():
            assert data.find(value.encode()) == -1, f"{value} in {name}"
        assert whole.find(value.encode()) == -1, f"{value} in the archive"
    # What is not secret is kept: the job's id, the names of the hidden variables.
    for name in ("job.json", "environment.json"):
        assert JOBID.encode() in made.members[name], name
    env = json.loads(made.members["environment.json"])
    assert env["PBS_JOBID"] == JOBID and env["PBS_QUEUE"] == "debug"
    assert {env[k] for k in SECRETS} == {REDACTED}
    assert env["SHORT_KEY"] == REDACTED  # too short to scrub as a literal: hidden by its name


@pytest.mark.timeout(200)
def test_output_tail_is_exactly_the_last_50_lines(made):
    tail = made.members["output-tail.txt"].decode()
    assert tail == "".join(log_line(i)[1] + "\n" for i in range(151, 201))
    assert "the last 50 lines of " + str(made.inputs / "job.o8812345") in \
        made.members["README.txt"].decode()


@pytest.mark.timeout(200)
def test_job_config_from_the_pbs_job(made):
    job = json.loads(made.members["job.json"])
    assert job["nodes"] == HOSTS and job["node_count"] == 3
    assert job["pbs_jobid"] == JOBID and job["pbs"]["PBS_JOBID"] == JOBID
    assert job["pbs"]["PBS_NODEFILE"] == str(made.inputs / "nodefile")
    assert (job["ranks_per_node"], job["ranks_per_node_from"]) == (4, "PPN")
    assert (job["total_ranks"], job["total_ranks_from"]) == (12, "NRANKS")
    assert job["launch_variables"] == {"NRANKS": "12", "PPN": "4"}
    assert job["cwd"] == str(made.inputs) and job["host"]


@pytest.mark.timeout(200)
def test_versions(made):
    v = json.loads(made.members["versions.json"])
    assert v["python"] == platform.python_version()
    assert v["hangkit"] == hangkit.__version__
    assert v["psutil"] == psutil.__version__
    assert v["py-spy"] == importlib.metadata.version("py-spy")
    torch = v["torch_details"]
    if importlib.util.find_spec("torch") is None:
        assert torch["status"] == "not installed" and v["torch"] is None
    else:  # a loaded machine may take longer than the deadline to import torch
        assert torch["status"] in ("ok", "timeout"), torch
        if torch["status"] == "ok":
            assert torch["version"] == v["torch"] == importlib.metadata.version("torch")
            assert "cuda" in torch and "nccl" in torch
    mpi = v["mpi_details"]
    if importlib.util.find_spec("mpi4py") is not None:
        assert mpi["status"] in ("ok", "timeout"), mpi
        if mpi["status"] == "ok":
            assert mpi["mpi4py"] == importlib.metadata.version("mpi4py")
            assert v["mpi_library"] and v["mpi_library"] in mpi["library_version"]


@pytest.mark.timeout(200)
def test_doctor_results_and_hang_report_are_included_verbatim(made):
    inputs = made.inputs
    assert made.members["doctor.json"] == (inputs / "hangkit-doctor.json").read_bytes()
    for name in ("hang-report.json", "hang-report.md"):
        original = (inputs / "hangkit-report" / name).read_bytes()
        assert made.members["hang-report/" + name] == original
    readme = made.members["README.txt"].decode()
    assert str(inputs / "hangkit-doctor.json") in readme
    assert str(inputs / "hangkit-report") in readme
    assert readme.rstrip().endswith("Missing:\n  nothing")


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("text", "expected"), [
    ("WANDB_API_KEY=abc123", "WANDB_API_KEY=<redacted>"),
    ("export MY_TOKEN=xyz", "export MY_TOKEN=<redacted>"),
    ("  db_password: 'hunter2' # old", "  db_password: '<redacted>' # old"),
    ('{"api_key": "s3cr3t", "step": 3}', '{"api_key": "<redacted>", "step": 3}'),
    ("{'Secret': 'x y'}", "{'Secret': '<redacted>'}"),
    ("train.py --api-key abc --lr 1", "train.py --api-key <redacted> --lr 1"),
    ("train.py --token=abc --lr 1", "train.py --token=<redacted> --lr 1"),
    ("pip from https://me:pa55@pypi.example.org/simple", "pip from https://me:<redacted>@pypi.example.org/simple"),
    ("Authorization: Bearer eyJhbGciOiJIUzI1", "Authorization: Bearer <redacted>"),
    ("KeyError: 'lr'", "KeyError: 'lr'"),
    ("rank 3: step 7 loss 0.25", "rank 3: step 7 loss 0.25"),
    ("PBS_JOBID=123.pbs", "PBS_JOBID=123.pbs"),
])
def test_redact_text(text, expected):
    assert redact_text(text) == expected


@pytest.mark.timeout(30)
def test_json_members_keep_their_structure_and_hangkit_fields():
    report = {"ranks": [{"key": "rank 0"}], "last_lines": ["WANDB_API_KEY=abc123", "step 3"],
              "context": {"environment": {"HF_TOKEN": "hf_abcdef", "NCCL_DEBUG": "INFO"}}}
    raw = (json.dumps(report, indent=2) + "\n").encode()
    out = json.loads(redact_member("hang-report/hang-report.json", raw))
    assert out["ranks"] == [{"key": "rank 0"}]
    assert out["last_lines"] == [f"WANDB_API_KEY={REDACTED}", "step 3"]
    assert out["context"]["environment"] == {"HF_TOKEN": REDACTED, "NCCL_DEBUG": "INFO"}
    clean = json.dumps({"ranks": [{"key": "rank 0"}]}).encode()  # not re-serialized: verbatim
    assert redact_member("doctor.json", clean) is clean


@pytest.mark.timeout(30)
def test_secret_values_are_scrubbed_wherever_they_appear():
    secrets = secret_values({"WANDB_API_KEY": "wandb-7f3a9c1e5b2d", "KEY_DIR": "/home/me",
                             "KEYTIMEOUT": "1", "PATH": "/usr/bin"})
    assert secrets == ["wandb-7f3a9c1e5b2d"]  # no short values, no paths, no other variables
    line = b"python train.py --wandb wandb-7f3a9c1e5b2d in /home/me\n"  # no NAME=value to see
    assert redact_member("output-tail.txt", line, secrets) == \
        f"python train.py --wandb {REDACTED} in /home/me\n".encode()


@pytest.mark.timeout(30)
def test_tail_lines(tmp_path):
    path = tmp_path / "out"
    path.write_bytes(b"".join(b"%04d " % i + b"x" * 995 + b"\n" for i in range(1, 201)))
    lines, cut = tail_lines(path, 80)  # 80 kB: more than one block from the end
    assert [int(x[:4]) for x in lines] == list(range(121, 201)) and not cut
    assert all(len(x) == 1000 for x in lines)
    path.write_bytes(b"one\ntwo\nthree")  # no newline at the end: still a line
    assert tail_lines(path, 2) == ([b"two", b"three"], False)
    assert tail_lines(path, 50) == ([b"one", b"two", b"three"], False)
    path.write_bytes(b"")
    assert tail_lines(path, 5) == ([], False)
    path.write_bytes(b"a\n" + b"\r" * 300_000 + b"bar\nend\n")  # a progress bar's one long line
    lines, cut = tail_lines(path, 5, limit=100_000)
    assert cut and lines[-1] == b"end" and len(b"\n".join(lines)) <= 100_000


@pytest.mark.timeout(30)
def test_ranks_per_node_from_the_nodefile_or_a_total():
    def job(env, lines_per_host):
        j = job_config(env, list(lines_per_host), lines_per_host, cwd="/w", host="h", now=0.0)
        return j["ranks_per_node"], j["ranks_per_node_from"], j["total_ranks"]

    assert job({"PBS_JOBID": "1"}, {"a": 4, "b": 4}) == (4, "PBS_NODEFILE (lines per host)", 8)
    assert job({"PBS_JOBID": "1", "NRANKS": "8"}, {"a": 1, "b": 1}) == (4, "NRANKS / nodes", 8)
    assert job({"PBS_JOBID": "1", "NRANKS": "7"}, {"a": 1, "b": 1}) == (None, None, 7)
    assert job({"PBS_JOBID": "1", "NRANKS_PER_NODE": "2", "PPN": "9"}, {"a": 1}) == \
        (2, "NRANKS_PER_NODE", 2)
    assert job({}, {}) == (None, None, None)
    hidden = job_config({"PBS_JOBID": "1", "PBS_O_TOKEN": "abcdefgh", "PMI_SIZE": "4",
                         "PALS_RANKID": "0"}, [], {}, cwd="/w", host="h", now=0.0)
    assert hidden["pbs"]["PBS_O_TOKEN"] == REDACTED
    assert hidden["pmi"] == {"PMI_SIZE": "4"} and hidden["pals"] == {"PALS_RANKID": "0"}


@pytest.mark.timeout(60)
def test_defaults_are_the_newest_found_under_cwd(tmp_path):
    def write(path: Path, text: str, mtime: float) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        os.utime(path, (mtime, mtime))

    now = time.time()
    write(tmp_path / "hangkit-doctor-old.json", '{"which": "old"}\n', now - 100)
    write(tmp_path / "hangkit-doctor.json", '{"which": "new"}\n', now - 10)
    write(tmp_path / "other.json", '{"which": "not a doctor file"}\n', now)
    write(tmp_path / "a" / "hang-report.json", '{"which": "depth 1"}\n', now - 100)
    write(tmp_path / "b" / "c" / "hang-report.json", '{"which": "depth 2"}\n', now - 10)
    write(tmp_path / "b" / "c" / "hang-report.md", "# depth 2\n", now - 10)
    write(tmp_path / "d" / "e" / "f" / "hang-report.json", '{"which": "too deep"}\n', now)
    members = gather(cwd=tmp_path, environ=_clean_environ(), timeout=3.0)
    assert members["doctor.json"] == b'{"which": "new"}\n'
    assert members["hang-report/hang-report.json"] == b'{"which": "depth 2"}\n'
    assert members["hang-report/hang-report.md"] == b"# depth 2\n"


@pytest.mark.timeout(60)
def test_what_is_missing_is_said_in_the_readme(tmp_path):
    bundle = collect(cwd=tmp_path, environ=_clean_environ(), timeout=3.0)
    assert set(bundle.members) == {"job.json", "versions.json", "environment.json", "README.txt"}
    readme = bundle.members["README.txt"]
    missing = readme.split("Missing:\n", 1)[1]
    for member, hint in (("doctor.json", "hangkit doctor --json"),
                         ("hang-report/", "--hang-report DIR"),
                         ("output-tail.txt", "--log FILE")):
        assert any(line.lstrip().startswith(member) and hint in line
                   for line in missing.splitlines()), missing
    assert json.loads(bundle.members["job.json"])["in_pbs_job"] is False
    assert bundle.summary().endswith("missing: doctor.json, hang-report/, output-tail.txt")


@pytest.mark.timeout(60)
def test_a_log_that_never_answers_is_given_up_at_the_deadline(tmp_path):
    """A FIFO nobody writes blocks its reader in open(), as a stalled filesystem would."""
    fifo = tmp_path / "job.out"
    os.mkfifo(fifo)
    started = time.monotonic()
    try:
        bundle = collect(log=fifo, cwd=tmp_path, environ=_clean_environ(), timeout=1.0)
    finally:  # let the abandoned reader thread finish: its open() returns once a writer came
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    elapsed = time.monotonic() - started
    assert elapsed < 15, elapsed  # 1 s deadline, + killing and reaping the children
    assert "output-tail.txt" not in bundle.members
    (why,) = [why for member, why in bundle.missing if member == "output-tail.txt"]
    assert "did not finish within 1 s" in why and str(fifo) in why


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("argv", "named"), [
    (["--log", "{tmp}/nope.log"], "{tmp}/nope.log"),
    (["--log", "{tmp}"], "--log {tmp}"),
    (["--doctor-json", "{tmp}/nope.json"], "{tmp}/nope.json"),
    (["--lines", "0"], "--lines 0"),
    (["--lines", "-5"], "--lines -5"),
    (["--lines", "many"], "'many'"),
    (["--out", "{tmp}/missing/b.tar.gz"], "{tmp}/missing/b.tar.gz"),
    (["--hang-report", "{tmp}/nodir"], "{tmp}/nodir"),
    (["--hang-report", "{tmp}/empty"], "{tmp}/empty"),
    (["--no-such-option"], "--no-such-option"),
])
def test_bad_input_is_one_line_and_exit_2(argv, named, tmp_path, monkeypatch, capsys):
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path)
    code = main([a.format(tmp=tmp_path) for a in argv])
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    assert len(err.splitlines()) == 1 and err.startswith("hangkit: error: "), err
    assert named.format(tmp=tmp_path) in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]  # nothing written


@pytest.mark.timeout(30)
def test_add_arguments_gives_the_documented_defaults():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([])
    assert (args.out, args.doctor_json, args.hang_report, args.log, args.lines) == \
        (None, None, None, None, 50)
