"""The frameworks' callbacks (hangkit.integrations): real Lightning and transformers Trainer runs
whose beats reach a real Monitor, and plain scripts whose only hangkit line is the callback,
hung on purpose under `hangkit watch --progress-timeout auto`.

The in-process runs report to a Monitor of their own through an agent started by hand, as a
rank's agent does under watch. Each training step waits until the monitor has seen it, so the
step the monitor shows is seen to advance with the training, not only to end right. The
frameworks are imported inside the tests: collecting this file costs the suite nothing."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import PROGRAMS
from test_watch_hangs import HANG

import hangkit
from hangkit.monitor.server import Monitor

ROOT = Path(__file__).parent.parent
MAX_STEPS = 6
# Where tests/programs/integrations/*_hangs.py stop: their training step at this global step.
HANG_AT = 36


@contextlib.contextmanager
def monitored():
    """A Monitor, and this process's agent reporting to it as rank 0; both ended afterwards."""
    monitor = Monitor()
    try:
        hangkit.start_agent(monitor.address, monitor.key, rank=0, world_size=1)
        yield monitor
    finally:
        hangkit.stop_agent()
        monitor.close()


def wait_for(monitor: Monitor, *, step: int, phase: str, timeout: float = 15.0):
    """Rank 0's status once the monitor shows it at `step` in `phase` (a beat goes at least
    once a second, and 0.2 s into a new phase)."""
    deadline = time.monotonic() + timeout
    seen = None
    while time.monotonic() < deadline:
        seen = next((r for r in monitor.statuses() if r.rank == 0), None)
        if seen is not None and (seen.step, seen.phase) == (step, phase):
            return seen
        time.sleep(0.05)  # ok-sleep: polling the monitor against the deadline
    pytest.fail(f"the monitor never showed step {step} in phase {phase!r}; last: {seen}")


# --- in process: the beats reach a real monitor ---------------------------------------------


@pytest.mark.timeout(120)
def test_lightning_steps_reach_the_monitor_as_they_run():
    import pytorch_lightning as pl
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from hangkit.integrations.lightning import HangkitCallback

    seen: list[int] = []

    class Tiny(pl.LightningModule):
        def __init__(self, monitor):
            super().__init__()
            self.monitor = monitor
            self.net = nn.Linear(8, 2)

        def training_step(self, batch, batch_idx):
            # Inside its step the rank reports phase "train" at the steps done so far.
            seen.append(wait_for(self.monitor, step=self.global_step, phase="train").step)
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = TensorDataset(torch.randn(32, 8), torch.randint(0, 2, (32,)))
    with monitored() as monitor:
        trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=MAX_STEPS, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, callbacks=[HangkitCallback()])
        trainer.fit(Tiny(monitor), DataLoader(data, batch_size=8))
        # global_step counts optimizer steps done: the last step run was MAX_STEPS - 1, and
        # after it the rank reports MAX_STEPS, idle once fit is over.
        final = wait_for(monitor, step=MAX_STEPS, phase="idle")
        assert final.fields["epoch"] == trainer.current_epoch, final
    assert seen == list(range(MAX_STEPS))


@pytest.mark.timeout(120)
def test_transformers_steps_reach_the_monitor_as_they_run(tmp_path):
    import torch
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

    from hangkit.integrations.transformers import HangkitCallback

    seen: list[int] = []

    class Watched(Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            # Inside its step the rank reports phase "train" at the steps done so far.
            seen.append(wait_for(self.monitor, step=self.state.global_step, phase="train").step)
            return super().training_step(model, inputs, num_items_in_batch)

    torch.manual_seed(0)
    ids = torch.randint(1, 32, (24, 8))
    data = [{"input_ids": ids[i], "labels": int((ids[i] == 7).any())} for i in range(len(ids))]
    config = BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=32, max_position_embeddings=8,
                        num_labels=2)
    # Logging every 2 steps sends the rank through the "log" phase (the loss gathered).
    args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[],
                             max_steps=MAX_STEPS, per_device_train_batch_size=4,
                             logging_steps=2, save_strategy="no", disable_tqdm=True,
                             dataloader_num_workers=0, seed=0)
    with monitored() as monitor:
        trainer = Watched(model=BertForSequenceClassification(config), args=args,
                          train_dataset=data, callbacks=[HangkitCallback()])
        trainer.monitor = monitor
        trainer.train()
        # state.global_step counts optimizer steps done, as Lightning's does.
        final = wait_for(monitor, step=MAX_STEPS, phase="idle")
        assert final.fields["epoch"] == trainer.state.epoch == 1.0, final
    assert seen == list(range(MAX_STEPS))


