"""Plots of per-step timing and of the doctor's results: matplotlib Figures built with the
object-oriented API, so they need no pyplot state and work under Agg (and in CI).

The step runner publishes each rank's history as `histories[rank]`, a list of::

    {"step": int, "epoch": int, "start": time.time(), "phases": {phase: seconds}}

where a step's time is the sum of its phases. Empty input gives a figure saying "no data".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from statistics import fmean

from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from hangkit.jupyter.display import PROBE_COLOURS, register_figure_png
from hangkit.probes.report import CELL
from hangkit.records import PROBE_STATUSES, ProbeResult
from hangkit.training.runner import PHASES

Histories = Mapping[int, Sequence[dict]]

LEGEND_RANKS = 10  # beyond this many ranks only the slowest are named in the legend
SLOWEST_NAMED = 5
MISSING_COLOUR = "#ffffff"
# Fixed colours for the runner's phases, so "backward" looks the same in every plot.
PHASE_COLOURS = dict(zip(PHASES, ("#8c564b", "#1f77b4", "#ff7f0e", "#d62728", "#2ca02c",
                                  "#7f7f7f")))
_EXTRA_COLOURS = ("#9467bd", "#e377c2", "#bcbd22", "#17becf", "#aec7e8", "#ffbb78")


def _figure(width: float = 8.0, height: float = 4.0) -> tuple[Figure, object]:
    register_figure_png()
    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.add_subplot()


def _no_data(title: str) -> Figure:
    fig, ax = _figure(6, 2)
    ax.text(0.5, 0.5, "no data", ha="center", va="center", fontsize=14, color="grey")
    ax.set_title(title)
    ax.set_axis_off()
    return fig


def _step_seconds(entry: dict) -> float:
    return float(sum((entry.get("phases") or {}).values()))


def _nonempty(histories: Histories) -> dict[int, list[dict]]:
    return {rank: list(h) for rank, h in sorted(histories.items()) if h}


def phase_order(histories: Histories) -> list[str]:
    """The runner's phases that occur, in its order, then any others in order of appearance."""
    seen: dict[str, None] = {}
    for history in histories.values():
        for entry in history:
            seen.update(dict.fromkeys(entry.get("phases") or {}))
    return [p for p in PHASES if p in seen] + [p for p in seen if p not in PHASES]


def phase_colours(phases: Sequence[str]) -> dict[str, str]:
    extra = [p for p in phases if p not in PHASE_COLOURS]
    colours = {p: _EXTRA_COLOURS[i % len(_EXTRA_COLOURS)] for i, p in enumerate(extra)}
    return {p: PHASE_COLOURS.get(p) or colours[p] for p in phases}


