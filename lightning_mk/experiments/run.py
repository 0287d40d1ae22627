"""One run = one method on one task with one seed (Hydra app; configs in the top-level ``conf/``).

    python -m lightning_mk.experiments.run method=mk k=4 seed=0
    python -m lightning_mk.experiments.run -m method=mk k=2,4 seed=0,1 hydra.sweep.dir=multirun/k/mk   # a sweep

The model is a built-in network (``model.net``, trained by :class:`Classifier` with the ``optimizer`` group and
the optional ``scheduler`` group, a learning-rate schedule stepped per epoch) or
any LightningModule (``model.module``, by ``_target_``, with its own loss and optimizers); the data any
LightningDataModule (``data.module``). A run trains the method's deployable model, validates and tests it, saves
its ``state_dict`` (``model.pt``) and writes one JSON line to ``results.jsonl`` in the run's folder, which
``python -m lightning_mk.experiments.report`` reads; ``run.log`` beside them holds the run's log. Use a single
process per job under multirun (Lightning's ``ddp`` relaunches child ranks with the whole sweep's command line).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Optional

import hydra
import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, WeightAveraging
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lightning_mk import collapsed_state_dict
from lightning_mk.atomic import write_atomically
from lightning_mk.experiments.distill import Distiller, Ensemble
from lightning_mk.experiments import schema  # noqa: F401  (registers method.callback's schema and resolver)
from lightning_mk.experiments.models import Classifier
from lightning_mk.experiments.report import is_number
from lightning_mk.experiments.submodular import OBJECTIVES, prune_to_width

log = logging.getLogger(__name__)

TEACHERS = ("ensemble", "wide")
#: Settings that do not change what a run computes, left out of its results' ``config`` (besides ``k`` where
#: the method does not use it).
NOT_CONFIG = ("seed", "output_dir", "logger", "trainer.enable_progress_bar", "trainer.enable_model_summary")


class ConfigError(ValueError):
    """A configuration value that cannot work; raised before any run folder, logger or training."""


class Method(NamedTuple):
    """What the app needs to know of a method's function. ``train`` returns the deployable model and whether it
    has the small model's size; ``uses_k``: whether ``k`` changes what it does; ``check`` sees the config before
    anything is made, ``check_data`` the runner once the data is made (both raise :class:`ConfigError`)."""

    train: Callable[["Runner"], tuple[pl.LightningModule, bool]]
    uses_k: bool
    check: Optional[Callable[[DictConfig], None]]
    check_data: Optional[Callable[["Runner"], object]]


def method(uses_k: bool, check=None, check_data=None):
    """Make the decorated function a method that a config of the ``method`` group (the one list of methods:
    ``conf/method/<name>.yaml``) can name by its dotted path, ``train: lightning_mk.experiments.run.mk``."""

    def mark(train):
        train.method = Method(train, uses_k, check, check_data)
        return train

    return mark


def method_of(cfg: DictConfig) -> Method:
    """The method that ``method.train`` names."""
    target = cfg.method.get("train")
    try:
        found = get_object(str(target))
    except Exception as err:
        raise ConfigError(f"config key 'method.train' is {target!r}, which cannot be imported ({err})") from None
    if not isinstance(getattr(found, "method", None), Method):
        raise ConfigError(
            f"config key 'method.train' must name a function decorated with lightning_mk.experiments.run.method, "
            f"got {target!r}"
        )
    return found.method


def check_config(cfg: DictConfig) -> Method:
    """Fail fast, naming the key and the allowed values; return the selected method."""
    chosen = method_of(cfg)
    name = cfg.method.name
    k = cfg.k
    if chosen.uses_k and (isinstance(k, bool) or not isinstance(k, int) or k < 2):
        raise ConfigError(f"config key 'k' must be an integer >= 2 for method={name}, got {k!r}")
    models = [key for key in ("net", "module") if cfg.model.get(key) is not None]
    if len(models) != 1:
        raise ConfigError(
            "config key 'model' must have exactly one of 'net' (a built-in network, see conf/model/) or 'module' "
            f"(your LightningModule by _target_), got {models or 'neither'}"
        )
    if models == ["module"]:
        _check_module_target(cfg)
        if cfg.get("scheduler") is not None:
            raise ConfigError(
                "config key 'scheduler' sets the learning-rate schedule of the built-in model.net; model.module brings "
                "its own optimizers and schedulers (configure_optimizers): leave scheduler=none"
            )
    key = _width_key(cfg)
    if key is not None:
        n = OmegaConf.select(cfg, key)
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ConfigError(f"config key {key!r} (the model width) must be a positive integer, got {n!r}")
    data = cfg.data.module
    if "root" in data and not data.get("download", False) and not os.path.isdir(data.root):
        raise ConfigError(
            f"config key 'data.module.root' is {data.root!r}, which does not exist; point it at a copy of the "
            "data set or set data.module.download=true (needs internet)"
        )
    if chosen.check is not None:
        chosen.check(cfg)
    return chosen


def _check_module_target(cfg: DictConfig) -> None:
    target = cfg.model.module.get("_target_")
    try:
        found = get_object(str(target))
    except Exception as err:
        raise ConfigError(
            f"config key 'model.module._target_' is {target!r}, which cannot be imported ({err}); "
            "put the folder of its file on PYTHONPATH"
        ) from None
    if isinstance(found, type) and not issubclass(found, pl.LightningModule):
        raise ConfigError(f"config key 'model.module._target_' must name a LightningModule, got {target!r}")
    arg = cfg.model.get("width_arg")
    if arg is not None and arg not in cfg.model.module:
        raise ConfigError(f"config key 'model.width_arg' is {arg!r}, which is not a key of model.module")


def _width_key(cfg: DictConfig) -> str | None:
    """The config key of the model's width, which the wide model multiplies by k; None if the model names none."""
    if cfg.model.get("net") is not None:
        return "model.net.n"
    arg = cfg.model.get("width_arg")
    return None if arg is None else f"model.module.{arg}"


