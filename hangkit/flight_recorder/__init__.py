"""torch's Flight Recorder, read for the user: what it holds (dumps), merged across ranks per
process group (view), the diagnosis rules on that view (rules), the variables that turn it on
(environment), and `hangkit explain` on dumps and reports (explain).

The rank's side, which dumps it, is hangkit.agent.recorder. None of this imports torch.
"""
