"""One run = one method on one task with one seed (Hydra app; configs in the top-level ``conf/``).

    python -m lightning_mk.experiments.run method=mk k=4 seed=0
    python -m lightning_mk.experiments.run -m method=baseline,mk k=2,4 seed=0,1      # a sweep (multirun)

It trains, tests the deployable small model, saves it (``model.pt``, the ``state_dict`` of a
``Classifier``) and writes one JSON line to ``results.jsonl`` in the run's output folder, which
``python -m lightning_mk.experiments.report`` reads. Use a single process per job under multirun (Lightning's
``ddp`` relaunches child ranks with the whole sweep's command line).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Iterator, Sequence

import hydra
import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lightning_mk.atomic import write_atomically
from lightning_mk.experiments.distill import Distiller, Ensemble
from lightning_mk.experiments.models import Classifier
from lightning_mk.experiments.report import is_number
from lightning_mk.experiments.submodular import OBJECTIVES, prune_to_width

METHODS = ("baseline", "baseline_reg", "mk", "wide", "distill", "submodular")
TEACHERS = ("ensemble", "wide")


class ConfigError(ValueError):
    """A configuration value that cannot work; raised before any data is made or any training."""


def check_config(cfg: DictConfig) -> None:
    """Fail fast, naming the key and the allowed values."""
    method = cfg.method.name
    if method not in METHODS:
        raise ConfigError(f"config key 'method' is {method!r}; allowed: {list(METHODS)}")
    k = cfg.k
    if method not in ("baseline", "baseline_reg") and (isinstance(k, bool) or not isinstance(k, int) or k < 2):
        raise ConfigError(f"config key 'k' must be an integer >= 2 for method={method}, got {k!r}")
    n = cfg.model.net.n
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ConfigError(f"config key 'model.net.n' (the model width) must be a positive integer, got {n!r}")
    data = cfg.data.module
    if "root" in data and not data.get("download", False) and not os.path.isdir(data.root):
        raise ConfigError(
            f"config key 'data.module.root' is {data.root!r}, which does not exist; point it at a copy of the "
            "data set or set data.module.download=true (needs internet)"
        )
    if method == "distill":
        if cfg.method.teacher not in TEACHERS:
            raise ConfigError(f"config key 'method.teacher' is {cfg.method.teacher!r}; allowed: {list(TEACHERS)}")
        for path in _teacher_paths(cfg):
            if not os.path.isfile(path):
                raise ConfigError(f"config key 'method.teacher_ckpt' names {path!r}, which does not exist")
    if method == "submodular":
        if cfg.method.objective not in OBJECTIVES:
            raise ConfigError(f"config key 'method.objective' is {cfg.method.objective!r}; allowed: {list(OBJECTIVES)}")
        if cfg.method.wide_ckpt is not None and not os.path.isfile(cfg.method.wide_ckpt):
            raise ConfigError(f"config key 'method.wide_ckpt' names {cfg.method.wide_ckpt!r}, which does not exist")


def _teacher_paths(cfg: DictConfig) -> list[str]:
    ckpt = cfg.method.teacher_ckpt
    if ckpt is None:
        return []
    paths = [ckpt] if isinstance(ckpt, str) else list(ckpt)
    expected = cfg.k if cfg.method.teacher == "ensemble" else 1
    if len(paths) != expected:
        raise ConfigError(
            f"config key 'method.teacher_ckpt' must name {expected} file(s) for teacher={cfg.method.teacher} "
            f"(k={cfg.k}), got {len(paths)}"
        )
    return paths


class Runner:
    """Builds and trains what one method needs; every fit's wall-clock time is added to ``train_time_s``."""

    def __init__(self, cfg: DictConfig, data: pl.LightningDataModule, loggers: list[Logger]) -> None:
        self.cfg, self.data, self.loggers = cfg, data, loggers
        self.train_time_s = 0.0
        self.info: dict = {}

    def net(self, width: int | None = None, dropout: float | None = None) -> nn.Module:
        options = {"in_shape": tuple(self.data.in_shape), "num_classes": self.data.num_classes}
        if width is not None:
            options["n"] = width
        if dropout is not None:
            options["dropout"] = dropout
        return instantiate(self.cfg.model.net, **options)

    def classifier(self, net: nn.Module, weight_decay: float | None = None) -> Classifier:
        extra = {} if weight_decay is None else {"weight_decay": weight_decay}
        return Classifier(net, self.data.num_classes, instantiate(self.cfg.optimizer, **extra))

    def fit(self, module: pl.LightningModule, log: bool = True, callbacks: Sequence[pl.Callback] = (), **trainer_options) -> pl.Trainer:
        """``log=False`` for auxiliary fits (teachers, the wide model before selection): the loggers
        record only the deployable model's training."""
        trainer = instantiate(self.cfg.trainer, logger=self.loggers if log and self.loggers else False, callbacks=list(callbacks), **trainer_options)
        start = time.perf_counter()
        trainer.fit(module, self.data)
        self.train_time_s += time.perf_counter() - start
        self.info["train_acc"] = _metric(trainer, "train/acc")
        self.info["val_acc"] = _metric(trainer, "val/acc")  # what a study tunes on, leaving test_acc unseen
        return trainer

    def test(self, module: pl.LightningModule) -> dict:
        trainer = instantiate(self.cfg.trainer, logger=False, enable_progress_bar=False)
        (result,) = trainer.test(module, self.data, verbose=False)
        return result

    def train_inputs(self, count: int) -> Iterator[torch.Tensor]:
        seen = 0
        for x, _ in self.data.train_dataloader():
            if seen >= count:
                return
            yield x[: count - seen]
            seen += len(x)

    # one method each: return the deployable model and whether it has the small model's size
    def baseline(self) -> tuple[Classifier, bool]:
        model = self.classifier(self.net())
        self.fit(model)
        return model, True

    def baseline_reg(self) -> tuple[Classifier, bool]:
        model = self.classifier(self.net(dropout=self.cfg.method.dropout), weight_decay=self.cfg.method.weight_decay)
        self.fit(model)
        return model, True

    def mk(self) -> tuple[Classifier, bool]:
        path = os.path.join(self.cfg.output_dir, "mk_small_model.pt")
        callback = instantiate(self.cfg.method.callback, save_path=path)
        self.fit(self.classifier(self.net()), callbacks=[callback])
        small = self.classifier(self.net())  # the user's own class at its own size, from the saved file
        small.load_state_dict(torch.load(path, weights_only=True), strict=True)
        return small, True

    def wide(self) -> tuple[Classifier, bool]:
        model = self.classifier(self.net(width=self.cfg.k * self.cfg.model.net.n))
        self.fit(model)
        return model, False

    def teacher(self) -> nn.Module:
        cfg = self.cfg
        wide = cfg.method.teacher == "wide"
        width = cfg.k * cfg.model.net.n if wide else None
        paths = _teacher_paths(cfg)
        members = []
        for i in range(1 if wide else cfg.k):
            pl.seed_everything(cfg.seed * 1000 + i + 1)  # each ensemble member its own initialisation
            member = self.classifier(self.net(width=width))
            if paths:
                member.load_state_dict(torch.load(paths[i], weights_only=True), strict=True)
            else:
                self.fit(member, log=False)
            members.append(member.net)
        self.info["teacher_time_s"] = self.train_time_s
        return members[0] if wide else Ensemble(members)

    def distill(self) -> tuple[Classifier, bool]:
        cfg = self.cfg
        teacher = self.teacher()
        pl.seed_everything(cfg.seed)
        student = Distiller(
            self.net(), teacher, self.data.num_classes, cfg.method.temperature, cfg.method.alpha, instantiate(cfg.optimizer)
        )
        self.fit(student)
        return self.classifier(student.net), True

    def submodular(self) -> tuple[Classifier, bool]:
        cfg = self.cfg
        wide = self.classifier(self.net(width=cfg.k * cfg.model.net.n))
        if cfg.method.wide_ckpt is None:
            self.fit(wide, log=cfg.method.finetune_epochs == 0)
        else:
            wide.load_state_dict(torch.load(cfg.method.wide_ckpt, weights_only=True), strict=True)
        small = self.classifier(self.net())
        start = time.perf_counter()
        prune_to_width(wide.net, small.net, self.train_inputs(cfg.method.samples), cfg.method.objective, cfg.method.refit)
        self.train_time_s += time.perf_counter() - start
        if cfg.method.finetune_epochs:
            self.info["test_acc_before_finetune"] = self.test(small)["test/acc"]
            self.fit(small, max_epochs=cfg.method.finetune_epochs)
        return small, True


