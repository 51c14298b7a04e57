"""wandb: an offline run works within the deadline, the W&B server answers from here, and there
is an API key, so that wandb.init neither retries a dead network nor waits at a prompt.

Guards against WJ-01 (wandb.init on a compute node without network or proxy: "Network error
(ConnectTimeout), entering retry loop" for 90 s and more while the other ranks wait in their
first collective), WJ-02 (no API key: wandb.init asks "Enter your choice" on a terminal and
waits for an answer nobody gives) and WJ-03 (the offline fallback must work before it can save
a run). wandb itself is imported only in a sub-child with its own deadline: the probe's process
never imports it, so a hanging import costs only that sub-child.
"""

from __future__ import annotations

import base64
import configparser
import contextlib
import importlib.util
import json
import netrc
import os
import re
import shutil
import signal
import socket
import ssl
import tempfile
import time
from urllib.parse import unquote, urlsplit
from urllib.request import proxy_bypass_environment

from hangkit import deadline
from hangkit.probes.api import (
    Outcome,
    ProbeContext,
    fail,
    ok,
    run_python,
    skipped,
    timed_out,
    warn,
    worst,
)
from hangkit.procfs import read_environ

DEFAULT_BASE_URL = "https://api.wandb.ai"
ONLINE_SECONDS = 4.0  # the reachability check's own deadline: a dead network answers slowly
OFFLINE_MODES = ("offline", "dryrun", "disabled")
SLOW_SECONDS = 10.0  # an offline run slower than this is worth a word
_STAGE = "HANGKIT-WANDB-STAGE "
_RESULT = "HANGKIT-WANDB-RESULT "

# The sub-child: what a training script does, in offline mode. It prints each stage before
# entering it, so a deadline names the call that did not return.
_OFFLINE_CODE = f"""
import json, time
t0 = time.monotonic()
print({_STAGE!r} + "import wandb", flush=True)
import wandb
t1 = time.monotonic()
print({_STAGE!r} + "wandb.init", flush=True)
run = wandb.init(project="hangkit-doctor", job_type="probe",
                 settings=wandb.Settings(console="off"))
t2 = time.monotonic()
print({_STAGE!r} + "run.log and run.finish", flush=True)
run.log({{"probe": 1}})
run.finish()
t3 = time.monotonic()
print({_RESULT!r} + json.dumps({{"version": wandb.__version__, "import": t1 - t0,
                                 "init": t2 - t1, "finish": t3 - t2}}), flush=True)
"""

WJ01_ADVICE = (
    "WJ-01: wandb.init on a node that cannot reach the W&B server retries for 90 s or more while "
    "the other ranks wait. On compute nodes without network set WANDB_MODE=offline and run "
    "`wandb sync <WANDB_DIR>/wandb/offline-run-*` later from a login node; or export the site's "
    "proxy (HTTPS_PROXY/https_proxy, e.g. on Polaris http://proxy.alcf.anl.gov:3128) in the job "
    "script so every rank gets it; and start the tracker under a deadline "
    "(wandb.init(settings=wandb.Settings(init_timeout=60)) inside try/except, falling back to "
    "mode='offline').")
WJ02_ADVICE = (
    "WJ-02: with no key wandb.init asks for one (\"Enter your choice\") and waits for an answer "
    "wherever it can prompt (a terminal session, a Jupyter kernel) while the other ranks wait "
    "for it; where it cannot (a batch job) recent wandb versions raise instead. Run `wandb "
    "login` once on a login node (it writes ~/.netrc), or export WANDB_API_KEY in the job "
    "script, or set WANDB_MODE=offline.")
OFFLINE_ADVICE = (
    "WJ-03: the offline run is the fallback for a failed online init, so it must work first. "
    "Fix what the error names (often a WANDB_* setting); a run that is stuck rather than "
    "failing points at WANDB_DIR (default: the working directory) on a slow or hung filesystem, "
    "or at a long or unwritable TMPDIR (wandb's service talks over a local socket). Until "
    "then set WANDB_MODE=disabled for this job.")

# What wandb accepts as a key (wandb/sdk/lib/wbauth/validation.py): an optional prefix ending
# in "-", then 40 or more of letters, digits, "_" and "-"; or a JWT of three base64url parts.
_JWT = re.compile(r"[\w-]+\.[\w-]+\.[\w-]+")


