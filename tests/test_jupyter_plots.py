"""The notebook plots: matplotlib Figures from step histories and probe results, under Agg."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("matplotlib")

from matplotlib.figure import Figure  # noqa: E402

from hangkit.jupyter import display as display_module  # noqa: E402
from hangkit.jupyter import plots  # noqa: E402
from hangkit.records import ProbeResult  # noqa: E402
from hangkit.training.runner import PHASES  # noqa: E402

pytestmark = pytest.mark.timeout(60)


def history(rank: int, steps: int = 30, *, slow: float = 0.0, extra: bool = False) -> list[dict]:
    out, t = [], 1000.0
    for step in range(steps):
        phases = {"data": 0.1, "forward": 0.2, "backward": 0.3 + slow, "sync": 0.05,
                  "optimizer": 0.05, "log": 0.01}
        if extra and step % 2 == 0:
            phases["checkpoint"] = 0.5  # an unknown phase, on half the steps
        out.append({"step": step, "epoch": step // 10, "start": t, "phases": phases})
        t += sum(phases.values())
    return out


def histories(n: int = 4, straggler: int = 2) -> dict[int, list[dict]]:
    return {r: history(r, slow=1.0 if r == straggler else 0.0) for r in range(n)}


def png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    data = buffer.getvalue()
    assert data.startswith(b"\x89PNG"), "not a PNG"
    return data


def legend_labels(fig: Figure) -> list[str]:
    legend = fig.axes[0].get_legend()
    return [t.get_text() for t in legend.get_texts()] if legend else []


# -- step times ------------------------------------------------------------------------------

def test_step_times_draws_a_line_per_rank():
    fig = plots.step_times(histories(4))
    ax = fig.axes[0]
    assert len(ax.lines) == 4
    assert legend_labels(fig) == ["rank 0", "rank 1", "rank 2", "rank 3"]
    by_label = {line.get_label(): line for line in ax.lines}
    assert list(by_label["rank 0"].get_xdata()) == list(range(30))
    assert by_label["rank 0"].get_ydata()[0] == pytest.approx(0.71)
    assert by_label["rank 2"].get_ydata()[0] == pytest.approx(1.71)
    assert ax.get_xlabel() == "step" and "step time" in ax.get_ylabel()
    png(fig)


def test_step_times_with_many_ranks_names_only_the_slowest():
    data = {r: history(r, slow=0.01 * r) for r in range(20)}
    data[7] = history(7, slow=2.0)
    fig = plots.step_times(data)
    assert len(fig.axes[0].lines) == 20
    labels = legend_labels(fig)
    assert len(labels) == plots.SLOWEST_NAMED
    assert set(labels) == {"rank 7", "rank 19", "rank 18", "rank 17", "rank 16"}
    png(fig)


def test_step_times_orders_each_ranks_steps():
    data = {0: list(reversed(history(0, steps=5)))}
    line = plots.step_times(data).axes[0].lines[0]
    assert list(line.get_xdata()) == [0, 1, 2, 3, 4]


# -- phase breakdown -------------------------------------------------------------------------

def test_phase_breakdown_stacks_mean_phase_times_per_rank():
    data = histories(3, straggler=1)
    data[0] = history(0, extra=True)
    fig = plots.phase_breakdown(data)
    ax = fig.axes[0]
    phases = list(PHASES) + ["checkpoint"]
    assert legend_labels(fig) == phases  # the runner's order, then the unknown phase
    assert len(ax.patches) == 3 * len(phases)
    containers = {c.get_label(): c for c in ax.containers}
    backward = [bar.get_height() for bar in containers["backward"]]
    assert backward == pytest.approx([0.3, 1.3, 0.3])
    # A phase missing from a step counts 0 s, so the stack's top is the mean step time.
    checkpoint = containers["checkpoint"]
    assert [bar.get_height() for bar in checkpoint] == pytest.approx([0.25, 0.0, 0.0])
    assert checkpoint[0].get_y() + checkpoint[0].get_height() == pytest.approx(0.71 + 0.25)
    assert containers["forward"][1].get_y() == pytest.approx(0.1)  # stacked on "data"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1", "2"]
    png(fig)


def test_phase_order_and_colours():
    data = {0: [{"step": 0, "epoch": 0, "start": 0.0,
                 "phases": {"zeta": 1.0, "log": 0.1, "data": 0.2, "alpha": 0.3}}]}
    assert plots.phase_order(data) == ["data", "log", "zeta", "alpha"]
    colours = plots.phase_colours(["data", "zeta", "alpha"])
    assert colours["data"] == plots.PHASE_COLOURS["data"]
    assert len(set(colours.values())) == 3


# -- phase timeline --------------------------------------------------------------------------

def test_phase_timeline_draws_each_phase_of_the_last_steps_per_rank():
    data = histories(3)
    fig = plots.phase_timeline(data, last=5)
    ax = fig.axes[0]
    assert len(ax.collections) == 3 * len(PHASES)  # one broken_barh per rank and phase
    assert all(len(c.get_paths()) == 5 for c in ax.collections)
    assert legend_labels(fig) == list(PHASES)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["rank 0", "rank 1", "rank 2"]
    # The first span starts at 0: the earliest step shown is the time origin.
    first = ax.collections[0].get_paths()[0].vertices[:, 0]
    assert min(first) == pytest.approx(0.0)
    assert ax.get_xlim()[1] > 5 * 1.71  # rank 2's five slow steps fit
    png(fig)


def test_phase_timeline_places_phases_end_to_end_in_recorded_order():
    data = {0: [{"step": 0, "epoch": 0, "start": 50.0,
                 "phases": {"data": 1.0, "forward": 2.0, "backward": 3.0}}]}
    ax = plots.phase_timeline(data).axes[0]
    spans = {}
    for c in ax.collections:
        xs = c.get_paths()[0].vertices[:, 0]
        spans[c.get_facecolor()[0].tobytes()] = (min(xs), max(xs))
    assert sorted(spans.values()) == [(0.0, 1.0), (1.0, 3.0), (3.0, 6.0)]


# -- probe heatmap ---------------------------------------------------------------------------

RESULTS = [
    ProbeResult("environment", 0, "ok", 0.1, "fine"),
    ProbeResult("environment", 1, "warn", 0.1, "TMPDIR long", "shorten it"),
    ProbeResult("mpi", 0, "timeout", 30.0, "no result"),
    ProbeResult("mpi", 1, "fail", 2.0, "MPI_Init failed"),
    ProbeResult("wandb", 0, "skipped", 0.0, "not installed"),
]


def test_probe_heatmap_colours_cells_by_status_like_the_matrix():
    from matplotlib.colors import to_hex

    fig = plots.probe_heatmap(RESULTS)
    ax = fig.axes[0]
    (image,) = ax.images
    grid = image.get_array()
    assert grid.shape == (2, 3)  # ranks by probes
    colour = {(i, j): to_hex(image.cmap(image.norm(grid[i, j]))) for i in range(2)
              for j in range(3)}
    assert colour[(0, 0)] == plots.PROBE_COLOURS["ok"]
    assert colour[(1, 0)] == plots.PROBE_COLOURS["warn"]
    assert colour[(0, 1)] == plots.PROBE_COLOURS["timeout"]
    assert colour[(1, 1)] == plots.PROBE_COLOURS["fail"]
    assert colour[(0, 2)] == plots.PROBE_COLOURS["skipped"]
    assert colour[(1, 2)] == plots.MISSING_COLOUR
    assert legend_labels(fig) == ["ok", "warn", "fail", "timeout", "skipped"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["environment", "mpi", "wandb"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["rank 0", "rank 1"]
    assert sorted(t.get_text() for t in ax.texts) == sorted(["ok", "WARN", "TIMEOUT", "FAIL",
                                                             "skip"])
    png(fig)


def test_heatmap_and_matrix_share_one_palette():
    pytest.importorskip("ipywidgets")
    from hangkit.jupyter import probe_matrix

    assert probe_matrix.COLOURS is plots.PROBE_COLOURS is display_module.PROBE_COLOURS


def test_probe_heatmap_of_a_run_without_ranks():
    fig = plots.probe_heatmap([ProbeResult("environment", None, "ok", 0.1, "fine"),
                               ProbeResult("shm", None, "error", 0.1, "crashed")])
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["this node"]
    assert legend_labels(fig) == ["ok", "error"]
    png(fig)


# -- empty input, PNG, no pyplot -------------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda: plots.step_times({}),
    lambda: plots.step_times({0: [], 1: []}),
    lambda: plots.phase_breakdown({}),
    lambda: plots.phase_breakdown({3: []}),
    lambda: plots.phase_timeline({}),
    lambda: plots.phase_timeline(histories(2), last=0),
    lambda: plots.probe_heatmap([]),
], ids=["steps", "steps-empty-ranks", "breakdown", "breakdown-empty-rank", "timeline",
        "timeline-last-0", "heatmap"])
def test_empty_input_says_no_data(make):
    fig = make()
    assert isinstance(fig, Figure)
    assert [t.get_text() for t in fig.axes[0].texts] == ["no data"]
    png(fig)


@pytest.mark.parametrize("make", [plots.step_times, plots.phase_breakdown,
                                  plots.phase_timeline])
def test_history_figures_save_as_png(make):
    data = histories(8)
    data[5] = history(5, extra=True)
    assert len(png(make(data))) > 1000


def test_plots_need_no_pyplot():
    code = textwrap.dedent("""
        import io, sys
        from hangkit.jupyter import plots
        from hangkit.records import ProbeResult
        h = {0: [{"step": 0, "epoch": 0, "start": 0.0, "phases": {"data": 0.1}}]}
        for fig in (plots.step_times(h), plots.phase_breakdown(h), plots.phase_timeline(h),
                    plots.probe_heatmap([ProbeResult("x", 0, "ok", 0.1, "")])):
            fig.savefig(io.BytesIO(), format="png")
        assert "matplotlib.pyplot" not in sys.modules, "pyplot was imported"
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=50, env={**os.environ, "MPLBACKEND": "Agg"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_figures_show_as_png_in_a_kernel_without_pyplot(monkeypatch):
    import IPython
    from IPython.core.formatters import PNGFormatter

    class Shell:
        class display_formatter:  # named as the attribute of IPython's shell
            formatters = {"image/png": PNGFormatter()}

    shell = Shell()
    monkeypatch.setattr(IPython, "get_ipython", lambda: shell)
    fig = plots.step_times(histories(2))
    formatter = shell.display_formatter.formatters["image/png"]
    assert formatter(fig).startswith(b"\x89PNG")
    # A formatter already there (the inline backend's, ipympl's) is left alone.
    mine = formatter.lookup_by_type(Figure)
    display_module.register_figure_png()
    assert formatter.lookup_by_type(Figure) is mine
