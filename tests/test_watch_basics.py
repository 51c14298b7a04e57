"""`hangkit watch` when nothing hangs: usage errors, passthrough, exit codes, the timer."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import program

from hangkit.cli import main


@pytest.mark.parametrize("argv, expected", [
    (["watch"], "no command given"),
    (["watch", "--"], "no command given"),
    (["watch", "--", "no-such-command-hangkit"], "command not found: no-such-command-hangkit"),
    (["watch", "--timeout", "0", "--", "true"], "--timeout must be a positive number"),
    (["watch", "--timeout", "-5", "--", "true"], "got -5"),
    (["watch", "--timeout", "soon", "--", "true"], "not a number of seconds: 'soon'"),
    (["watch", "--grace", "-1", "--", "true"], "--grace must be zero or more"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_bad_usage_is_one_line_and_exit_2(capsys, argv, expected):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_bad_hang_timeout_variable(capsys, monkeypatch):
    monkeypatch.setenv("HANG_TIMEOUT", "ten")
    assert main(["watch", "--", "true"]) == 2
    assert "HANG_TIMEOUT is not a number of seconds: 'ten'" in capsys.readouterr().err


def test_bad_usage_from_the_shell_has_no_traceback():
    done = subprocess.run([sys.executable, "-m", "hangkit", "watch", "--timeout", "0", "--",
                           "true"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "hangkit: error: --timeout must be a positive number of seconds, got 0"]


def test_stdout_and_stderr_pass_through_byte_for_byte(run_watch, tmp_path):
    bare = subprocess.run(program("passthrough_bytes.py"), capture_output=True, timeout=30)
    watched = run_watch(program("passthrough_bytes.py"),
                        options=["--no-setup-env", "--no-flight-recorder"])
    assert watched.returncode == 0
    assert watched.stdout == bare.stdout
    assert watched.stderr == bare.stderr
    assert len(bare.stdout) > 256 * 1024
    assert not watched.report_dir.exists()


@pytest.mark.parametrize("code", [0, 3, 77])
def test_exit_code_passes_through_without_a_report(run_watch, code):
    run = run_watch([sys.executable, "-c", f"import sys; sys.exit({code})"])
    assert run.returncode == code
    assert not run.report_dir.exists()


def test_death_by_signal_exits_128_plus_signal(run_watch):
    run = run_watch(["sh", "-c", "kill -9 $$"])
    assert run.returncode == 128 + 9


def test_output_resets_the_timer(run_watch):
    # A line every 0.2 s for 4 s under a 1.5 s timeout: silent for far less than the timeout,
    # running for far longer, so only a timer that output resets lets it finish.
    run = run_watch(program("periodic_output.py") + ["0.2", "4"], options=["--timeout", "1.5"])
    assert run.returncode == 0, run.err
    assert run.stdout.decode().rstrip().endswith("done")
    assert not run.report_dir.exists()


def test_hang_timeout_variable_sets_the_default(run_watch):
    # The sleep is the watched job's hang, not the test waiting. ok-sleep
    run = run_watch([sys.executable, "-c",
                     "print('started', flush=True); import time; time.sleep(60)"],  # ok-sleep
                    options=["--grace", "1"], env={"HANG_TIMEOUT": "1"})
    assert run.returncode == 124
    assert "--timeout 1" in run.report["reason"]


def test_silence_before_the_first_output_is_judged_by_the_startup_timeout(run_watch):
    # Nothing printed yet: the 1 s timeout does not apply, the 3 s start-up timeout does.
    run = run_watch([sys.executable, "-c", "import time; time.sleep(60)"],  # ok-sleep
                    options=["--timeout", "1", "--startup-timeout", "3", "--grace", "1"])
    assert run.returncode == 124, run.err
    assert "since the job started (--startup-timeout 3)" in run.report["reason"]
    assert run.report["idle_seconds"] >= 3


def test_setup_env_sets_hang_safe_variables_and_a_short_tmpdir(run_watch, tmp_path):
    long_tmp = tmp_path / ("t" * 60) / ("u" * 60)
    long_tmp.mkdir(parents=True)
    probe = ("import os; print(os.environ['PYTHONUNBUFFERED'], os.environ['OMP_NUM_THREADS'], "
             "os.environ['WANDB_SILENT'], os.environ['TMPDIR'])")
    env = {"TMPDIR": str(long_tmp), "PYTHONUNBUFFERED": "", "WANDB_SILENT": ""}
    env_without_omp = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    run = run_watch([sys.executable, "-c", probe], env={**env_without_omp, **env})
    unbuffered, omp, silent, tmpdir = run.stdout.decode().split()
    assert (unbuffered, omp, silent) == ("1", "1", "true")
    assert len(tmpdir) + 32 <= 107 and tmpdir != str(long_tmp)
    assert not os.path.exists(tmpdir), "the short TMPDIR is removed when the job ends"
    assert "hangkit: set TMPDIR=" in run.err and "over the AF_UNIX limit of 107" in run.err
    assert "hangkit: set PYTHONUNBUFFERED=1" in run.err


def test_no_setup_env_leaves_the_environment_alone(run_watch, tmp_path):
    long_tmp = tmp_path / ("t" * 100)
    long_tmp.mkdir()
    run = run_watch([sys.executable, "-c", "import os; print(os.environ['TMPDIR'])"],
                    options=["--no-setup-env", "--no-flight-recorder"],
                    env={"TMPDIR": str(long_tmp)})
    assert run.stdout.decode().strip() == str(long_tmp)
    assert run.err == ""


@pytest.mark.parametrize("options, users, expected", [
    ([], None, "2000"),  # on by default, and said
    ([], "64", "64"),  # the user's own setting stands
    (["--no-flight-recorder"], None, "0"),  # off, also where torch has it on by default
])
def test_flight_recorder_is_on_unless_the_user_set_it_or_turned_it_off(
        run_watch, options, users, expected):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCH_FR_")}
    if users is not None:
        env["TORCH_FR_BUFFER_SIZE"] = users
    run = run_watch([sys.executable, "-c", "import os; print(os.environ.get("
                     "'TORCH_FR_BUFFER_SIZE', 'unset'))"], options=options, env=env)
    assert run.returncode == 0, run.err
    assert run.stdout.decode().strip() == expected
    assert ("hangkit: set TORCH_FR_BUFFER_SIZE=2000" in run.err) == (expected == "2000")


def test_leftover_processes_are_ended_when_the_command_exits(run_watch):
    # The command exits at once but leaves a background sleeper holding no pipe.
    run = run_watch(["sh", "-c", "sleep 300 >/dev/null 2>&1 & echo started"],
                    options=["--grace", "2"])
    assert run.returncode == 0
    assert "left running" in run.err


def test_without_pidfd_the_child_is_polled(tmp_path):
    # Linux before 5.3 has no pidfd_open: the watcher must still notice the exit and the code.
    script = ("import os, sys; del os.pidfd_open; from hangkit.cli import main; "
              "sys.exit(main(['watch', '--', sys.executable, '-c', "
              "'print(\"hi\"); raise SystemExit(5)']))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=30,
                          cwd=tmp_path)
    assert done.returncode == 5
    assert done.stdout == b"hi\n"


def test_sigterm_to_the_watcher_ends_the_job(tmp_path):
    # As when PBS ends a job at its walltime: the watcher takes the job down with it.
    proc = subprocess.Popen([sys.executable, "-m", "hangkit", "watch", "--grace", "2", "--",
                             *program("gil_loop.py")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=tmp_path,
                            env={**os.environ, "HANGKIT_READY_DIR": str(tmp_path)})
    try:
        assert proc.stdout.readline().startswith(b"ready pid=")  # the job is running
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 128 + 15
    assert b"received SIGTERM: ending the job" in err
    assert not list(tmp_path.glob("hangkit-report-*")), "an interrupted job is not a hang"