def _require_width(cfg: DictConfig, what: str) -> None:
    if _width_key(cfg) is None:
        raise ConfigError(
            f"{what} builds the model k times wider: set config key 'model.width_arg' to the argument of "
            "model.module that sets its width"
        )


def _check_baseline_reg(cfg: DictConfig) -> None:
    if cfg.model.get("net") is None:
        raise ConfigError(
            "method=baseline_reg sets the dropout of a built-in model.net and the optimizer's weight decay; with "
            "model.module give your module those arguments and use method=baseline"
        )


def _check_wide(cfg: DictConfig) -> None:
    _require_width(cfg, "method=wide")


def _check_distill(cfg: DictConfig) -> None:
    if cfg.method.teacher not in TEACHERS:
        raise ConfigError(f"config key 'method.teacher' is {cfg.method.teacher!r}; allowed: {list(TEACHERS)}")
    if cfg.method.teacher == "wide":
        _require_width(cfg, "method=distill with method.teacher=wide")
    for path in _teacher_paths(cfg):
        if not os.path.isfile(path):
            raise ConfigError(f"config key 'method.teacher_ckpt' names {path!r}, which does not exist")


def _check_submodular(cfg: DictConfig) -> None:
    if cfg.method.objective not in OBJECTIVES:
        raise ConfigError(f"config key 'method.objective' is {cfg.method.objective!r}; allowed: {list(OBJECTIVES)}")
    if cfg.method.wide_ckpt is not None and not os.path.isfile(cfg.method.wide_ckpt):
        raise ConfigError(f"config key 'method.wide_ckpt' names {cfg.method.wide_ckpt!r}, which does not exist")
    _require_width(cfg, "method=submodular")
    if cfg.model.get("module") is not None and not hasattr(get_object(cfg.model.module._target_), "hidden"):
        raise ConfigError(
            "method=submodular needs model.module to have hidden(): its prunable dimensions as a list of "
            "lightning_mk.experiments.models.Hidden"
        )


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


def _check_data(run: "Runner") -> None:
    if run.cfg.model.get("net") is not None:
        missing = [attr for attr in ("in_shape", "num_classes") if not hasattr(run.data, attr)]
        if missing:
            raise ConfigError(
                f"the built-in model.net reads in_shape and num_classes from the data module, and "
                f"{run.cfg.data.module._target_} has no {' and no '.join(missing)}; add them, or use model.module"
            )


