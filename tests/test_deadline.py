"""hangkit.deadline: the one primitive every wait in hangkit goes through. Real threads, blocked
on real events; a blocked call is released at the end of each test so nothing outlives it."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from hangkit import deadline
from hangkit.deadline import DeadlineExceeded
from hangkit.errors import HangkitError


@pytest.fixture
def release():
    """Events the blocked calls of a test wait on, all set when the test ends."""
    events: list[threading.Event] = []

    def make() -> threading.Event:
        events.append(threading.Event())
        return events[-1]

    yield make
    for e in events:
        e.set()


def test_returns_the_value():
    assert deadline.call(lambda: 42, timeout=30, name="answer") == 42


def test_raises_what_the_call_raised_with_its_traceback():
    def fails():
        raise KeyError("missing")

    with pytest.raises(KeyError, match="missing") as caught:
        deadline.call(fails, timeout=30, name="failing")
    assert caught.traceback[-1].name == "fails"


def test_a_base_exception_reaches_the_caller_too():
    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        deadline.call(interrupted, timeout=30, name="interrupted")


def test_timeout_raises_and_leaves_a_named_daemon_thread(release):
    never = release()
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded) as caught:
        deadline.call(never.wait, timeout=0.2, name="blocked call")
    waited = time.monotonic() - started
    assert waited >= 0.2
    e = caught.value
    assert isinstance(e, TimeoutError) and isinstance(e, HangkitError)
    assert (e.what, e.seconds) == ("blocked call", 0.2)
    assert str(e) == "blocked call did not finish within 0.2 s"
    (left,) = [a for a in deadline.abandoned() if a.name == "blocked call"]
    assert left.thread.daemon and left.thread.is_alive()
    assert left.thread.name == "hangkit-deadline: blocked call"
    never.set()
    left.thread.join(30)
    assert not [a for a in deadline.abandoned() if a.name == "blocked call"]


def test_on_timeout_runs_at_the_deadline_and_its_failure_is_logged(release, caplog):
    never = release()
    calls = []

    def clean_up():
        calls.append(never.is_set())
        raise OSError("cannot kill it")

    with caplog.at_level(logging.WARNING, logger="hangkit.deadline"), \
            pytest.raises(DeadlineExceeded):
        deadline.call(never.wait, timeout=0.1, name="stuck service", on_timeout=clean_up)
    assert calls == [False]
    assert "cleaning up after stuck service failed: OSError: cannot kill it" in caplog.text


def test_error_chooses_the_subclass_raised(release):
    class ServiceTimeout(DeadlineExceeded):
        pass

    with pytest.raises(ServiceTimeout, match="service did not finish within 0.1 s"):
        deadline.call(release().wait, timeout=0.1, name="service", error=ServiceTimeout)


def test_negative_timeout_gives_up_at_once(release):
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        deadline.call(release().wait, timeout=-1, name="no time")
    assert time.monotonic() - started < 10  # did not wait for the call


def test_started_call_runs_meanwhile_and_keeps_its_own_deadline(release):
    gate = release()
    pending = deadline.start(lambda: gate.wait(30) and "done", timeout=30, name="meanwhile")
    assert not pending.done()
    gate.set()  # the caller did other work; the call ran beside it
    assert pending.result() == "done"
    assert pending.done()

    stuck = deadline.start(release().wait, timeout=0, name="late")  # its deadline is over
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        stuck.result()
    assert time.monotonic() - started < 10  # the deadline was already over: no more waiting


def test_nested_calls_each_keep_their_deadline(release):
    inner_gate = release()

    def outer():
        with pytest.raises(DeadlineExceeded):
            deadline.call(inner_gate.wait, timeout=0.1, name="inner")
        return deadline.call(lambda: "inner done", timeout=30, name="inner 2")

    assert deadline.call(outer, timeout=30, name="outer") == "inner done"
    assert [a.name for a in deadline.abandoned() if a.name.startswith("inner")] == ["inner"]


def test_call_all_waits_for_each_until_its_own_deadline(release):
    never = release()
    started = time.monotonic()
    got = deadline.call_all({
        "quick": (lambda: 1, 30),
        "failing": (lambda: 1 / 0, 30),
        "stuck": (never.wait, 0.2),
    })
    assert time.monotonic() - started < 30  # the stuck one cost its own 0.2 s, not more
    assert got["quick"] == 1
    assert isinstance(got["failing"], ZeroDivisionError)
    assert isinstance(got["stuck"], DeadlineExceeded) and got["stuck"].seconds == 0.2
