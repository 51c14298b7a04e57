"""The rank side: progress beacons, the sidecar thread, collective counting; and engine.py,
what an ipyparallel engine runs for the notebook (imported by the engines when asked).

Imports only the stdlib at import time (pyzmq when the agent starts, torch and mpi4py when
instrument() is called), so `hangkit.progress` costs nothing to import in a training script.
"""

from hangkit.agent.beacon import progress, publish, publish_workers
from hangkit.agent.instrument import instrument
from hangkit.agent.sidecar import current_agent, start_agent, stop_agent

__all__ = ["current_agent", "instrument", "progress", "publish", "publish_workers", "start_agent",
           "stop_agent"]
