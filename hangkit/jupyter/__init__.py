"""The Jupyter layer: MPI engines from a notebook, a live dashboard, probe matrices, plots.

    from hangkit.jupyter import EngineCluster
    cluster = EngineCluster(4).start()
    cluster.dashboard(total_steps=100)

Needs the `jupyter` extra (ipyparallel, ipywidgets, matplotlib); names load on first use.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "EngineCluster": "cluster", "RankTasks": "cluster", "ClusterStartError": "cluster",
    "doctor_results": "cluster", "Dashboard": "dashboard", "LiveDashboard": "live",
    "ProbeMatrix": "probe_matrix", "plots": None,
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hangkit.jupyter' has no attribute {name!r}")
    module = importlib.import_module(f"hangkit.jupyter.{_EXPORTS[name] or name}")
    return module if _EXPORTS[name] is None else getattr(module, name)
