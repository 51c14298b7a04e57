"""Which rank a process is, from the variables launchers set. Used by the agent and the monitor."""

from __future__ import annotations

# The variables' names live in bootstrap.py, which every process of a watched job runs.
from hangkit.bootstrap import (
    LOCAL_RANK_VARIABLES,
    RANK_VARIABLES,
    SIZE_VARIABLES,
    TORCHRUN_VARIABLE,
)

_TORCHRUN_OWN = ("RANK", "WORLD_SIZE", "LOCAL_RANK")

__all__ = ["LOCAL_RANK_VARIABLES", "RANK_VARIABLES", "SIZE_VARIABLES", "local_rank_from_environ",
           "rank_from_environ", "world_size_from_environ"]


def _first_int(env: dict[str, str] | None, names: tuple[str, ...]) -> int | None:
    if (env or {}).get(TORCHRUN_VARIABLE) and names[-1] in _TORCHRUN_OWN:
        names = (names[-1], *names[:-1])  # torchrun's own, over an mpiexec's around it
    for name in names:
        value = (env or {}).get(name)
        if value is not None and value.strip().isdigit():
            return int(value)
    return None


def rank_from_environ(env: dict[str, str] | None) -> int | None:
    """The launcher's rank; for Lightning's spawned ranks (LOCAL_RANK and NODE_RANK, no RANK)
    on its first node, the local rank. Elsewhere their number comes from the process group,
    which the agent reads."""
    rank = _first_int(env, RANK_VARIABLES)
    if rank is None and (env or {}).get("NODE_RANK", "").strip() == "0":
        return _first_int(env, ("LOCAL_RANK",))
    return rank


def world_size_from_environ(env: dict[str, str] | None) -> int | None:
    return _first_int(env, SIZE_VARIABLES)


def local_rank_from_environ(env: dict[str, str] | None) -> int | None:
    return _first_int(env, LOCAL_RANK_VARIABLES)
