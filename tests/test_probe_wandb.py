"""The doctor's wandb probe against the real wandb: an offline run, the server's reachability
(directly, through a proxy) and where the API key comes from. Needs wandb (the dev extra);
the W&B servers are never reached: the server is a closed local port or a local proxy."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading

import pytest
from conftest import doctor_where_missing

from hangkit.probes.runner import run_doctor

FAKE_KEY = "hangkitfakekey0123456789abcdef0123456789ab"  # 42 characters, the format wandb takes
WANDB_VARIABLES = ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "WANDB_CONFIG_DIR",
                   "WANDB_IDENTITY_TOKEN_FILE", "WANDB_HTTPS_PROXY", "WANDB_HTTP_PROXY",
                   "WANDB_DIR", "NETRC", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY",
                   "http_proxy", "NO_PROXY", "no_proxy")


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """The doctor's children see no wandb settings, no proxy and an empty home (no .netrc)."""
    for name in WANDB_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


@pytest.fixture
def closed_port():
    """A port bound but not listening: connecting to it is refused, and nobody else gets it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def wandb_result(timeout: float = 30):
    (result,) = run_doctor("wandb", timeout=timeout)
    return result


def part(result, name: str) -> dict:
    return result.data["parts"][name]


def test_skipped_where_wandb_is_not_installed(tmp_path):
    result = doctor_where_missing("wandb", "wandb", tmp_path)
    assert (result["status"], result["detail"]) == ("skipped", "wandb is not installed"), result


def test_offline_run_works_and_an_unreachable_server_warns_wj01(clean_env, monkeypatch,
                                                                closed_port):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{closed_port}")
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    result = wandb_result()
    assert part(result, "offline")["status"] == "ok", result
    assert result.data["offline_seconds"] > 0 and result.data["wandb_version"]
    online = part(result, "online")
    assert online["status"] == "warn", result
    assert f"127.0.0.1:{closed_port}" in online["detail"] and "refused" in online["detail"]
    assert result.status == "warn" and "WJ-01" in result.advice
    assert "WANDB_MODE=offline" in result.advice and "wandb sync" in result.advice
    assert result.data["online_seconds"] < 2, "a refused connection needs no waiting"


def test_the_real_server_is_unreachable_from_here_and_warns_wj01(clean_env, monkeypatch):
    pytest.importorskip("wandb")
    try:
        socket.create_connection(("api.wandb.ai", 443), timeout=3).close()
        pytest.skip("this machine reaches api.wandb.ai")
    except OSError:
        pass
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    result = wandb_result()
    online = part(result, "online")
    assert online["status"] == "warn" and "https://api.wandb.ai unreachable" in online["detail"]
    assert "WJ-01" in result.advice


def test_a_dead_proxy_is_tried_instead_of_the_server_and_warns_quickly(clean_env, monkeypatch,
                                                                       closed_port):
    pytest.importorskip("wandb")
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{closed_port}")
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    result = wandb_result()
    online = part(result, "online")
    assert online["status"] == "warn", result
    assert f"proxy http://127.0.0.1:{closed_port}" in online["detail"], online
    assert "WJ-01" in result.advice
    assert result.data["online_seconds"] < 2, "a refused connection needs no waiting"


class ConnectProxy:
    """The edge we cannot run here, the site's proxy: a local server that answers CONNECT with
    200 and records exactly what it was asked."""

    def __init__(self):
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.requests: list[bytes] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        try:
            conn, _ = self.server.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(10)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                data += chunk
            self.requests.append(data)
            conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")

    def close(self):
        self.server.close()
        self.thread.join(timeout=10)


def test_a_proxy_that_opens_the_tunnel_makes_the_server_reachable(clean_env, monkeypatch):
    pytest.importorskip("wandb")
    proxy = ConnectProxy()
    try:
        monkeypatch.setenv("https_proxy", f"http://alice:s3cr3tpw@127.0.0.1:{proxy.port}")
        monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
        result = wandb_result()
    finally:
        proxy.close()
    online = part(result, "online")
    assert online["status"] == "ok", result
    assert f"through proxy http://127.0.0.1:{proxy.port}" in online["detail"]
    (request,) = proxy.requests
    assert request.startswith(b"CONNECT api.wandb.ai:443 HTTP/1.1\r\n"), request
    assert b"Proxy-Authorization: Basic " in request
    assert "s3cr3tpw" not in json.dumps(result.to_json()), "proxy password shown"
    assert result.status == "ok", result


def test_no_api_key_warns_wj02(clean_env, monkeypatch, closed_port):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{closed_port}")
    result = wandb_result()
    key = part(result, "api key")
    assert key["status"] == "warn", result
    assert "WANDB_API_KEY unset" in key["detail"] and ".netrc" in key["detail"]
    assert "WJ-02" in result.advice and "wandb login" in result.advice


def test_a_key_in_the_environment_is_ok_and_never_shown(clean_env, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    result = wandb_result()
    assert part(result, "api key") == {
        "status": "ok", "detail": f"WANDB_API_KEY is set ({len(FAKE_KEY)} characters)"}
    assert FAKE_KEY not in json.dumps(result.to_json())
    assert "WJ-02" not in (result.advice or "")


def test_a_key_in_netrc_for_the_server_is_found(clean_env):
    pytest.importorskip("wandb")
    netrc = clean_env / ".netrc"
    netrc.write_text(f"machine api.wandb.ai\n  login user\n  password {FAKE_KEY}\n")
    netrc.chmod(0o600)
    result = wandb_result()
    assert part(result, "api key") == {
        "status": "ok", "detail": f"{netrc} has a key for api.wandb.ai"}
    assert FAKE_KEY not in json.dumps(result.to_json())


def test_a_malformed_key_warns_without_showing_it(clean_env, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_API_KEY", "tooshort123")
    result = wandb_result()
    key = part(result, "api key")
    assert key["status"] == "warn" and "11 characters where wandb needs 40" in key["detail"]
    assert "tooshort123" not in json.dumps(result.to_json())


def test_offline_mode_needs_neither_network_nor_key(clean_env, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    result = wandb_result()
    assert result.status == "ok", result
    assert part(result, "online")["detail"] == "not needed (WANDB_MODE=offline)"
    assert part(result, "api key")["detail"] == "not needed (WANDB_MODE=offline)"


def test_an_offline_run_cut_by_the_deadline_is_a_timeout_and_leaves_nothing(
        clean_env, monkeypatch, closed_port):
    # 1.6 s leaves the offline run about half a second: in wandb's import or init, never done.
    # wandb's service starts a session of its own; the autouse fixture fails this test if it
    # (or anything else started) outlives the probe.
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{closed_port}")
    result = wandb_result(timeout=1.6)
    assert result.status == "timeout", result
    assert "did not finish within" in result.detail


def test_what_an_offline_run_leaves_behind_is_found_by_its_wandb_dir(tmp_path):
    # wandb's service and system monitor start sessions of their own, so killing the sub-child's
    # session misses them (and the monitor outlives a parent that stays a zombie). The probe
    # finds them by the run's own WANDB_DIR; here a real process stands in for them.
    from hangkit.probes.wandb import _kill_processes_using

    wandb_dir = str(tmp_path / "hangkit-wandb-x")
    other = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE, start_new_session=True,
                             env={**os.environ, "WANDB_DIR": wandb_dir + "-other"})
    left = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                            stdin=subprocess.PIPE, start_new_session=True,
                            env={**os.environ, "WANDB_DIR": wandb_dir})
    try:
        _kill_processes_using(wandb_dir)
        assert left.wait(timeout=10) == -9
        assert other.poll() is None, "a process of another run was killed"
    finally:
        for p in (other, left):
            p.stdin.close()
            p.wait(timeout=10)


def test_an_offline_run_that_wandb_rejects_fails_naming_the_setting(clean_env, monkeypatch):
    # wandb validates its settings even offline: the job itself would fail the same way.
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:notaport")
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    result = wandb_result()
    assert result.status == "fail", result
    offline = part(result, "offline")
    assert offline["status"] == "fail" and "base_url" in offline["detail"], offline
    assert "WJ-03" in result.advice and "WANDB_MODE=disabled" in result.advice
    assert part(result, "online")["status"] == "warn"  # the URL cannot even be parsed