def _metric(trainer: pl.Trainer, key: str) -> float | None:
    value = trainer.callback_metrics.get(key)
    return None if value is None else float(value)


def latency_ms(net: nn.Module, x: torch.Tensor, repeats: int = 30) -> float:
    """Median wall-clock of one eval-mode forward of ``x``, after warm-up."""
    net.eval()
    times = []
    with torch.no_grad():
        for i in range(repeats + 5):
            start = time.perf_counter()
            net(x)
            if i >= 5:
                times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def run(cfg: DictConfig) -> dict:
    """Train, test and save one method's deployable model; return (and write) its results."""
    check_config(cfg)
    os.makedirs(cfg.output_dir, exist_ok=True)
    pl.seed_everything(cfg.seed)
    data = instantiate(cfg.data.module)
    data.prepare_data()
    data.setup("fit")  # make the data now, so that it is not counted as training time
    loggers = [instantiate(c) for c in cfg.logger.values()]
    try:
        for logger in loggers:
            logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        runner = Runner(cfg, data, loggers)
        model, deployable = getattr(runner, cfg.method.name)()
        tested = runner.test(model)
        x = next(iter(data.test_dataloader()))[0][: cfg.latency_batch]
        result = {
            "task": cfg.task,
            "method": cfg.method.name,
            "label": cfg.method.label,
            "k": None if cfg.method.name in ("baseline", "baseline_reg") else cfg.k,
            "seed": cfg.seed,
            "test_acc": tested["test/acc"],
            "test_loss": tested["test/loss"],
            "params": sum(p.numel() for p in model.net.parameters()),
            "deployable": deployable,
            "train_time_s": runner.train_time_s,
            "latency_ms": latency_ms(model.net, x),
            **runner.info,
            "output_dir": os.path.abspath(cfg.output_dir),
        }
        state = model.state_dict()
        write_atomically(os.path.join(cfg.output_dir, "model.pt"), lambda f: torch.save(state, f))
        line = (json.dumps(result) + "\n").encode()
        write_atomically(os.path.join(cfg.output_dir, "results.jsonl"), lambda f: f.write(line))
        for logger in loggers:
            logger.log_metrics({f"final/{key}": float(value) for key, value in result.items() if is_number(value)})
            logger.save()
        print(
            f"[{result['task']}] {result['label']} seed={cfg.seed}: test acc {100 * result['test_acc']:.2f}% "
            f"({result['params']:,} params, {result['train_time_s']:.1f} s training) -> {cfg.output_dir}"
        )
        return result
    finally:
        if any(isinstance(logger, WandbLogger) for logger in loggers):
            import wandb

            wandb.finish()  # under multirun, the next job must start its own W&B run


@hydra.main(version_base="1.3", config_path="pkg://lightning_mk.conf", config_name="config")
def main(cfg: DictConfig) -> float:
    """Returns the test accuracy, so a Hydra sweeper (e.g. Optuna) can optimise it."""
    return run(cfg)["test_acc"]


if __name__ == "__main__":
    main()
