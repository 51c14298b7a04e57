"""The enhanced training script: the shape users already run, with hangkit's building blocks.

    python examples/make_data.py --out data.npz
    MASTER_ADDR=127.0.0.1 MASTER_PORT=29511 mpiexec -n 4 python examples/train.py \\
        --config examples/config.yaml --datafile data.npz --cluster local --no_wandb

Every wait has a deadline from the config; every phase is reported through hangkit.progress()
(run it under `hangkit watch --progress-timeout 60` to have stalls caught); one rank's
exception reaches the others at the next step boundary; cleanup runs on any exit.
Not yet here: --inject, to produce the catalogue's hangs on purpose.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from hangkit.errors import HangkitError


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
    return parser.parse_args(argv)


def train(args, config: dict) -> dict:
    import numpy as np
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DistributedSampler, TensorDataset

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
    for line in setup_environment():
        logging.info("set %s", line)
    rank, world = init_distributed("gloo", timeout=timeouts["init"])
    try:
        data = np.load(args.datafile)
        dataset = TensorDataset(torch.from_numpy(data["inputs"]),
                                torch.from_numpy(data["labels"]))
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, drop_last=True)
        loader = safe_dataloader(dataset, batch_size=config["batch_size"], sampler=sampler,
                                 num_workers=config["num_workers"], drop_last=True,
                                 timeout=timeouts["dataloader"],
                                 test_timeout=timeouts["dataloader"])
        check_even_batches(len(loader), timeout=timeouts["barrier"])
        features, classes = data["inputs"].shape[1], int(data["labels"].max()) + 1
        layers, width = [], features
        for _ in range(config["model"]["layers"]):
            layers += [torch.nn.Linear(width, config["model"]["hidden"]), torch.nn.ReLU()]
            width = config["model"]["hidden"]
        model = DistributedDataParallel(torch.nn.Sequential(*layers,
                                                            torch.nn.Linear(width, classes)))
        optimizer = torch.optim.SGD(model.parameters(), lr=config["lr"])
        tracker = (disabled("--no_wandb") if args.no_wandb else
                   init_wandb(project="hangkit-example", timeout=timeouts["wandb"],
                              config=config))
        flag = ErrorFlag(timeout=timeouts["step"])
        losses: dict[int, list[float]] = {}

        def train_step(batch, phase):
            inputs, labels = batch
            # The boundary check comes after the data phase and before this step's collectives,
            # so a rank that failed fetching is known to all before anyone waits in DDP.
            flag.check(None)
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
                barrier(timeout=timeouts["barrier"])

        def record(step, metrics):
            losses.setdefault(runner.state.epoch, []).append(metrics["loss"])
            tracker.log(metrics)

        runner = StepRunner(train_step, loader, epochs=config["epochs"],
                            on_epoch_start=epoch_start, on_metrics=record,
                            cleanup=[tracker.finish])
        state = runner.run()
        barrier(timeout=timeouts["barrier"])
        means = {e: sum(v) / len(v) for e, v in sorted(losses.items())}
        return {"rank": rank, "world": world, "steps": state.step, "epoch_loss": means}
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
        return 2 if isinstance(e, ConfigError) else 1
    losses = ", ".join(f"epoch {e}: {v:.3f}" for e, v in result["epoch_loss"].items())
    print(f"rank {result['rank']} of {result['world']}: {result['steps']} steps; mean loss "
          f"{losses}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
