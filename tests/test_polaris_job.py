"""`hangkit polaris job`: the PBS job script it writes, its usage errors, submitting it, and the
script's body run for real.

PBS's qsub and Polaris's PALS mpiexec cannot run here. qsub is faked by
tests/programs/polaris/fake_qsub.py, which records exactly what it was asked; PALS is replaced
by MPICH's hydra through the script's own HANGKIT_MPIEXEC / HANGKIT_MPIEXEC_FLAGS, with a
PBS_NODEFILE of two `localhost` lines standing in for two nodes."""

from __future__ import annotations

import itertools
import json
import os
import shlex
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import PROGRAMS, mpiexec

from hangkit.envsetup import AF_UNIX_PATH_MAX, af_unix_path_length, hang_safe_environment
from hangkit.polaris import jobscript
from hangkit.polaris.jobscript import JobOptions, main, render
from hangkit.probes.environment import NCCL_HANG_SETTINGS

POLARIS = PROGRAMS / "polaris"
ACCOUNT = ["--account", "MyProj"]
COMMAND = ["--", "python", "train.py"]
# Words a shell would split, expand, glob or end a command at, if the script did not quote them.
ODD_WORDS = ["my run", "it's \"quoted\"", "$HOME", "a;b", "*", "", "tab\there", "two\nlines"]


def command_words(script: str) -> list[str]:
    """The training command's words as bash parses them from the script's last lines."""
    tail = script.split("hangkit rank -- \\\n", 1)[1]
    done = subprocess.run(["bash", "-c", "printf '%s\\0' " + tail], capture_output=True,
                          text=True, timeout=30, cwd=PROGRAMS)  # a `*` would glob here
    assert done.returncode == 0, done.stderr
    return done.stdout.split("\0")[:-1]


def one_line_error(err: str) -> str:
    assert err.startswith("hangkit: error: "), err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.timeout(30)
def test_script_has_each_directive_quotes_the_command_and_is_valid_bash(tmp_path, capsys):
    out = tmp_path / "run_polaris.sh"
    assert main([*ACCOUNT, "--nodes", "3", "--walltime", "2:30:00", "--queue", "prod",
                 "--filesystems", "home:eagle:grand", "--ppn", "2", "--depth", "16",
                 "--hang-timeout", "900", "--conda-module", "conda/2024-04-29",
                 "--out", str(out), "--", "python", "train.py", *ODD_WORDS]) == 0
    assert f"wrote {out}" in capsys.readouterr().err
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    text = out.read_text()
    lines = text.splitlines()
    assert lines[0] == "#!/bin/bash -l"
    # PBS reads directives only up to the first command line, so all must come before it.
    header = list(itertools.takewhile(lambda line: line.startswith("#"), lines[1:]))
    assert [line for line in header if line.startswith("#PBS")] == [
        "#PBS -l select=3:system=polaris",
        "#PBS -l place=scatter",
        "#PBS -l walltime=02:30:00",
        "#PBS -l filesystems=home:eagle:grand",
        "#PBS -q prod",
        "#PBS -A MyProj",
        "#PBS -j oe",
    ]
    syntax = subprocess.run(["bash", "-n", str(out)], capture_output=True, text=True,
                            timeout=30)
    assert syntax.returncode == 0, syntax.stderr
    for line in ["set -euo pipefail",
                 'cd "${PBS_O_WORKDIR}"',
                 'MASTER_ADDR="$(head -n 1 "${PBS_NODEFILE}")"',
                 "    module use /soft/modulefiles",
                 "    module load conda/2024-04-29",
                 "export OMP_NUM_THREADS=16",
                 "NRANKS=$(( NNODES * 2 ))",
                 'export HANG_TIMEOUT="${HANG_TIMEOUT:-900}"',
                 'MPIEXEC_FLAGS="${HANGKIT_MPIEXEC_FLAGS---ppn 2 --depth 16 --cpu-bind depth}"']:
        assert line in lines
    assert "hangkit doctor" not in text.replace("hangkit doctor's", "")
    assert command_words(text) == ["python", "train.py", *ODD_WORDS]


@pytest.mark.timeout(30)
def test_without_out_the_script_goes_to_stdout_and_doctor_runs_first(tmp_path, monkeypatch,
                                                                     capsys):
    monkeypatch.chdir(tmp_path)
    assert main([*ACCOUNT, "--doctor", "--ppn", "3", *COMMAND]) == 0
    printed = capsys.readouterr().out
    assert printed == render(JobOptions(account="MyProj", command=("python", "train.py"),
                                        ppn=3, doctor=True))
    assert list(tmp_path.iterdir()) == []
    lines = printed.splitlines()
    doctor = lines.index('if ! hangkit doctor --ranks "${NRANKS}"; then')
    assert lines.index("NRANKS=$(( NNODES * 3 ))") < doctor
    assert doctor < next(i for i, line in enumerate(lines) if line.startswith("hangkit watch"))


