"""Beats in batches (hangkit.batches): what a node's relay sends once a second, and how the
monitor's collector reads it back. Pure: encoded and decoded in this process."""

from __future__ import annotations

from hangkit.batches import COLUMNS, FULL_EVERY, STATIC_FIELDS, Encoder, beats
from hangkit.monitor.collector import Collector
from hangkit.records import Beat, CollectiveState, WorkerState


def beat(rank: int, step: int, **kw) -> dict:
    b = Beat(pid=100 + rank, host="x3004c0s7b0n0", rank=rank, world_size=8, step=step,
             phase="forward", phase_seconds=0.5, calls=step * 6, since_progress=0.25,
             fields={"loss": 1.5}, collective=CollectiveState("torch", "world", "all_reduce",
                                                             step, True, 2.0),
             dump_file=f"/tmp/hangkit-stacks-{rank}", dump_signal=12, main_ident=7 + rank,
             sent_at=1000.0 + step, **kw)
    return {"type": "beat", **b.to_json()}


SHIMS = [{"rank": 0, "local_rank": 0, "shim_pid": 50, "pid": 100, "alive": True, "exit": None}]


def decoded(message: dict, known: dict[str, Beat]) -> list[tuple[Beat, bool]]:
    return beats(message, known.get)


def test_a_batch_decodes_to_the_beats_it_carries_aged_by_their_wait():
    encoder = Encoder()
    message = encoder.batch([(beat(0, 3), 0.75), (beat(1, 3), 0.0)], SHIMS, host="h")
    (b0, bye0), (b1, _) = decoded(message, {})
    assert not bye0 and (b0.rank, b0.pid, b0.step, b0.host, b0.dump_file) == (
        0, 100, 3, "x3004c0s7b0n0", "/tmp/hangkit-stacks-0")
    # The times it counts grew by how long it waited in the relay; the rest is as sent.
    assert (b0.since_progress, b0.phase_seconds, b0.collective.seconds) == (1.0, 1.25, 2.75)
    assert (b1.since_progress, b1.collective) == (0.25, CollectiveState(
        "torch", "world", "all_reduce", 3, True, 2.0))
    assert b0.fields == {"loss": 1.5} and b0.main_ident == 7


def test_statics_go_once_until_they_change_and_every_full_every_batches():
    encoder = Encoder()
    first = encoder.batch([(beat(0, 1), 0.0)], SHIMS, host="h")
    assert set(first["statics"]) == {"rank 0"} and set(first["statics"]["rank 0"]) == set(
        STATIC_FIELDS)
    second = encoder.batch([(beat(0, 2), 0.0)], SHIMS, host="h")
    # Nothing new of statics, shims or columns: the monitor keeps the node's columns.
    assert second["statics"] == {} and "shims" not in second and "columns" not in second
    # A row without statics is its rank's last beat with the row's values put in...
    known = {"rank 0": decoded(first, {})[0][0]}
    ((b, _),) = beats(second, known.get, first["columns"])
    assert (b.step, b.dump_file, b.host) == (2, "/tmp/hangkit-stacks-0", "x3004c0s7b0n0")
    # ... and waits for statics where the rank is unknown (a monitor that missed a batch).
    assert beats(second, {}.get, first["columns"]) == []
    restarted = beat(0, 0)
    restarted["pid"] = 999  # a restarted rank: its statics go again, whatever they are
    third = encoder.batch([(restarted, 0.0)], SHIMS, host="h")
    assert "rank 0" in third["statics"]
    ((b, _),) = beats(third, known.get, first["columns"])
    assert b.pid == 999
    for _ in range(FULL_EVERY - 3):
        encoder.batch([(beat(0, 5), 0.0)], SHIMS, host="h")
    full = encoder.batch([(beat(0, 6), 0.0)], SHIMS, host="h")
    assert "rank 0" in full["statics"] and full["shims"] == SHIMS and full["columns"]


def test_a_batch_that_did_not_go_out_makes_the_next_one_whole():
    encoder = Encoder()
    encoder.batch([(beat(0, 1), 0.0)], SHIMS, host="h")
    encoder.lost()
    again = encoder.batch([(beat(0, 2), 0.0)], SHIMS, host="h")
    assert "rank 0" in again["statics"] and again["shims"] == SHIMS and again["columns"]


def test_rows_of_a_newer_relay_are_read_without_what_this_version_does_not_know():
    message = Encoder().batch([(beat(0, 1), 0.0)], SHIMS, host="h")
    message["columns"] = [*COLUMNS, "future_field"]
    message["rows"] = [[*row, "new"] for row in message["rows"]]
    message["rows"][0][COLUMNS.index("collective")].append("a newer collective field")
    ((b, _),) = decoded(message, {})
    assert b.step == 1 and b.collective.op == "all_reduce"


def test_goodbyes_and_workers_come_through():
    bye = beat(0, 4, workers=[WorkerState(0, 300, "fetching", index=7)])
    bye["type"] = "bye"
    ((b, is_bye),) = decoded(Encoder().batch([(bye, 0.0)], SHIMS, host="h"), {})
    assert is_bye and b.workers == [WorkerState(0, 300, "fetching", index=7)]


def test_the_collector_takes_batches_and_keeps_the_shims_until_they_change():
    collector, encoder = Collector(), Encoder()
    head = {"host": "x3004c0s7b0n0", "relay_pid": 77, "interval": 1.0}
    for step, now in ((1, 10.0), (2, 11.0)):
        message = encoder.batch([(beat(0, step), 0.0), (beat(1, step), 0.0)], SHIMS, **head)
        collector.ingest_batch(message, now, b"relay")
    (node,) = collector.nodes.values()
    assert node.ranks() == [0] and node.batches == 2  # the shims of the first batch, kept
    statuses = collector.statuses(11.5, stall_after=60, dead_after=5, slow_score=2)
    assert [(s.rank, s.step, s.host, s.pid) for s in statuses] == [
        (0, 2, "x3004c0s7b0n0", 100), (1, 2, "x3004c0s7b0n0", 101)]
    assert collector.tracks["rank 1"].relayed and collector.tracks["rank 0"].alive
