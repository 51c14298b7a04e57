"""Which rank a process is, from the variables launchers set. Used by the agent and the monitor."""

from __future__ import annotations

# Variables that carry a process's rank, in the order launchers are checked.
RANK_VARIABLES = ("PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK", "PALS_RANKID", "RANK")
SIZE_VARIABLES = ("PMI_SIZE", "PMIX_SIZE", "OMPI_COMM_WORLD_SIZE", "PALS_SIZE", "WORLD_SIZE")
# A process's rank on its own node (which GPU it takes).
LOCAL_RANK_VARIABLES = ("PALS_LOCAL_RANKID", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK",
                        "LOCAL_RANK")


def _first_int(env: dict[str, str] | None, names: tuple[str, ...]) -> int | None:
    for name in names:
        value = (env or {}).get(name)
        if value is not None and value.strip().isdigit():
            return int(value)
    return None


def rank_from_environ(env: dict[str, str] | None) -> int | None:
    return _first_int(env, RANK_VARIABLES)


def world_size_from_environ(env: dict[str, str] | None) -> int | None:
    return _first_int(env, SIZE_VARIABLES)


def local_rank_from_environ(env: dict[str, str] | None) -> int | None:
    return _first_int(env, LOCAL_RANK_VARIABLES)