def _logit_classes(run: "Runner") -> int:
    """The number of classes, from the model's output on one training batch; raises ConfigError unless batches
    are ``(x, y)`` and the model's forward gives logits ``[batch, classes]`` (what distillation reads)."""
    batch = next(iter(run.data.train_dataloader()))
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise ConfigError(f"method=distill needs training batches (x, y), got a {type(batch).__name__}")
    x, y = batch
    model = run.module().eval()
    with torch.no_grad():
        logits = model(x)
    if not (isinstance(logits, torch.Tensor) and logits.dim() == 2 and logits.shape[0] == len(y) and y.max() < logits.shape[1]):
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ConfigError(f"method=distill needs the model's forward to return logits [batch, classes], got {shape}")
    return logits.shape[1]


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def run_config(cfg: DictConfig, uses_k: bool) -> dict:
    """Every setting that defines the run except the seed, as dotted keys: the composed config with interpolations
    unresolved (so ``data.module.seed: ${seed}`` reads the same for every seed), without :data:`NOT_CONFIG`.
    Two runs of one task with the same config and seed are duplicates."""
    drop = NOT_CONFIG if uses_k else (*NOT_CONFIG, "k")
    flat = _flatten(OmegaConf.to_container(cfg, resolve=False))
    return {key: value for key, value in flat.items() if not any(key == d or key.startswith(d + ".") for d in drop)}


class Clock(pl.Callback):
    """Logs ``time/train_s``, the seconds since training started, at each validation: learning curves against time."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = time.perf_counter()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and hasattr(self, "start"):
            pl_module.log("time/train_s", time.perf_counter() - self.start)


class Runner:
    """Builds and trains what one method needs; every fit's wall-clock time is added to ``train_time_s``."""

    def __init__(self, cfg: DictConfig, data: pl.LightningDataModule) -> None:
        self.cfg, self.data = cfg, data
        self.loggers: list[Logger] = []
        self.train_time_s = 0.0
        self.info: dict = {}
        self.best_checkpoint: Optional[str] = None  # with early_stopping: the best validation epoch's checkpoint
        key = _width_key(cfg)
        self.width = None if key is None else OmegaConf.select(cfg, key)

    def module(self, width: int | None = None, dropout: float | None = None, weight_decay: float | None = None) -> pl.LightningModule:
        """A new model: the user's ``model.module``, or the built-in ``model.net`` in a :class:`Classifier`."""
        cfg = self.cfg
        if cfg.model.get("module") is not None:
            return instantiate(cfg.model.module, **({} if width is None else {cfg.model.width_arg: width}))
        options = {"in_shape": tuple(self.data.in_shape), "num_classes": self.data.num_classes}
        if width is not None:
            options["n"] = width
        if dropout is not None:
            options["dropout"] = dropout
        extra = {} if weight_decay is None else {"weight_decay": weight_decay}
        scheduler = None if cfg.get("scheduler") is None else instantiate(cfg.scheduler)
        return Classifier(
            instantiate(cfg.model.net, **options), self.data.num_classes, instantiate(cfg.optimizer, **extra), scheduler
        )

    def fit(self, module: pl.LightningModule, log: bool = True, callbacks: Sequence[pl.Callback] = (), **trainer_options) -> pl.Trainer:
        """``log=False`` for auxiliary fits (teachers, the wide model before selection): the loggers
        record only the deployable model's training."""
        callbacks = [*callbacks, Clock()] if log else list(callbacks)
        patience = self.cfg.get("early_stopping")
        if log and patience is not None:  # the deployable model's fit: keep its best validation epoch
            best = ModelCheckpoint(os.path.join(self.cfg.output_dir, "best"), monitor="val/acc", mode="max", save_top_k=1)
            callbacks += [EarlyStopping("val/acc", mode="max", patience=patience), best]
            trainer_options["enable_checkpointing"] = True
        trainer = instantiate(self.cfg.trainer, logger=self.loggers if log and self.loggers else False, callbacks=callbacks, **trainer_options)
        start = time.perf_counter()
        trainer.fit(module, self.data)
        self.train_time_s += time.perf_counter() - start
        if log and patience is not None:
            self.best_checkpoint = best.best_model_path
            self.info["epochs"] = trainer.current_epoch
            self.info["best_epoch"] = torch.load(best.best_model_path, map_location="cpu", weights_only=False)["epoch"]
        value = trainer.callback_metrics.get("train/acc")
        self.info["train_acc"] = None if value is None else float(value)
        return trainer

    def evaluate(self, module: pl.LightningModule, stage: str) -> dict:
        """``trainer.validate`` (stage ``val``) or ``trainer.test`` (``test``) of ``module``: what it logged."""
        trainer = instantiate(self.cfg.trainer, logger=False, enable_progress_bar=False)
        (result,) = (trainer.validate if stage == "val" else trainer.test)(module, self.data, verbose=False)
        if f"{stage}/acc" not in result:
            raise RuntimeError(
                f"the model logged no '{stage}/acc' in its {'validation' if stage == 'val' else 'test'}_step (it logged "
                f"{sorted(result)}); the app records its accuracy under that name"
            )
        return result

    def train_inputs(self, count: int) -> Iterator[torch.Tensor]:
        seen = 0
        for x, _ in self.data.train_dataloader():
            if seen >= count:
                return
            yield x[: count - seen]
            seen += len(x)