def run(ctx: ProbeContext) -> Outcome:
    if importlib.util.find_spec("wandb") is None:
        return skipped("wandb is not installed")
    env = ctx.environ
    url = base_url(env)
    mode = wandb_mode(env)
    online_seconds = min(ONLINE_SECONDS, max(ctx.remaining(1.0), 0.1))

    def check() -> Outcome:
        started = time.monotonic()
        try:
            found = check_online(url, env, timeout=online_seconds)
        except Exception as e:  # a malformed URL or proxy: say so rather than "no answer"
            found = warn(f"{url}: cannot be checked: {type(e).__name__}: {e}", WJ01_ADVICE)
        found.data["online_seconds"] = round(time.monotonic() - started, 3)
        return found

    # Beside the offline run: name resolution takes no timeout, so the check is given up on
    # at its deadline rather than waited for.
    checker = None
    if mode not in OFFLINE_MODES:
        checker = deadline.start(check, timeout=online_seconds + 0.5, name="wandb online check")
    offline = check_offline(ctx)
    if checker is None:
        online = ok(f"not needed (WANDB_MODE={mode})")
    else:
        try:
            online = checker.result()
        except deadline.DeadlineExceeded:
            online = warn(f"{url}: no answer within {online_seconds:g} s (name resolution "
                          "hangs?)", WJ01_ADVICE)
    key = check_api_key(env, url, mode)
    parts = {"offline": offline, "online": online, "api key": key}
    # Problems first: the table shows the detail's first words only.
    order = ("timeout", "fail", "warn", "ok", "skipped")
    shown = sorted(parts.items(), key=lambda kv: order.index(kv[1].status))
    detail = "; ".join(f"{name}: {o.detail}" for name, o in shown)
    advice = " ".join(dict.fromkeys(o.advice for o in parts.values() if o.advice)) or None
    data = {"base_url": url, "mode": mode, **offline.data, **online.data,
            "parts": {name: {"status": o.status, "detail": o.detail}
                      for name, o in parts.items()}}
    return Outcome(worst(list(parts.values())), detail, advice, data)


def check_offline(ctx: ProbeContext) -> Outcome:
    """wandb.init, log and finish with WANDB_MODE=offline in a sub-child, under the deadline."""
    wandb_dir = tempfile.mkdtemp(prefix="hangkit-wandb-")
    env = {**ctx.environ, "WANDB_MODE": "offline", "WANDB_DIR": wandb_dir,
           "WANDB_SILENT": "true"}
    budget = max(ctx.remaining(1.0), 0.1)
    try:
        done = run_python(_OFFLINE_CODE, timeout=budget, env=env)
    finally:
        # wandb's service starts a session of its own, which the sub-child's kill misses.
        _kill_processes_using(wandb_dir)
        shutil.rmtree(wandb_dir, ignore_errors=True)
    stages = [ln[len(_STAGE):] for ln in done.stdout.splitlines() if ln.startswith(_STAGE)]
    if done.timed_out:
        where = stages[-1] if stages else "starting Python"
        return timed_out(f"offline run did not finish within {budget:.1f} s (stuck in {where})",
                         OFFLINE_ADVICE, stuck_in=where)
    found = [ln[len(_RESULT):] for ln in done.stdout.splitlines() if ln.startswith(_RESULT)]
    if done.returncode != 0 or not found:
        why = (_exception(done.stderr) or done.last_line() or done.last_line("stdout")
               or f"exit code {done.returncode}")
        return fail(f"offline run failed in {stages[-1] if stages else 'start-up'}: {why}",
                    OFFLINE_ADVICE)
    t = json.loads(found[0])
    total = t["import"] + t["init"] + t["finish"]
    # The time goes to data, not the detail, so that ranks with the same finding group
    # together in the doctor's list of problems; only a slow run says it there.
    slow = (f" but took {total:.0f} s (a slow WANDB_DIR filesystem?)" if total >= SLOW_SECONDS
            else "")
    return ok(f"init, log and finish work (wandb {t['version']}){slow}",
              wandb_version=t["version"], offline_seconds=round(total, 3),
              offline_init_seconds=round(t["init"], 3))


