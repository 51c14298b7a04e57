"""The enhanced training script: the shape users already run, with hangkit's building blocks.

    python examples/make_data.py --out data.npz
    MASTER_ADDR=127.0.0.1 MASTER_PORT=29511 mpiexec -n 4 python examples/train.py \\
        --config examples/config.yaml --datafile data.npz --cluster local --no_wandb

Every wait has a deadline from the config; every phase is reported through hangkit.progress()
(run it under `hangkit watch --progress-timeout 60` to have stalls caught); a rank whose data
phase fails tells the others at the step boundary and every rank ends that epoch together;
cleanup runs on any exit.

--cluster local trains on CPUs with gloo; --cluster polaris on the node's GPUs with NCCL, one
GPU per rank by its local rank. --inject KIND:rank=R:step=S produces a catalogue hang on
purpose (examples/inject.py lists them and what catches each).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from inject import IN_WORKER, InjectingDataset, Shortened, before_setup, mine, parse_spec

from hangkit.errors import HangkitError, UsageError


class ConfigError(HangkitError):
    """The config or the data file cannot be used (exit 2)."""


DEFAULTS = {"model": {"hidden": 64, "layers": 2}, "batch_size": 32, "epochs": 2, "lr": 0.05,
            "num_workers": 2, "timeouts": {"init": 60, "dataloader": 30, "barrier": 60,
                                           "step": 120, "wandb": 60}}


def load_config(path: str) -> dict:
    import yaml

    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"cannot read the config {path}: {e.strerror}") from None
    try:
        loaded = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"the config {path} does not parse: "
                           f"{str(e).splitlines()[0]}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"the config {path} is not a mapping of settings")
    config = {**DEFAULTS, **loaded}
    config["timeouts"] = {**DEFAULTS["timeouts"], **(loaded.get("timeouts") or {})}
    config["model"] = {**DEFAULTS["model"], **(loaded.get("model") or {})}
    for key in ("batch_size", "epochs"):
        if not isinstance(config[key], int) or config[key] < 1:
            raise ConfigError(f"the config {path}: {key} must be a whole number >= 1, "
                               f"got {config[key]!r}")
    return config


def parse(argv):
    parser = argparse.ArgumentParser(description="Train a small model with hang-safe parts.")
    parser.add_argument("--config", required=True)
    parser.add_argument("--datafile", required=True)
    parser.add_argument("--cluster", choices=("local", "polaris"), default="local")
    parser.add_argument("--no_wandb", action="store_true")
    parser.add_argument("--inject", action="append", default=[], metavar="KIND:rank=R:step=S",
                        help="produce a catalogue hang on purpose (repeatable); see inject.py")
    args = parser.parse_args(argv)
    args.inject = [parse_spec(spec) for spec in args.inject]
    return args


def device_for(cluster: str):
    """(backend, device): gloo on CPUs here; NCCL on this rank's GPU on Polaris."""
    import torch

    from hangkit.rankenv import local_rank_from_environ

    if cluster == "local":
        return "gloo", torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("--cluster polaris needs GPUs, and torch sees none here "
                          "(use --cluster local)")
    local = local_rank_from_environ(dict(os.environ)) or 0
    device = torch.device("cuda", local % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return "nccl", device


def train(args, config: dict) -> dict:
    import numpy as np
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DistributedSampler, TensorDataset

    from hangkit.rankenv import rank_from_environ
    from hangkit.training import (
        ErrorFlag,
        StepRunner,
        barrier,
        check_even_batches,
        init_distributed,
        init_wandb,
        safe_dataloader,
        setup_environment,
    )
    from hangkit.training.trackers import disabled

    timeouts = config["timeouts"]
    injections = mine(args.inject, rank_from_environ(dict(os.environ)) or 0)
    for injection in injections:
        logging.warning("injecting %s", injection)
    before_setup(injections, rank_from_environ(dict(os.environ)) or 0)
    setup_environment()  # logs each change, e.g. a TMPDIR too long for AF_UNIX replaced
    backend, device = device_for(args.cluster)
    rank, world = init_distributed(backend, timeout=timeouts["init"])
    try:
        data = np.load(args.datafile)
        dataset = TensorDataset(torch.from_numpy(data["inputs"]),
                                torch.from_numpy(data["labels"]))
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, drop_last=True)
        in_worker = next((i for i in injections if i.kind in IN_WORKER), None)
        if in_worker is not None:
            dataset = InjectingDataset(dataset, in_worker)
        if any(i.kind == "uneven_batches" for i in injections):
            sampler = Shortened(sampler, drop=config["batch_size"])
        loader = safe_dataloader(dataset, batch_size=config["batch_size"], sampler=sampler,
                                 num_workers=config["num_workers"], drop_last=True,
                                 timeout=timeouts["dataloader"],
                                 test_timeout=timeouts["dataloader"])
        check_even_batches(len(loader), timeout=timeouts["barrier"])
        arm_at = (dataset.plan(sampler, len(loader), config["batch_size"])
                  if in_worker is not None else None)
        skip_at = next((i.step // len(loader) + 1 for i in injections
                        if i.kind == "skip_collective"), None)

        def epoch_barrier(epoch: int) -> None:
            if epoch == skip_at:  # TD-01: this rank goes on without the others
                logging.warning("rank %d skips the barrier before epoch %d (injected)", rank,
                                epoch)
                return
            barrier(timeout=timeouts["barrier"])

        features, classes = data["inputs"].shape[1], int(data["labels"].max()) + 1
        layers, width = [], features
        for _ in range(config["model"]["layers"]):
            layers += [torch.nn.Linear(width, config["model"]["hidden"]), torch.nn.ReLU()]
            width = config["model"]["hidden"]
        model = DistributedDataParallel(
            torch.nn.Sequential(*layers, torch.nn.Linear(width, classes)).to(device))
        optimizer = torch.optim.SGD(model.parameters(), lr=config["lr"])
        tracker = (disabled("--no_wandb") if args.no_wandb else
                   init_wandb(project="hangkit-example", timeout=timeouts["wandb"],
                              config=config))
        losses: dict[int, list[float]] = {}

        def train_step(batch, phase):
            inputs, labels = (t.to(device) for t in batch)
            phase("forward")
            loss = torch.nn.functional.cross_entropy(model(inputs), labels)
            phase("backward")  # DDP's gradient all-reduce runs inside backward
            optimizer.zero_grad()
            loss.backward()
            phase("optimizer")
            optimizer.step()
            return {"loss": loss.item()}

        def epoch_start(epoch):
            sampler.set_epoch(epoch)
            if epoch:
                epoch_barrier(epoch)
            if epoch == arm_at:
                dataset.arm()

        def record(step, metrics):
            losses.setdefault(runner.state.epoch, []).append(metrics["loss"])
            tracker.log(metrics)

        # The error flag's check runs at each step boundary, after the batch is fetched.
        runner = StepRunner(train_step, loader, epochs=config["epochs"],
                            on_epoch_start=epoch_start, on_metrics=record,
                            error_flag=ErrorFlag(timeout=timeouts["step"]),
                            cleanup=[tracker.finish])
        state = runner.run()
        epoch_barrier(config["epochs"])
        means = {e: sum(v) / len(v) for e, v in sorted(losses.items())}
        return {"rank": rank, "world": world, "steps": state.step, "epoch_loss": means,
                "failed_epochs": len(state.failed_epochs), "tracker": tracker.mode}
    finally:
        dist.destroy_process_group()


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        args = parse(argv)
        config = load_config(args.config)
        if not Path(args.datafile).is_file():
            raise ConfigError(f"no such data file: {args.datafile} (make one with "
                               "examples/make_data.py)")
        result = train(args, config)
    except HangkitError as e:  # bad input, or a hang the building blocks caught and named
        print(f"train: error: {e.one_line()}", file=sys.stderr)
        return 2 if isinstance(e, (ConfigError, UsageError)) else 1
    losses = ", ".join(f"epoch {e}: {v:.3f}" for e, v in result["epoch_loss"].items())
    print(f"rank {result['rank']} of {result['world']}: {result['steps']} steps; mean loss "
          f"{losses}; {result['failed_epochs']} failed epochs; tracker {result['tracker']}",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