@method(uses_k=False)
def baseline(run: Runner) -> tuple[pl.LightningModule, bool]:
    """Plain training of the small model."""
    model = run.module()
    run.fit(model)
    return model, True


@method(uses_k=False, check=_check_baseline_reg)
def baseline_reg(run: Runner) -> tuple[pl.LightningModule, bool]:
    """The small model with dropout and weight decay."""
    model = run.module(dropout=run.cfg.method.dropout, weight_decay=run.cfg.method.weight_decay)
    run.fit(model)
    return model, True


def _made(cfg: DictConfig, key: str, **options: Any) -> Any:
    """``instantiate`` of the config at ``method.<key>``, an argument it refuses raised as a :class:`ConfigError`
    with its message (config checks make the objects too, so this fails before any run folder or logger)."""
    try:
        return instantiate(cfg.method[key], **options)
    except InstantiationException as err:
        if isinstance(err.__cause__, (ValueError, TypeError)):
            raise ConfigError(f"config key 'method.{key}': {err.__cause__}") from None
        raise


def _callback(cfg: DictConfig, **options: Any) -> pl.Callback:
    """The method's callback, made from ``method.callback``."""
    return _made(cfg, "callback", **options)


def _check_averaged(cfg: DictConfig) -> None:
    average = _callback(cfg)
    if cfg.get("early_stopping") is not None and isinstance(average, pl.callbacks.StochasticWeightAveraging):
        raise ConfigError(
            f"method={cfg.method.name} averages from swa_epoch_start to the end, and early_stopping deploys the best "
            "validation epoch's checkpoint, written before the average: use one or the other (early_stopping=null)"
        )


@method(uses_k=False, check=_check_averaged)
def averaged(run: Runner) -> tuple[pl.LightningModule, bool]:
    """Plain training with one of Lightning's weight-averaging callbacks (``method.callback``:
    ``EMAWeightAveraging``, ``StochasticWeightAveraging``), which put the average into the model at the end."""
    model = run.module()
    run.fit(model, callbacks=[_callback(run.cfg)])
    return model, True


def _check_mk(cfg: DictConfig) -> None:
    _callback(cfg)
    if cfg.method.get("average") is None:
        return
    made = _made(cfg, "average")
    if not isinstance(made, WeightAveraging):
        raise ConfigError(
            f"config key 'method.average' must make one of Lightning's WeightAveraging callbacks (e.g. "
            f"EMAWeightAveraging), whose average the callback deploys; got {type(made).__name__}"
        )


@method(uses_k=True, check=_check_mk)
def mk(run: Runner) -> tuple[pl.LightningModule, bool]:
    """Majority Kernels: the callback writes the small model's ``state_dict`` to the run's ``model.pt`` (one path
    for every rank), which loads strictly into a new model of the user's class at its own size."""
    path = os.path.join(run.cfg.output_dir, "model.pt")
    average = run.cfg.method.get("average")  # a weight-averaging callback after it (method=mk_ema): the average is saved
    trained = run.module()
    run.fit(trained, callbacks=[_callback(run.cfg, save_path=path), *([instantiate(average)] if average else [])])
    small = run.module()
    if os.path.exists(path):
        small.load_state_dict(torch.load(path, weights_only=True), strict=True)
    else:  # diverged: the callback wrote no file; the run is recorded as what it trained, as plain training's is
        small.load_state_dict(collapsed_state_dict(trained.state_dict()), strict=True)
    return small, True


@method(uses_k=True, check=_check_wide)
def wide(run: Runner) -> tuple[pl.LightningModule, bool]:
    """Plain training at k times the width: a reference, not deployable at the small size."""
    model = run.module(width=run.cfg.k * run.width)
    run.fit(model)
    return model, False