def check_online(url: str, env: dict[str, str], *, timeout: float) -> Outcome:
    """A TCP connection (and TLS handshake) to the server, or a CONNECT through the proxy."""
    parts = urlsplit(url)
    host = parts.hostname
    if not host:
        return warn(f"WANDB_BASE_URL={url!r} names no host", WJ01_ADVICE)
    secure = parts.scheme == "https"
    port = parts.port or (443 if secure else 80)
    proxy = proxy_for(parts.scheme, host, env)
    shown = _show_proxy(proxy) if proxy is not None else None
    try:
        if proxy is None:
            sock = socket.create_connection((host, port), timeout=timeout)
            with sock:
                if secure:
                    ssl.create_default_context().wrap_socket(sock, server_hostname=host).close()
            return ok(f"{url} answers ({'TLS' if secure else 'TCP'} to {host}:{port})")
        status = _connect_through(proxy, host, port, timeout=timeout)
    except ssl.SSLError as e:
        return warn(f"{url}: TLS handshake failed ({e.reason or e}); if your site inspects "
                    "TLS, point SSL_CERT_FILE and REQUESTS_CA_BUNDLE at its CA bundle",
                    WJ01_ADVICE, proxy=shown)
    except OSError as e:
        what = f"proxy {shown}" if shown else f"{host}:{port}"
        return warn(f"{url} unreachable: {what}: {_why(e)}", WJ01_ADVICE, proxy=shown)
    if status == 200:
        return ok(f"{url} reachable through proxy {shown} (CONNECT {host}:{port} -> 200)",
                  proxy=shown)
    return warn(f"{url} unreachable: proxy {shown} answered CONNECT with {status}"
                + (" (proxy authentication required)" if status == 407 else ""),
                WJ01_ADVICE, proxy=shown)


def check_api_key(env: dict[str, str], url: str, mode: str | None) -> Outcome:
    """Where wandb.init would find a key (wandb/sdk/lib/wbauth): WANDB_API_KEY, an identity
    token file, or the .netrc entry for the server. The key itself is never shown."""
    if mode in OFFLINE_MODES:
        return ok(f"not needed (WANDB_MODE={mode})")
    key = env.get("WANDB_API_KEY")
    if key:
        problem = key_problem(key)
        if problem:
            return warn(f"WANDB_API_KEY is set but wandb will reject it: {problem}",
                        "Copy the key again from https://wandb.ai/authorize (40 characters "
                        "or more) into WANDB_API_KEY, or unset it and run `wandb login`.")
        return ok(f"WANDB_API_KEY is set ({len(key)} characters)")
    if env.get("WANDB_IDENTITY_TOKEN_FILE"):
        return ok("WANDB_IDENTITY_TOKEN_FILE is set")
    netloc = urlsplit(url).netloc
    path = netrc_path(env)
    try:
        entry = netrc.netrc(path).authenticators(netloc) if os.path.exists(path) else None
    except (netrc.NetrcParseError, OSError) as e:
        # Not the parser's message: it quotes the token it choked on, which may be the key.
        why = (f"cannot be parsed (line {e.lineno})" if isinstance(e, netrc.NetrcParseError)
               else f"cannot be read ({e.strerror})")
        return warn(f"no WANDB_API_KEY, and {path} {why}",
                    WJ02_ADVICE + f" Fix {path}: `machine HOST login user password KEY`.")
    if entry and entry[2]:
        return ok(f"{path} has a key for {netloc}")
    return warn(f"no key: WANDB_API_KEY unset and no entry for {netloc} in {path}; "
                "wandb.init would prompt for one", WJ02_ADVICE)


def key_problem(key: str) -> str | None:
    if _JWT.fullmatch(key):
        return None
    secret = key.split("-", 1)[-1]
    if not re.fullmatch(r"[\w-]+", secret):
        return "it holds characters other than letters, digits and underscores"
    if len(secret) < 40:
        return f"{len(secret)} characters where wandb needs 40 or more"
    return None


def base_url(env: dict[str, str]) -> str:
    """WANDB_BASE_URL, else base_url in wandb's settings file (`wandb login --host`)."""
    return (env.get("WANDB_BASE_URL") or _setting(env, "base_url") or DEFAULT_BASE_URL).rstrip("/")


def wandb_mode(env: dict[str, str]) -> str | None:
    mode = env.get("WANDB_MODE") or _setting(env, "mode")
    return mode.strip().lower() if mode else None