@pytest.mark.timeout(30)
def test_environment_follows_envsetup_and_nccl_settings_stay_advice():
    lines = render(JobOptions(account="MyProj", command=("python", "train.py"),
                              depth=8)).splitlines()
    env, _, created = hang_safe_environment({"TMPDIR": "/tmp", "OMP_NUM_THREADS": "8"})
    assert created is None
    for name, value in env.items():
        if name != "TMPDIR":  # the script makes its own short one, per job
            assert f"export {name}={value}" in lines
    for name, value in NCCL_HANG_SETTINGS.items():
        assert f"#   {name}={value}" in lines
    assert not [line for line in lines if "NCCL_" in line and not line.startswith("#")]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("argv, expected", [
    ([*ACCOUNT, "--walltime", "1:00", *COMMAND], "--walltime '1:00': not HH:MM:SS"),
    ([*ACCOUNT, "--walltime", "01:60:00", *COMMAND],
     "--walltime '01:60:00': minutes and seconds must be below 60"),
    ([*ACCOUNT, "--walltime", "01:00:75", *COMMAND], "--walltime '01:00:75'"),
    ([*ACCOUNT, "--walltime", "00:00:00", *COMMAND], "--walltime '00:00:00': must be longer"),
    ([*ACCOUNT, "--nodes", "0", *COMMAND], "--nodes 0: a job needs at least 1 node"),
    ([*ACCOUNT, "--nodes", "two", *COMMAND], "invalid int value: 'two'"),
    ([*ACCOUNT, "--ppn", "5", *COMMAND], "--ppn 5: ppn must be 1..4 on Polaris"),
    ([*ACCOUNT, "--ppn", "0", *COMMAND], "--ppn 0: ppn must be 1..4 on Polaris"),
    ([*ACCOUNT, "--depth", "0", *COMMAND], "--depth 0"),
    ([*ACCOUNT, "--depth", "32", *COMMAND], "--ppn 4 x --depth 32 = 128 hardware threads"),
    ([*ACCOUNT, "--hang-timeout", "0", *COMMAND], "--hang-timeout 0"),
    ([*ACCOUNT, "--hang-timeout", "nan", *COMMAND], "--hang-timeout nan"),
    (["--account", "my proj", *COMMAND], "--account 'my proj'"),
    ([*ACCOUNT, "--queue", "debug\n#PBS -l select=99", *COMMAND],
     "--queue 'debug\\n#PBS -l select=99'"),
    ([*ACCOUNT, "--filesystems", "home::eagle", *COMMAND], "--filesystems 'home::eagle'"),
    ([*ACCOUNT, "--conda-module", "conda; rm -rf ~", *COMMAND],
     "--conda-module 'conda; rm -rf ~'"),
    ([*ACCOUNT], "no command given"),
    ([*ACCOUNT, "--"], "no command given"),
    (COMMAND, "the following arguments are required: --account"),
    ([*ACCOUNT, "--submit", *COMMAND], "--submit needs --out"),
    ([*ACCOUNT, "--out", "no/such/run.sh", *COMMAND], "--out no/such/run.sh: no such directory"),
    ([*ACCOUNT, "--out", ".", *COMMAND], "--out .: is a directory"),
])
def test_bad_input_is_one_line_naming_the_value_and_exit_2(tmp_path, monkeypatch, capsys,
                                                           argv, expected):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert expected in one_line_error(captured.err)
    assert captured.out == ""
    assert list(tmp_path.iterdir()) == []


@pytest.mark.timeout(30)
def test_submit_without_qsub_on_path_writes_nothing(tmp_path, monkeypatch, capsys):
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    out = tmp_path / "run.sh"
    assert main([*ACCOUNT, "--out", str(out), "--submit", *COMMAND]) == 2
    assert "qsub not found on PATH" in one_line_error(capsys.readouterr().err)
    assert not out.exists()