def _teacher(run: Runner) -> nn.Module:
    """The k-times-wider model, or an ensemble of k small ones; trained here or loaded from ``teacher_ckpt``."""
    cfg = run.cfg
    is_wide = cfg.method.teacher == "wide"
    paths = _teacher_paths(cfg)
    members = []
    for i in range(1 if is_wide else cfg.k):
        pl.seed_everything(cfg.seed * 1000 + i + 1)  # each ensemble member its own initialisation
        member = run.module(width=cfg.k * run.width if is_wide else None)
        if paths:
            member.load_state_dict(torch.load(paths[i], weights_only=True), strict=True)
        else:
            run.fit(member, log=False)
        members.append(member)
    run.info["teacher_time_s"] = run.train_time_s
    return members[0] if is_wide else Ensemble(members)


@method(uses_k=True, check=_check_distill, check_data=_logit_classes)
def distill(run: Runner) -> tuple[pl.LightningModule, bool]:
    """Knowledge distillation into the small model, which keeps its own optimizers."""
    cfg = run.cfg
    teacher = _teacher(run)
    num_classes = _logit_classes(run)
    pl.seed_everything(cfg.seed)
    student = run.module()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training")  # the teacher's
        run.fit(Distiller(student, teacher, num_classes, cfg.method.temperature, cfg.method.alpha))
    return student, True


@method(uses_k=True, check=_check_submodular)
def submodular(run: Runner) -> tuple[pl.LightningModule, bool]:
    """Select the small model's units from the trained wide model, then fine-tune."""
    cfg = run.cfg
    wide = run.module(width=cfg.k * run.width)
    if cfg.method.wide_ckpt is None:
        run.fit(wide, log=cfg.method.finetune_epochs == 0)
    else:
        wide.load_state_dict(torch.load(cfg.method.wide_ckpt, weights_only=True), strict=True)
    small = run.module()
    start = time.perf_counter()
    nets = [m.net if isinstance(m, Classifier) else m for m in (wide, small)]  # whose hidden() names the units
    prune_to_width(*nets, run.train_inputs(cfg.method.samples), cfg.method.objective, cfg.method.refit)
    run.train_time_s += time.perf_counter() - start
    if cfg.method.finetune_epochs:
        run.info["test_acc_before_finetune"] = run.evaluate(small, "test")["test/acc"]
        run.fit(small, max_epochs=cfg.method.finetune_epochs)
    return small, True


def _load_best(model: nn.Module, path: str) -> None:
    """Load the deployable model's weights from its best validation epoch's checkpoint, whose ``state_dict`` is
    the plain model's (for mk the callback collapsed it; for ema the average; for mk_ema the average of the copies,
    collapsed here) or, for distill, holds it under ``net.`` beside the teacher."""
    state = collapsed_state_dict(torch.load(path, map_location="cpu", weights_only=False)["state_dict"])
    wanted = model.state_dict().keys()
    if not wanted <= state.keys():
        state = {key[len("net."):]: value for key, value in state.items() if key.startswith("net.")}
    model.load_state_dict({key: state[key] for key in wanted if key in state}, strict=True)
    os.remove(path)  # the model itself is saved as model.pt
    with contextlib.suppress(OSError):
        os.rmdir(os.path.dirname(path))


def load_model(folder: str | os.PathLike) -> pl.LightningModule:
    """The deployable model a run saved (``<folder>/model.pt``), rebuilt from the run's ``.hydra/config.yaml``
    at its own width (``wide``: k times the width), in eval mode. The data module is only constructed, not set up:
    the built-in ones hold ``in_shape`` and ``num_classes`` as class attributes."""
    folder = Path(folder)
    cfg = OmegaConf.load(folder / ".hydra" / "config.yaml")
    runner = Runner(cfg, instantiate(cfg.data.module))
    model = runner.module(width=cfg.k * runner.width if cfg.method.name == "wide" else None)
    model.load_state_dict(torch.load(folder / "model.pt", weights_only=True), strict=True)
    return model.eval()