def step_times(histories: Histories) -> Figure:
    """Each rank's step time over the steps, one line per rank: a straggler's line sits above
    the others. With many ranks the legend names only the slowest."""
    title = "Step time per rank"
    data = _nonempty(histories)
    if not data:
        return _no_data(title)
    fig, ax = _figure()
    means = {rank: fmean(_step_seconds(e) for e in h) for rank, h in data.items()}
    named = set(data) if len(data) <= LEGEND_RANKS else set(
        sorted(means, key=means.get, reverse=True)[:SLOWEST_NAMED])
    for rank, history in data.items():
        history = sorted(history, key=lambda e: e["step"])
        many = rank not in named
        # An underscore label keeps a rank out of the legend; the unnamed are drawn quietly.
        ax.plot([e["step"] for e in history], [_step_seconds(e) for e in history],
                label=f"rank {rank}" if not many else f"_rank {rank}",
                color="#b0b0b0" if many else None, linewidth=0.8 if many else 1.5,
                zorder=1 if many else 2)
    ax.set_xlabel("step")
    ax.set_ylabel("step time (s)")
    ax.set_title(title if len(named) == len(data) else f"{title} (slowest {len(named)} named)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    ax.grid(alpha=0.3)
    return fig


def phase_breakdown(histories: Histories) -> Figure:
    """Mean seconds per phase per rank, stacked: each bar's height is the rank's mean step
    time (a step without a phase counts 0 s for it), and its segments say where time goes."""
    title = "Mean time per phase"
    data = _nonempty(histories)
    if not data:
        return _no_data(title)
    phases = phase_order(data)
    colours = phase_colours(phases)
    ranks = list(data)
    fig, ax = _figure(max(6.0, 0.35 * len(ranks) + 2), 4)
    x = list(range(len(ranks)))
    bottom = [0.0] * len(ranks)
    for phase in phases:
        heights = [fmean(float((e.get("phases") or {}).get(phase, 0.0)) for e in data[r])
                   for r in ranks]
        ax.bar(x, heights, bottom=bottom, label=phase, color=colours[phase])
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_xticks(x, [str(r) for r in ranks], **({"fontsize": "small"} if len(ranks) > 16 else {}))
    ax.set_xlabel("rank")
    ax.set_ylabel("seconds per step")
    ax.set_title(title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    return fig


def phase_timeline(histories: Histories, last: int = 20) -> Figure:
    """The last `last` steps of each rank along wall time, one colour per phase: a rank whose
    "data" bar runs long, or whose "sync" the others sit in, shows where the time went.
    Phases are laid end to end from each step's start, in the order the step recorded them."""
    title = f"Last {last} steps along wall time"
    data = {rank: sorted(h, key=lambda e: e["start"])[-last:]
            for rank, h in _nonempty(histories).items()} if last > 0 else {}
    if not data:
        return _no_data(title)
    phases = phase_order(data)
    colours = phase_colours(phases)
    t0 = min(e["start"] for h in data.values() for e in h)
    fig, ax = _figure(9, max(2.5, 0.3 * len(data) + 1.5))
    for row, history in enumerate(data.values()):
        spans: dict[str, list[tuple[float, float]]] = {p: [] for p in phases}
        for entry in history:
            at = entry["start"] - t0
            for phase, seconds in (entry.get("phases") or {}).items():
                spans[phase].append((at, float(seconds)))
                at += float(seconds)
        for phase in phases:
            if spans[phase]:
                ax.broken_barh(spans[phase], (row - 0.4, 0.8), facecolors=colours[phase])
    ax.set_yticks(range(len(data)), [f"rank {r}" for r in data])
    ax.invert_yaxis()  # rank 0 on top, as in the dashboard
    ax.set_xlabel("seconds since the first step shown")
    ax.set_title(title)
    ax.legend(handles=[Patch(color=colours[p], label=p) for p in phases],
              loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    return fig


def probe_heatmap(results: Sequence[ProbeResult]) -> Figure:
    """The doctor's results, ranks by probes, coloured as in the ProbeMatrix widget."""
    title = "Doctor: probes by rank"
    if not results:
        return _no_data(title)
    statuses = list(PROBE_STATUSES) + [s for s in PROBE_COLOURS if s not in PROBE_STATUSES]
    statuses += sorted({r.status for r in results} - set(statuses))
    index = {s: i for i, s in enumerate(statuses)}
    names = list(dict.fromkeys(r.name for r in results))
    ranks = sorted({r.rank for r in results}, key=lambda k: (k is not None, k or 0))
    by_cell = {(r.name, r.rank): r for r in results}
    # Missing cells get the last colour (white), past every status.
    missing = len(statuses)
    grid = [[index[by_cell[(n, k)].status] if (n, k) in by_cell else missing for n in names]
            for k in ranks]
    cmap = ListedColormap([PROBE_COLOURS.get(s, "#000000") for s in statuses] + [MISSING_COLOUR])
    fig, ax = _figure(max(5.0, 0.9 * len(names) + 2.5), max(2.5, 0.3 * len(ranks) + 1.5))
    ax.imshow(grid, cmap=cmap, vmin=-0.5, vmax=missing + 0.5, aspect="auto",
              interpolation="nearest")
    if len(names) * len(ranks) <= 400:  # words in the cells for colour-blind readers
        for i, k in enumerate(ranks):
            for j, n in enumerate(names):
                r = by_cell.get((n, k))
                if r is not None:
                    ax.text(j, i, CELL.get(r.status, r.status), ha="center", va="center",
                            fontsize="x-small",
                            color="black" if r.status in ("warn", "skipped") else "white")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(ranks)), ["this node" if k is None else f"rank {k}" for k in ranks])
    ax.set_title(title)
    present = [s for s in statuses if any(r.status == s for r in results)]
    ax.legend(handles=[Patch(color=PROBE_COLOURS.get(s, "#000000"), label=s) for s in present],
              loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    return fig