@pytest.mark.timeout(30)
def test_bad_usage_from_the_shell_has_no_traceback():
    done = subprocess.run([sys.executable, "-m", "hangkit.polaris.jobscript", *ACCOUNT,
                           "--ppn", "8", *COMMAND], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert done.stderr.splitlines() == ["hangkit: error: --ppn 8: ppn must be 1..4 on Polaris "
                                        "(4 GPUs a node, one rank each)"]


@pytest.fixture
def fake_qsub(tmp_path, monkeypatch):
    """`qsub` on PATH runs fake_qsub.py; returns the file where it records what it was asked."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "qsub"
    shim.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} "
                    f"{shlex.quote(str(POLARIS / 'fake_qsub.py'))} \"$@\"\n")
    shim.chmod(0o755)
    record = tmp_path / "qsub-record.json"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_QSUB_RECORD", str(record))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return record


@pytest.mark.timeout(30)
def test_submit_hands_qsub_the_file_and_prints_the_job_id(fake_qsub, capsys):
    assert main([*ACCOUNT, "--out", "run.sh", "--submit", *COMMAND]) == 0
    assert capsys.readouterr().out == "12345.polaris-pbs-01\n"
    asked = json.loads(fake_qsub.read_text())
    assert asked["argv"] == ["run.sh"]
    # PBS_O_WORKDIR, where the script cd's, is the directory qsub ran in.
    assert os.path.realpath(asked["cwd"]) == os.path.realpath(".")
    assert asked["script"] == Path("run.sh").read_text()
    assert asked["script"].startswith("#!/bin/bash -l\n#PBS -l select=1:system=polaris\n")


@pytest.mark.timeout(30)
def test_qsub_failure_is_one_line_with_its_last_stderr_line(fake_qsub, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_QSUB_MODE", "fail")
    assert main([*ACCOUNT, "--out", "run.sh", "--submit", *COMMAND]) == 1
    captured = capsys.readouterr()
    assert one_line_error(captured.err) == (
        "hangkit: error: qsub run.sh failed (exit 38): qsub: Unknown queue\n")
    assert captured.out == ""
    assert Path("run.sh").is_file()  # kept, to submit by hand once PBS agrees


@pytest.mark.timeout(30)
def test_qsub_that_never_answers_is_ended_at_its_deadline(fake_qsub, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_QSUB_MODE", "hang")
    monkeypatch.setattr(jobscript, "QSUB_TIMEOUT", 1.0)
    started = time.monotonic()
    assert main([*ACCOUNT, "--out", "run.sh", "--submit", *COMMAND]) == 1
    assert time.monotonic() - started < 20
    err = one_line_error(capsys.readouterr().err)
    assert "qsub run.sh did not answer within 1 s" in err
    assert json.loads(fake_qsub.read_text())["argv"] == ["run.sh"]  # it was reached, and hung
    # conftest's no_process_left_behind fails the test if the fake qsub outlived it


def job_environment(tmp_path: Path, **extra: str) -> dict[str, str]:
    """This process's environment without any launcher's or job's variables, plus `extra`."""
    own = ("PBS_", "PMI_", "PALS_", "MPI_", "HYDRA_", "MASTER_", "HANG_TIMEOUT",
           "HANGKIT_MPIEXEC", "HANGKIT_WATCH", "CUDA_VISIBLE_DEVICES")
    env = {k: v for k, v in os.environ.items() if not k.startswith(own)}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def local_job(tmp_path: Path, options: list[str], **env: str) -> tuple[list[str], dict]:
    """Writes the job script for show_rank.py with `options`; returns the command and the
    environment that run its body as PBS would on the first node, with hydra for PALS."""
    launcher = mpiexec()  # skips without the local-mpi extra
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    nodefile = tmp_path / "nodefile"
    # Two "nodes", one rank each. Hydra reads PBS_NODEFILE too and puts both ranks on the one
    # host "localhost", so they get local ranks 0 and 1: two GPUs to tell apart.
    nodefile.write_text("localhost\nlocalhost\n")
    script = tmp_path / "run_polaris.sh"
    assert main([*ACCOUNT, "--ppn", "1", *options, "--out", str(script), "--", sys.executable,
                 str(POLARIS / "show_rank.py"), *ODD_WORDS]) == 0
    # Hydra runs both ranks here: it takes -n from the script and none of PALS's flags.
    return ["bash", str(script)], job_environment(
        tmp_path, PBS_NODEFILE=str(nodefile), PBS_O_WORKDIR=str(tmp_path),
        HANGKIT_MPIEXEC=launcher, HANGKIT_MPIEXEC_FLAGS="", HANGKIT_TEST_OUT=str(out_dir), **env)


def rank_records(tmp_path: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((tmp_path / "out").glob("rank-*.json"))]


def run_local_job(tmp_path: Path, options: list[str], **env: str):
    """Runs the job's body to its end. Returns (the run, the ranks' records)."""
    argv, full_env = local_job(tmp_path, options, **env)
    done = subprocess.run(argv, env=full_env, cwd="/", capture_output=True, text=True,
                          timeout=75)
    ranks = rank_records(tmp_path)
    assert [r["env"]["PMI_RANK"] for r in ranks] == ["0", "1"], (ranks, done.stderr[-3000:])
    return done, ranks


def assert_tmpdir_removed(ranks: list[dict]) -> None:
    assert all(r["tmpdir_exists"] for r in ranks), ranks
    (tmpdir,) = {r["env"]["TMPDIR"] for r in ranks}
    assert tmpdir.startswith("/tmp/hk-")
    assert af_unix_path_length(tmpdir) <= AF_UNIX_PATH_MAX
    assert not os.path.exists(tmpdir), "the script's trap did not remove its TMPDIR"


@pytest.mark.timeout(90)
def test_script_body_runs_two_ranks_with_hydra(tmp_path, capsys):
    done, ranks = run_local_job(tmp_path, [], HANG_TIMEOUT="30")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 0 done" in done.stdout and "rank 1 done" in done.stdout
    # The script's environment is already hang-safe: watch had nothing to set.
    assert "hangkit: set " not in done.stderr
    for r in ranks:
        e = r["env"]
        assert e["PMI_SIZE"] == "2"
        # hydra on one host: local rank = rank, and each rank got that GPU before Python ran
        assert e["CUDA_VISIBLE_DEVICES"] == e["MPI_LOCALRANKID"] == e["PMI_RANK"], e
        assert (e["MASTER_ADDR"], e["MASTER_PORT"], e["HANG_TIMEOUT"]) == (
            "localhost", "29500", "30")
        assert (e["OMP_NUM_THREADS"], e["PYTHONUNBUFFERED"], e["WANDB_SILENT"]) == (
            "8", "1", "true")
        assert os.path.realpath(r["cwd"]) == os.path.realpath(tmp_path)
        assert r["argv"] == ODD_WORDS
    assert_tmpdir_removed(ranks)


@pytest.mark.timeout(90)
def test_a_hang_in_the_job_is_caught_by_watch_within_hang_timeout(tmp_path, capsys):
    started = time.monotonic()
    done, ranks = run_local_job(tmp_path, ["--hang-timeout", "2"], HANGKIT_TEST_HANG="1")
    assert done.returncode == 124, done.stderr[-3000:]
    assert time.monotonic() - started < 60
    assert [r["env"]["HANG_TIMEOUT"] for r in ranks] == ["2", "2"]
    # The report lands in the submit directory (PBS_O_WORKDIR), where the user looks.
    assert len(list(tmp_path.glob("hangkit-report-*/hang-report.md"))) == 1, done.stderr[-3000:]
    assert_tmpdir_removed(ranks)


@pytest.mark.timeout(90)
def test_sigterm_to_the_job_ends_every_rank_and_removes_tmpdir(tmp_path, capsys):
    # What PBS does at the walltime or on qdel: SIGTERM to every process of the job.
    argv, env = local_job(tmp_path, ["--hang-timeout", "60"], HANGKIT_TEST_HANG="1")
    job = subprocess.Popen(argv, env=env, cwd="/", stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while len(ranks := rank_records(tmp_path)) < 2:  # each rank's record: it is hung now
            assert job.poll() is None, job.communicate()
            assert time.monotonic() < deadline, f"ranks ready: {ranks}"
            time.sleep(0.05)  # ok-sleep: polls for the ranks' records, with a deadline
        os.killpg(job.pid, signal.SIGTERM)
        out, err = job.communicate(timeout=60)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait(timeout=10)
    assert job.returncode == 143, err[-3000:]
    assert_tmpdir_removed(ranks)
    # conftest's no_process_left_behind fails the test if a rank or the launcher outlived it


@pytest.mark.timeout(30)
def test_script_outside_a_job_stops_with_a_message(tmp_path, capsys):
    script = tmp_path / "run_polaris.sh"
    assert main([*ACCOUNT, "--out", str(script), *COMMAND]) == 0
    capsys.readouterr()
    done = subprocess.run(["bash", str(script)], env=job_environment(tmp_path), cwd=tmp_path,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode != 0
    assert "PBS_O_WORKDIR: is not set: submit this script with qsub" in done.stderr