def run(cfg: DictConfig) -> dict:
    """Train, validate, test and save one method's deployable model; return (and write) its results."""
    chosen = check_config(cfg)
    pl.seed_everything(cfg.seed)
    data = instantiate(cfg.data.module)
    data.prepare_data()
    data.setup("fit")  # make the data now, so that it is not counted as training time
    runner = Runner(cfg, data)
    _check_data(runner)
    if chosen.check_data is not None:
        chosen.check_data(runner)
    os.makedirs(cfg.output_dir, exist_ok=True)
    runner.loggers = [instantiate(c) for c in cfg.logger.values()]
    try:
        for logger in runner.loggers:
            logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        model, deployable = chosen.train(runner)
        if runner.best_checkpoint is not None:
            _load_best(model, runner.best_checkpoint)
        val = runner.evaluate(model, "val")
        tested = runner.evaluate(model, "test")
        result = {
            "task": cfg.task,
            "method": cfg.method.name,
            "label": cfg.method.label,
            "k": cfg.k if chosen.uses_k else None,
            "seed": cfg.seed,
            "val_acc": val["val/acc"],  # what a study tunes on, leaving test_acc unseen
            "test_acc": tested["test/acc"],
            "test_loss": tested.get("test/loss"),
            "params": sum(p.numel() for p in model.parameters()),
            "deployable": deployable,
            "train_time_s": runner.train_time_s,
            **runner.info,
            "config": run_config(cfg, chosen.uses_k),
            "output_dir": os.path.abspath(cfg.output_dir),
        }
        if rank_zero_only.rank == 0:  # under DDP every rank runs this job; one writes it
            state = model.state_dict()
            write_atomically(os.path.join(cfg.output_dir, "model.pt"), lambda f: torch.save(state, f))
            line = (json.dumps(result) + "\n").encode()
            write_atomically(os.path.join(cfg.output_dir, "results.jsonl"), lambda f: f.write(line))
            log.info(
                f"[{result['task']}] {result['label']} seed={cfg.seed}: val acc {100 * result['val_acc']:.2f}%, test acc "
                f"{100 * result['test_acc']:.2f}% ({result['params']:,} params, {result['train_time_s']:.1f} s training) "
                f"-> {cfg.output_dir}"
            )
        for logger in runner.loggers:  # Lightning's loggers log on rank zero only
            logger.log_metrics({f"final/{key}": float(value) for key, value in result.items() if is_number(value)})
            logger.save()
        return result
    finally:
        if any(isinstance(logger, WandbLogger) for logger in runner.loggers):
            import wandb

            wandb.finish()  # under multirun, the next job must start its own W&B run


def _no_tips(record: logging.LogRecord) -> bool:
    """A logging filter: drops Lightning's advertisements ("Tip: ... litlogger / litmodels"), which every Trainer repeats."""
    return "💡 Tip:" not in record.getMessage()


def _remove_hydra_files(output_dir: str) -> None:
    """After a config error: remove what Hydra wrote into the job's folder (its ``.hydra`` files and ``run.log``),
    and the folder if that empties it. Anything else is left alone, as is a sweep's ``multirun.yaml``."""
    folder = Path(output_dir)
    subdir = HydraConfig.get().output_subdir
    if subdir is not None:
        for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
            (folder / subdir / name).unlink(missing_ok=True)
    (folder / "run.log").unlink(missing_ok=True)
    for empty in ([folder / subdir] if subdir is not None else []) + [folder]:
        if empty.is_dir() and not any(empty.iterdir()):
            empty.rmdir()


def _config_path() -> str:
    """The wheel ships ``conf/`` as the package ``lightning_mk.conf``; run from a source checkout (where
    ``python -m`` imports this file from the tree, whatever is installed) it is the checkout's top-level ``conf/``."""
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "pyproject.toml").is_file() and (checkout / "conf" / "config.yaml").is_file():
        return str(checkout / "conf")
    return "pkg://lightning_mk.conf"


@hydra.main(version_base="1.3", config_path=_config_path(), config_name="config")
def main(cfg: DictConfig) -> float:
    """Run one job and return its validation accuracy (``val_acc``): the value a Hydra sweeper such as Optuna
    optimises, so test accuracy stays unseen while tuning."""
    for handler in logging.getLogger().handlers:  # Hydra's job logging: the console and run.log
        handler.addFilter(_no_tips)
    logging.captureWarnings(True)  # into run.log as well as the console
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")  # Lightning's, once per Trainer
    try:
        val_acc = run(cfg)["val_acc"]
    except ConfigError:
        _remove_hydra_files(HydraConfig.get().runtime.output_dir)
        raise
    if torch.distributed.is_initialized():  # a DDP job: gloo's threads left to interpreter exit can abort it
        torch.distributed.destroy_process_group()
    return val_acc


if __name__ == "__main__":  # run the importable module's main, so configs name its functions, not __main__'s
    from lightning_mk.experiments.run import main as _main

    _main()
