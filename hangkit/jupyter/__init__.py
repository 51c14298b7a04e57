"""The Jupyter layer: MPI engines from a notebook, a live dashboard, probe matrices, plots.

    from hangkit.jupyter import EngineCluster
    cluster = EngineCluster(4).start()
    cluster.dashboard(total_steps=100)

Needs the `jupyter` extra (ipyparallel, ipywidgets, matplotlib); names load on first use.
`%load_ext hangkit.jupyter` registers the `%%hk` cell magic (hangkit/jupyter/magic.py).
`attach(pid or PBS job id)` looks at a running job hangkit did not start (attach_view.py).
"""

from __future__ import annotations

import importlib
import sys

_EXPORTS = {
    "EngineCluster": "cluster", "RankTasks": "cluster", "ClusterStartError": "cluster",
    "doctor_results": "cluster", "Dashboard": "dashboard", "LiveDashboard": "live",
    "ProbeMatrix": "probe_matrix", "show_report": "report_view", "plots": None,
    "attach": "attach_view",
}

__all__ = sorted(_EXPORTS)


def load_ipython_extension(ipython) -> None:
    """`%load_ext hangkit.jupyter`: registers `%%hk`. Bad options are one line, not a
    traceback."""
    from hangkit.errors import HangkitError
    from hangkit.jupyter.magic import run_cell

    def hk(line: str, cell: str):
        try:
            return run_cell(line, cell)
        except HangkitError as e:
            print(f"hangkit: error: {e.one_line()}", file=sys.stderr)
            return None

    ipython.register_magic_function(hk, magic_kind="cell", magic_name="hk")


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hangkit.jupyter' has no attribute {name!r}")
    module = importlib.import_module(f"hangkit.jupyter.{_EXPORTS[name] or name}")
    return module if _EXPORTS[name] is None else getattr(module, name)
