"""Progress beats from PyTorch Lightning: `Trainer(callbacks=[HangkitCallback()])`.

Each hook says which phase of the loop the rank enters next, so a stalled rank's last beat
names where it stopped: `data` (the next batch is being fetched: Lightning fetches it between
`on_train_batch_end` and `on_train_batch_start`), `train` (training_step's forward), `backward`,
`optimizer`, `validate` (or `sanity-check`), `checkpoint`, `epoch-end`, `test`, `predict`,
`setup`; and `idle` once a `fit`, `validate`, `test` or `predict` is over, so that what the
script does afterwards, which no hook reports, is never taken for a stall (the output timeout
still applies). The step is `trainer.global_step` (optimizer steps done), the epoch
`trainer.current_epoch`.
"""

from __future__ import annotations

import importlib
import logging
import sys

from hangkit.agent import progress

log = logging.getLogger(__name__)

# The two names Lightning is installed under; the first is the current one.
PACKAGES = ("lightning.pytorch", "pytorch_lightning")
INSTALL = ("hangkit.integrations.lightning needs PyTorch Lightning: pip install lightning "
           "(or pip install pytorch-lightning)")


def _callback_base() -> type:
    """The Callback class of the Lightning the job uses. Lightning does not support mixing
    the two packages' objects, so where both are installed the one already imported (the
    script's Trainer's) wins."""
    for name in PACKAGES:
        if name in sys.modules and not any(o in sys.modules for o in PACKAGES if o != name):
            return sys.modules[name].Callback
    for name in PACKAGES:
        try:
            return importlib.import_module(name).Callback
        except ModuleNotFoundError as e:
            # Only the package itself missing means "not installed"; a dependency of an
            # installed Lightning that is missing says so in its own error.
            if e.name is None or not name.startswith(e.name):
                raise
    raise ImportError(INSTALL, name=PACKAGES[-1])


IDLE = "idle"  # the monitor never stalls a rank in this phase (monitor/collector.py)


class HangkitCallback(_callback_base()):
    """Reports the loop's progress with `hangkit.progress()`: one line in the Trainer's
    callbacks, no loop of your own. Costs about a microsecond a hook, and never raises into
    training."""

    def _beat(self, trainer, phase: str) -> None:
        try:
            progress(step=trainer.global_step, phase=phase, epoch=trainer.current_epoch)
        except Exception:  # a Trainer without these attributes must not end the training
            log.debug("no progress beat for phase %s", phase, exc_info=True)

    def setup(self, trainer, pl_module, stage=None):
        self._beat(trainer, "setup")

    def on_train_epoch_start(self, trainer, pl_module, *args, **kwargs):
        self._beat(trainer, "data")

    def on_train_batch_start(self, trainer, pl_module, *args, **kwargs):
        self._beat(trainer, "train")

    def on_before_backward(self, trainer, pl_module, *args, **kwargs):
        self._beat(trainer, "backward")

    def on_before_optimizer_step(self, trainer, pl_module, *args, **kwargs):
        self._beat(trainer, "optimizer")

    def on_train_batch_end(self, trainer, pl_module, *args, **kwargs):
        self._beat(trainer, "data")

    def on_train_epoch_end(self, trainer, pl_module, *args, **kwargs):
        self._beat(trainer, "epoch-end")

    def on_validation_start(self, trainer, pl_module, *args, **kwargs):
        self._validating(trainer)

    def on_validation_batch_start(self, trainer, pl_module, *args, **kwargs):
        self._validating(trainer)

    def _validating(self, trainer) -> None:
        try:
            phase = "sanity-check" if trainer.sanity_checking else "validate"
        except Exception:
            phase = "validate"
        self._beat(trainer, phase)

    def on_validation_end(self, trainer, pl_module, *args, **kwargs):
        # Inside fit, training resumes with the next batch (at an epoch's end,
        # on_train_epoch_end comes first and says so); a lone validate() ends in teardown.
        try:
            fitting = trainer.state.fn == "fit"
        except Exception:
            fitting = False
        if fitting:
            self._beat(trainer, "data")

    def on_save_checkpoint(self, trainer, pl_module, *args, **kwargs):
        # Called while the checkpoint is assembled, before it is written and before the
        # barrier that follows on every rank: the phase covers both.
        self._beat(trainer, "checkpoint")

    def on_test_start(self, trainer, pl_module, *args, **kwargs):
        self._beat(trainer, "test")

    def on_test_batch_start(self, trainer, pl_module, *args, **kwargs):
        self._beat(trainer, "test")

    def on_predict_start(self, trainer, pl_module, *args, **kwargs):
        self._beat(trainer, "predict")

    def on_predict_batch_start(self, trainer, pl_module, *args, **kwargs):
        self._beat(trainer, "predict")

    def teardown(self, trainer, pl_module, stage=None):
        self._beat(trainer, IDLE)


__all__ = ["HangkitCallback"]