@pytest.mark.timeout(120)
def test_a_hook_costs_about_a_microsecond(tmp_path):
    """The callbacks add no measurable cost to a step (one takes milliseconds): about 1 us a
    hook here, the bound is 20 times that."""
    import pytorch_lightning as pl
    from transformers import TrainerControl, TrainerState

    from hangkit.integrations.lightning import HangkitCallback as LightningCallback
    from hangkit.integrations.transformers import HangkitCallback as TrainerCallback

    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False,
                         default_root_dir=str(tmp_path))
    lightning, hf = LightningCallback(), TrainerCallback()
    state, control = TrainerState(), TrainerControl()
    calls = 20_000
    with monitored():
        started = time.perf_counter()
        for i in range(calls):
            lightning.on_train_batch_start(trainer, None, None, i)
            hf.on_step_begin(None, state, control)
        per_hook = (time.perf_counter() - started) / (2 * calls)
    assert per_hook < 20e-6, f"{per_hook * 1e6:.1f} us a hook"


# --- what importing costs, and a missing framework ------------------------------------------


@pytest.mark.timeout(60)
def test_importing_hangkit_or_the_package_imports_no_framework():
    code = ("import sys, hangkit, hangkit.integrations\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in\n"
            "      ('lightning', 'pytorch_lightning', 'transformers', 'torch')\n"
            "      or m.startswith('hangkit.integrations.')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


@pytest.mark.timeout(60)
@pytest.mark.parametrize("module, install", [
    ("lightning", "pip install lightning"),
    ("transformers", "pip install transformers"),
])
def test_a_missing_framework_is_one_actionable_import_error(module, install):
    """Under the interpreter this virtualenv was made from, given hangkit's source and none of
    the venv's packages: the frameworks are really not installed there."""
    base = getattr(sys, "_base_executable", None)
    if sys.prefix == sys.base_prefix or not base:
        pytest.skip("not in a virtualenv: no interpreter without the frameworks at hand")
    code = (f"try:\n    import hangkit.integrations.{module}\n"
            "except ImportError as e:\n    print(type(e).__name__, e, sep=': ')\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONHOME", "VIRTUAL_ENV")}
    done = subprocess.run([base, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**env, "PYTHONPATH": str(ROOT)})
    if not done.stdout and not done.stderr:
        pytest.skip(f"{base} has the framework for hangkit.integrations.{module}")
    assert done.returncode == 0, done.stderr
    line = done.stdout.strip()
    assert "\n" not in line and line.startswith("ImportError: ") and install in line, line


# --- end to end: a user's script under watch -------------------------------------------------


def hang_under_watch(run_watch, tmp_path: Path, script: str, *args: str) -> dict:
    """The script run the way a user would, under `hangkit watch --progress-timeout auto`."""
    # The job's temporary files go under the test's directory: what the killed job leaves is
    # gone with it.
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    # The scripts print nothing once they train, so only a --timeout longer than the
    # progress stall needs (auto: 30 s at least, after the 9 s the step times take) leaves
    # the verdict to the beats.
    run = run_watch([sys.executable, str(PROGRAMS / "integrations" / script), *args],
                    options=["--timeout", "120", "--progress-timeout", "auto", "--grace", "2"],
                    timeout=150, env={"TMPDIR": str(tmp)})
    assert run.returncode == HANG, run.err[-3000:]
    report = run.report
    assert report["detector"] == "progress", report["reason"]
    assert "--progress-timeout auto" in report["reason"], report["reason"]
    (rank,) = report["ranks"]
    # The beats stopped at the step the job stopped at, inside that step's training.
    assert (rank["status"], rank["step"], rank["phase"]) == ("stalled", HANG_AT, "train"), rank
    main = next(t for p in report["processes"] if p["role"] == "rank"
                for t in p["threads"] if t["is_main"])
    assert any(f["file"].endswith(script) and f["function"].endswith("training_step")
               for f in main["frames"]), json.dumps(main["frames"])[:3000]
    return rank


@pytest.mark.timeout(180)
def test_lightning_script_hung_in_a_step_is_caught_by_its_beats(run_watch, tmp_path):
    rank = hang_under_watch(run_watch, tmp_path, "lightning_hangs.py")
    assert isinstance(rank["fields"]["epoch"], int), rank


@pytest.mark.timeout(180)
def test_transformers_script_hung_in_a_step_is_caught_by_its_beats(run_watch, tmp_path):
    rank = hang_under_watch(run_watch, tmp_path, "hf_trainer_hangs.py", str(tmp_path))
    assert rank["fields"]["epoch"] > 0, rank
