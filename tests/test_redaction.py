"""Redaction: each shape of secret a job's command line, output or stacks can hold, the words
that must stay, and a real `hangkit watch` then `hangkit report` whose every written byte is
searched for the secrets planted in the job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile

import pytest
from conftest import program

from hangkit.monitor.report import build_report, render_markdown, render_summary
from hangkit.records import (
    Frame,
    Look,
    ProcessLook,
    ProcessSnapshot,
    StallEvent,
    ThreadStack,
)
from hangkit.redact import (
    REDACTED,
    is_secret_name,
    redact_argv,
    redact_member,
    redact_text,
    redact_value,
)

R = REDACTED
JWT = ("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6Ikpv"
       "aG4ifQ.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c")
WANDB = "0123456789abcdef0123456789abcdef01234567"

HIDDEN = [
    # URLs and connection strings
    ("--db-url postgres://trainer:dbpw88@db/x", f"--db-url postgres://trainer:{R}@db/x"),
    ("pip from https://me:pa55@pypi.example.org/simple",
     f"pip from https://me:{R}@pypi.example.org/simple"),
    ("redis://:s3cret@cache:6379/0", f"redis://:{R}@cache:6379/0"),
    ("mysql://u:p@ss@db/x", f"mysql://u:{R}@db/x"),  # the password runs to the last @
    ("host=db user=x password=y dbname=z", f"host=db user=x password={R} dbname=z"),
    ("Server=db;User Id=x;Password=hunter2;", f"Server=db;User Id=x;Password={R}"),
    ("Driver={ODBC};Uid=x;PWD=hunter2;", f"Driver={{ODBC}};Uid=x;PWD={R}"),
    # token shapes (the prefix says what was there)
    ("hf=hf_Q7xLmN2pRvT8sWz4KbYc9dEf", f"hf=hf_{R}"),
    ("using sk-proj-abcDEF123456789012345_xyz", f"using sk-proj-{R}"),
    ("OPENAI sk-abcdefghijklmnopqrstuvwxyz0123", f"OPENAI sk-{R}"),
    ("clone ghp_abcdefghijklmnopqrstuvwxyz0123456789", f"clone ghp_{R}"),
    ("gho_abcdefghijklmnopqrstuvwxyz0123456789 ghs_abcdefghijklmnopqrstuvwxyz0123456789",
     f"gho_{R} ghs_{R}"),
    ("github_pat_11ABCDEFG0_abcdefghijklmnopqrstuvwxyz", f"github_pat_{R}"),
    ("id AKIAIOSFODNN7EXAMPLE", f"id AKIA{R}"),
    (f"jwt {JWT}", f"jwt eyJ{R}"),
    ("slack xoxb-123456789012-abcdefghij", f"slack xoxb-{R}"),
    ("Authorization: Bearer eyJhbGciOiJIUzI1", f"Authorization: Bearer {R}"),
    ("Authorization: Basic dXNlcjpwYXNzd29yZA==", f"Authorization: Basic {R}"),
    (f"wandb login --relogin {WANDB}", f"wandb login --relogin {R}"),
    # names that say secret: NAME=value, NAME: value, --name value, --name=value
    ("pw=hunter2", f"pw={R}"),
    ("db_pw=hunter2", f"db_pw={R}"),
    ("train.py --pw hunter2 --lr 1", f"train.py --pw {R} --lr 1"),
    ("password: hunter3", f"password: {R}"),
    ("passwd=x pwd=y", f"passwd={R} pwd={R}"),
    ("export MY_TOKEN=xyz", f"export MY_TOKEN={R}"),
    ("  db_password: 'hunter2' # old", f"  db_password: '{R}' # old"),
    ('{"api_key": "s3cr3t", "step": 3}', f'{{"api_key": "{R}", "step": 3}}'),
    ("{'Secret': 'x y'}", f"{{'Secret': '{R}'}}"),
    ("train.py --api-key abc --lr 1", f"train.py --api-key {R} --lr 1"),
    ("train.py --apikey=abc --token=def", f"train.py --apikey={R} --token={R}"),
    ("apiKey: abc", f"apiKey: {R}"),
    ("credentials=abc client_secret=def", f"credentials={R} client_secret={R}"),
    ("--auth user:pw", f"--auth {R}"),
    ("key=abc", f"key={R}"),
    ("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
     f"aws_secret_access_key = {R}"),
    (f"WANDB_API_KEY={WANDB}", f"WANDB_API_KEY={R}"),
]

KEPT = [
    "--keep-going", "keyboard layout", "monkey=3", "tokens_per_second=512", "num_tokens: 1024",
    "https://pypi.org/simple", "user@host", "ssh://git@github.com:22/org/repo",
    "/home/u/pw_runs/train.py", "pwd_dir=/scratch/run", "PWD=/home/u", "OLDPWD=/home/u",
    "SSH_AUTH_SOCK=/tmp/ssh-x/agent.1", "author=Bob",
    "commit 3f786850e387550fdab836ed7e6dc881de23001b",
    "hf_hub_download", "sk-learn", "KeyError: 'lr'", "tokenizer.py:123", "key.py:7",
    "rank 3: step 7 loss 0.25", "PBS_JOBID=123.pbs", "tcp://10.0.0.1:29500",
    "TOKENIZERS_PARALLELISM=false", "AKIA is a prefix", "eyJ alone",
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("text", "expected"), HIDDEN)
def test_secrets_are_hidden(text, expected):
    assert redact_text(text) == expected
    assert redact_text(expected) == expected  # a second pass changes nothing


@pytest.mark.timeout(30)
@pytest.mark.parametrize("text", KEPT)
def test_what_is_no_secret_is_kept(text):
    assert redact_text(text) == text


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("name", "secret"), [
    ("WANDB_API_KEY", True), ("HF_TOKEN", True), ("db_pw", True), ("--pw", True),
    ("MYSQL_PWD", True), ("PGPASSWORD", True), ("apiKey", True), ("x-api-key", True),
    ("AWS_SECRET_ACCESS_KEY", True), ("GOOGLE_APPLICATION_CREDENTIALS", True),
    ("basic_auth", True), ("Authorization", True),
    ("MONKEY", False), ("KEYBOARD", False), ("tokens_per_second", False), ("pwd_dir", False),
    ("SSH_AUTH_SOCK", False), ("AUTHOR", False), ("TOKENIZERS_PARALLELISM", False),
    ("KeyError", False), ("OLDPWD", False),
])
def test_names_that_say_secret(name, secret):
    assert is_secret_name(name) is secret


@pytest.mark.timeout(30)
def test_pwd_is_a_directory_where_its_value_is_a_path():
    assert not is_secret_name("PWD", "/home/u")
    assert is_secret_name("PWD", "hunter2")


@pytest.mark.timeout(30)
def test_command_lines():
    argv = ["python", "train.py", "--db-url", "postgres://trainer:dbpw88@db/x", "--hf",
            "hf_Q7xLmN2pRvT8sWz4KbYc9dEf", "--api-key", "abc", "--pw", "hunter2", "--lr", "1",
            "--token", "--keep-going", "MY_TOKEN=u", "--secret=t", "--pwd", "/home/u"]
    assert redact_argv(argv) == [
        "python", "train.py", "--db-url", f"postgres://trainer:{R}@db/x", "--hf", f"hf_{R}",
        "--api-key", R, "--pw", R, "--lr", "1", "--token", "--keep-going", f"MY_TOKEN={R}",
        f"--secret={R}", "--pwd", "/home/u"]


@pytest.mark.timeout(30)
def test_redact_value_walks_everything_and_spares_hangkits_own_fields():
    value = {"ranks": [{"key": "rank 0", "pid": 7}],
             "command": ["python", "--api-key", "abc"],
             "processes": [{"cmdline": ["train.py", "--pw", "hunter2"], "threads": [
                 {"name": "pw=hunter2", "frames": [{"file": "/x.py", "code": "token = 'abc'"}]}]}],
             "context": {"environment": {"HF_TOKEN": "hf_abcdef"}, "nested": [("db_pw=q",)],
                         "step": 3, "ok": None},
             "echoed": "the key was wandb-7f3a9c1e5b2d"}
    before = json.dumps(value)
    out = redact_value(value, ["wandb-7f3a9c1e5b2d"])
    assert json.dumps(value) == before  # a copy: the value given is not changed
    assert out == {"ranks": [{"key": "rank 0", "pid": 7}],
                   "command": ["python", "--api-key", R],
                   "processes": [{"cmdline": ["train.py", "--pw", R], "threads": [
                       {"name": f"pw={R}", "frames": [{"file": "/x.py",
                                                       "code": f"token = '{R}'"}]}]}],
                   "context": {"environment": {"HF_TOKEN": R}, "nested": [[f"db_pw={R}"]],
                               "step": 3, "ok": None},
                   "echoed": f"the key was {R}"}


@pytest.mark.timeout(30)
def test_bundle_members_hide_the_same():
    text = "hf=hf_Q7xLmN2pRvT8sWz4KbYc9dEf\npw=hunter2\nstep 3\n"
    assert redact_member("output-tail.txt", text.encode()) == \
        f"hf=hf_{R}\npw={R}\nstep 3\n".encode()
    report = json.dumps({"command": ["python", "--pw", "hunter2"], "last_lines": ["pw=hunter2"]})
    assert json.loads(redact_member("hang-report/hang-report.json", report)) == {
        "command": ["python", "--pw", R], "last_lines": [f"pw={R}"]}


PLANTED = {  # what the job holds -> what to search for
    "url": "dbpw88", "hf": "Q7xLmN2pRvT8sWz4KbYc9dEf", "short-hf": "hf_abcdef",
    "pw": "hunter2", "password": "hunter3", "option": "hunter4", "dsn": "dsnpw77",
    "aws": "IOSFODNN7EXAMPLE", "aws-secret": "wJalrXUtnFEMI/K7MDENG", "jwt": JWT[40:80],
    "thread": "Zq9Yx8Wv7Ut6Sr5Qp4On3Ml2",
}


@pytest.mark.timeout(30)
def test_a_report_is_redacted_in_every_field():
    secret_frame = Frame("load", "/home/u/train.py", 3, code="password = 'hunter3'")
    rank = ProcessSnapshot(
        pid=100, ppid=1, rank=0, role="rank", state="blocked",
        cmdline=["python", "train.py", "--db-url", "postgres://trainer:dbpw88@db/x"],
        threads=[ThreadStack(id=1, name="MainThread", is_main=True, os_thread_id=100,
                             frames=[Frame("<module>", "/home/u/train.py", 1), secret_frame]),
                 ThreadStack(id=2, name=f"sync sk-proj-{PLANTED['thread']}", os_thread_id=101)],
        note="pw=hunter2", stack_error="token: dsnpw77")
    look = Look(at=1.0, seconds=1.0, samples=2, verdict="hung", processes=[
        ProcessLook(pid=100, rank=0, role="rank", activity="waiting",
                    where="load (train.py:3) password: hunter3", stacks=["pw=hunter2"])])
    report = build_report(
        reason="no output; --pw hunter4", command=["python", "train.py", "--pw", "hunter4"],
        idle_seconds=3.0, processes=[rank], looks=[look], secrets=["hf_abcdef"],
        events=[StallEvent("stall", "rank 0 stopped after hf_Q7xLmN2pRvT8sWz4KbYc9dEf", [0])],
        last_lines=["hf=hf_abcdef", f"id {JWT}", "AKIAIOSFODNN7EXAMPLE", "step 3"],
        context={"environment": {"DB_DSN": "host=db password=dsnpw77"},
                 "aws": "aws_secret_access_key=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"})
    written = "\n".join([json.dumps(report.to_json()), render_markdown(report),
                         *render_summary(report)])
    found = {k: v for k, v in PLANTED.items() if v in written}
    assert not found, found
    assert report.processes[0].threads[1].name == f"sync sk-proj-{R}"
    assert report.processes[0].threads[0].frames[1].code == f"password = '{R}'"
    assert report.last_lines == [f"hf={R}", f"id eyJ{R}", f"AKIA{R}", "step 3"]
    assert rank.note == "pw=hunter2"  # the snapshot given is not changed


@pytest.mark.timeout(300)
def test_no_planted_secret_reaches_any_file_watch_or_report_write(run_watch, tmp_path):
    job = program("prints_secrets.py") + [
        "--db-url", "postgres://trainer:dbpw88@db/x", "--hf", "hf_Q7xLmN2pRvT8sWz4KbYc9dEf",
        "--pw", "hunter4", "--thread-name", f"uploader sk-proj-{PLANTED['thread']}",
        "--print", "hf=hf_Q7xLmN2pRvT8sWz4KbYc9dEf", "--print", "hf=hf_abcdef",
        "--print", "pw=hunter2", "--print", "password: hunter3",
        "--print", "connecting to host=db user=trainer password=dsnpw77",
        "--print", "aws_access_key_id=AKIAIOSFODNN7EXAMPLE",
        "--print", "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        "--print", f"auth {JWT}",
    ]
    env = {"HF_TOKEN": "hf_abcdef"}  # too short for its shape: scrubbed as the variable's value
    run = run_watch(job, options=["--timeout", "1", "--grace", "1"], env=env, timeout=180)
    assert run.returncode == 124, run.err[-3000:]
    # The secrets were there to find: the job printed them, and the report holds them hidden.
    out = run.stdout.decode()
    assert all(v in out for k, v in PLANTED.items() if k not in ("url", "option", "thread"))
    report = run.report
    assert f"postgres://trainer:{R}@db/x" in report["command"]
    assert f"pw={R}" in report["last_lines"] and f"hf={R}" in report["last_lines"]
    (me,) = [p for p in report["processes"] if "prints_secrets.py" in " ".join(p["cmdline"])]
    assert f"uploader sk-proj-{R}" in [t["name"] for t in me["threads"]], me["threads"]

    log = tmp_path / "job.out"
    log.write_bytes(run.stdout)
    archive = tmp_path / "bundle.tar.gz"
    done = subprocess.run(
        [sys.executable, "-m", "hangkit", "report", "--hang-report", str(run.report_dir),
         "--log", str(log), "--out", str(archive)],
        capture_output=True, cwd=tmp_path, timeout=200, env={**os.environ, **env})
    assert done.returncode == 0, done.stderr.decode()[-3000:]

    written = {"watch stderr": run.stderr, "report stdout": done.stdout,
               "report stderr": done.stderr}
    written |= {f"report dir/{p.name}": p.read_bytes()
                for p in run.report_dir.iterdir() if p.is_file()}
    with tarfile.open(archive) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    assert any(name.endswith("output-tail.txt") for name in members), sorted(members)
    written |= {f"bundle/{name}": data for name, data in members.items()}
    found = [(what, key) for what, data in written.items() for key, secret in PLANTED.items()
             if secret.encode() in data]
    assert not found, found
    # The bundle's tail held the job's output: redacted, not left out.
    tail = next(data for name, data in members.items() if name.endswith("output-tail.txt"))
    assert f"pw={R}".encode() in tail