def netrc_path(env: dict[str, str]) -> str:
    if env.get("NETRC"):
        return os.path.expanduser(env["NETRC"])
    home = env.get("HOME") or os.path.expanduser("~")
    unix, windows = os.path.join(home, ".netrc"), os.path.join(home, "_netrc")
    return windows if not os.path.exists(unix) and os.path.exists(windows) else unix


def proxy_for(scheme: str, host: str, env: dict[str, str]) -> str | None:
    """The proxy wandb would use for this URL: its own setting, then the usual variables."""
    names = (("WANDB_HTTPS_PROXY", "HTTPS_PROXY", "https_proxy") if scheme == "https"
             else ("WANDB_HTTP_PROXY", "HTTP_PROXY", "http_proxy"))
    proxy = next((env[n] for n in names if env.get(n)), None)
    if not proxy:
        return None
    no_proxy = env.get("NO_PROXY") or env.get("no_proxy")
    if no_proxy and proxy_bypass_environment(host, {"no": no_proxy}):
        return None
    return proxy if "://" in proxy else "http://" + proxy


def _connect_through(proxy: str, host: str, port: int, *, timeout: float) -> int:
    """Asks an HTTP proxy for a tunnel to host:port; returns its status code."""
    p = urlsplit(proxy)
    if not p.hostname:
        raise ConnectionError("the proxy variable names no host")
    secure = p.scheme == "https"
    sock = socket.create_connection((p.hostname, p.port or (443 if secure else 80)),
                                    timeout=timeout)
    if secure:
        sock = ssl.create_default_context().wrap_socket(sock, server_hostname=p.hostname)
    with sock:
        request = f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        if p.username:
            token = f"{unquote(p.username)}:{unquote(p.password or '')}".encode()
            request += f"Proxy-Authorization: Basic {base64.b64encode(token).decode()}\r\n"
        sock.sendall((request + "\r\n").encode())
        answer = b""
        while b"\r\n" not in answer and len(answer) < 4096:
            chunk = sock.recv(1024)
            if not chunk:
                raise ConnectionError("the proxy closed the connection without an answer")
            answer += chunk
        fields = answer.split(b"\r\n", 1)[0].split()
        if len(fields) < 2 or not fields[1].isdigit():
            raise ConnectionError(f"not an HTTP proxy answer: {answer[:60]!r}")
        return int(fields[1])


def _show_proxy(proxy: str) -> str:
    """The proxy without its credentials."""
    p = urlsplit(proxy)
    return f"{p.scheme}://{p.hostname}" + (f":{p.port}" if p.port else "")


def _why(e: OSError) -> str:
    if isinstance(e, socket.gaierror):
        return f"name resolution failed ({e.strerror or e})"
    if isinstance(e, (socket.timeout, TimeoutError)):
        return "no answer (timed out)"
    return e.strerror or str(e) or type(e).__name__


def _exception(stderr: str) -> str | None:
    """The last exception's line of a traceback, with the two lines after it (pydantic's
    errors name the setting there)."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for i in range(len(lines) - 1, -1, -1):
        if re.match(r"[\w.]*(Error|Exception|Interrupt)\b[^ ]*:", lines[i]):
            return " ".join(lines[i:i + 3])[:300]
    return None


def _setting(env: dict[str, str], name: str) -> str | None:
    """A value from wandb's global settings file ($WANDB_CONFIG_DIR/settings or
    ~/.config/wandb/settings, section [default]), which the environment overrides."""
    config_dir = env.get("WANDB_CONFIG_DIR") or os.path.join(
        env.get("HOME") or os.path.expanduser("~"), ".config", "wandb")
    parser = configparser.ConfigParser()
    try:
        parser.read(os.path.join(os.path.expanduser(config_dir), "settings"))
    except (configparser.Error, OSError, UnicodeDecodeError):
        return None
    return parser.get("default", name, fallback=None) or None


def _kill_processes_using(wandb_dir: str) -> None:
    """Kills what the offline run left behind (its service, the system monitor): the processes
    whose WANDB_DIR is this run's own temporary directory."""
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            env = read_environ(int(entry))
            if env and env.get("WANDB_DIR") == wandb_dir:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(int(entry), signal.SIGKILL)
