"""The main thread holds the GIL inside one long C call, so the sidecar thread can never run:
its stacks come from the faulthandler signal. Records its pid, then blocks for good."""

from hangprog import record_pid

import hangkit


def hold_the_gil():
    return sum(range(10**13))  # one C call: the GIL is never released between bytecodes


hangkit.progress(step=0, phase="compute")
hangkit.agent.current_agent().reported.wait(30)  # the monitor must know this rank first
record_pid()
hold_the_gil()
