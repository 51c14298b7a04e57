"""Progress beats from the transformers Trainer: `Trainer(..., callbacks=[HangkitCallback()])`.

Each event says which phase of the loop the rank enters next, so a stalled rank's last beat
names where it stopped: `data` (the next batches are being fetched), `train` (forward and
backward of a step or of a gradient-accumulation micro-batch), `optimizer`, `log` (the loss
is gathered from every rank), `evaluate` (also prediction), `checkpoint`; and `idle` once
`train()` (or a lone `evaluate()` or `predict()`) is over, so that what the script does
afterwards, which no event reports, is never taken for a stall (the output timeout still
applies). The step is `state.global_step` (optimizer steps done), the epoch `state.epoch`
(fractional: how far into the epoch).

What follows a step is known from the TrainerControl the Trainer's own flow callback has just
set (it runs before any callback the user adds): log, then evaluate, then save, each only
when its flag is up.
"""

from __future__ import annotations

import logging

from hangkit.agent import progress

try:
    from transformers import TrainerCallback
except ModuleNotFoundError as e:
    if e.name != "transformers":
        raise  # an installed transformers missing a dependency: its own error says which
    raise ImportError("hangkit.integrations.transformers needs the transformers Trainer: "
                      "pip install transformers", name="transformers") from None

log = logging.getLogger(__name__)

IDLE = "idle"  # the monitor never stalls a rank in this phase (monitor/collector.py)


class HangkitCallback(TrainerCallback):
    """Reports the Trainer's progress with `hangkit.progress()`: one line in the Trainer's
    callbacks, no loop of your own. Costs about a microsecond an event, and never raises into
    training."""

    def __init__(self):
        super().__init__()
        # Whether train() is running: after a lone evaluate() the rank goes back to the
        # script, not to the next batch.
        self.training = False

    def _beat(self, state, phase: str) -> None:
        try:
            progress(step=state.global_step, phase=phase, epoch=state.epoch)
        except Exception:  # a state without these attributes must not end the training
            log.debug("no progress beat for phase %s", phase, exc_info=True)

    def _next(self, state, control, otherwise: str = "data") -> None:
        """The phase after a step, a log, an evaluation or a save, from what is still to do."""
        try:
            if not self.training:
                phase = "evaluate" if control.should_evaluate else IDLE
            elif control.should_log:
                phase = "log"
            elif control.should_evaluate:
                phase = "evaluate"
            elif control.should_save:
                phase = "checkpoint"
            else:
                phase = otherwise
        except Exception:
            phase = otherwise
        self._beat(state, phase)

    def on_train_begin(self, args, state, control, **kwargs):
        self.training = True
        self._beat(state, "evaluate" if getattr(args, "eval_on_start", False) else "data")

    def on_epoch_begin(self, args, state, control, **kwargs):
        self._beat(state, "data")

    def on_step_begin(self, args, state, control, **kwargs):
        self._beat(state, "train")

    def on_substep_end(self, args, state, control, **kwargs):
        self._beat(state, "train")  # the next micro-batch of the same step

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._beat(state, "optimizer")

    def on_step_end(self, args, state, control, **kwargs):
        self._next(state, control)

    def on_log(self, args, state, control, **kwargs):
        self._next(state, control)

    def on_prediction_step(self, args, state, control, **kwargs):
        self._beat(state, "evaluate")

    def on_evaluate(self, args, state, control, **kwargs):
        self._next(state, control)

    def on_predict(self, args, state, control, **kwargs):
        self._next(state, control)

    def on_save(self, args, state, control, **kwargs):
        self._next(state, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._next(state, control, otherwise="epoch-end")

    def on_train_end(self, args, state, control, **kwargs):
        self.training = False
        self._beat(state, IDLE)


__all__ = ["HangkitCallback"]
