"""``MajorityKernelCallback``: train with k copies of every kernel, save the plain model at the end."""

from __future__ import annotations

import contextlib
import copy
import os
import posixpath
import re
import tempfile
import weakref
from collections.abc import Iterable, Iterator
from typing import Any, Optional, Union

import lightning.pytorch as pl
import torch
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import _is_dir
from lightning.pytorch.callbacks import Callback, WeightAveraging
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, SingleDeviceStrategy, Strategy
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel
from typing_extensions import override

from lightning_mk.apply import MajorityKernels, apply_majority_kernels
from lightning_mk.atomic import write_atomically
from lightning_mk.collapsing import collapse, collapsed_state_dict, copy_spread
from lightning_mk.control import NoiseOnGap
from lightning_mk.forms import get_form
from lightning_mk.layers import Coverage
from lightning_mk.norms import NormStatistics
from lightning_mk.parametrization import MajorityKernel, has_majority_kernels
from lightning_mk.settings import Settings

__all__ = ["MajorityKernelCallback", "SUPPORTED_STRATEGIES"]

#: Strategies the callback works with, subclasses included (DeepSpeedStrategy is a DDPStrategy). FSDP
#: and DeepSpeed are tested on the CPU through Lightning (tests/test_sharded.py); the README's support
#: table says what ran where.
SUPPORTED_STRATEGIES = (SingleDeviceStrategy, DDPStrategy, FSDPStrategy)
SHARDED_STRATEGIES = (FSDPStrategy, DeepSpeedStrategy)


class MajorityKernelCallback(Callback):
    """Train the LightningModule with ``k`` copies of every chosen kernel; deploy it at its own size.

    The model is rewritten in ``setup``, after the callback has run the module's ``configure_model`` itself
    (in the contexts Lightning runs it in; Lightning asks for it to be idempotent), so layers built there
    are covered, and the strategy and the optimizer see the copies.
    Training steps draw a fresh combination of the copies; validation and test run in eval mode on
    the mean (``mu`` when decoupled), so the metrics logged are the deployable model's. At the end of
    ``fit`` the plain model's ``state_dict`` is written to ``save_path`` (rank zero, atomically); it loads
    with ``strict=True`` into the user's unmodified LightningModule. Under FSDP and DeepSpeed the copies
    are sharded like any parameter and gathered into full tensors for that file.

    Lightning checkpoints (single device and DDP) hold the plain model too: their ``state_dict`` is the
    deployed one and any module among the hyperparameters is the plain module, so ``load_from_checkpoint``
    without this callback gives the deployed model; the copies travel in this callback's state, from which
    it restores them exactly when a fit resumes. One draw is made per optimizer step, so micro-batches
    accumulated into one step share it (accumulating equals training with the larger batch).

    By default the strength of the draws sets itself: ``form="relative"`` trains the deployed kernel at the plain
    model's pace with draws at a fixed relative distance from it, the noise level starts at zero (plain training)
    and follows the gap between the training loss and the validation loss named by ``monitor``
    (:class:`~lightning_mk.control.NoiseOnGap`, up to ``noise``), and ``decay`` holds the deployed kernel's norm
    in proportion. :meth:`published` gives the method as published. With one of Lightning's ``WeightAveraging``
    callbacks (``EMAWeightAveraging``) after this one in the trainer's callbacks, the average is what is saved, its
    batch-norm statistics recomputed.

    Args:
        monitor: the logged validation loss that sets the noise level (``"auto"``: ``val_loss``, ``val/loss``,
            ``valid_loss``, ``validation_loss``, or their ``_epoch`` forms; without one the level stays at zero,
            with a warning); None: a fixed level, ``noise``.
        form, noise, decay: as in :class:`~lightning_mk.settings.Settings`, with the defaults above (``noise``:
            the controller's ceiling when ``monitor`` is set).
        anneal_noise: shrink the noise level linearly from ``noise`` to zero over training
            (``trainer.estimated_stepping_batches``), so the last steps train the model that is evaluated
            and deployed.
        per_rank_noise: each data-parallel rank draws its own coefficients (default: all ranks draw
            the same, so the ranks' gradients are of one sampled model).
        save_path: file for the plain ``state_dict``, a path or any URL Lightning's checkpoints take
            (``s3://...``, through fsspec); default ``<log_dir>/small_model.pt``, for each fit.
        collapse_module: also collapse the in-memory module at the end of ``fit``, so a later
            ``trainer.test()`` or ``trainer.save_checkpoint()`` sees the plain model.
        norm_batches: after a training step with noise, the deployed model's batch-norm statistics are recomputed
            before each validation and before saving, from the inputs of the last ``norm_batches`` training forwards
            (kept in memory; :class:`~lightning_mk.norms.NormStatistics`); 0: they stay the sampled models'.
        log_spread: log each kernel's copy spread (RMS distance from the mean, relative) per epoch;
            under FSDP from each rank's own rows of the copies, under DeepSpeed one kernel at a time.
        **settings: the other options of :class:`~lightning_mk.settings.Settings`, by name: ``k``, ``scheme``,
            ``init``, ``include``, ``exclude``, ``layer_types``, ``biases``, ``init_noise``, ``grad_scale``,
            ``seed``. Resuming a fit needs the checkpoint's k, scheme, init,
            form and seed (refused otherwise, naming both values). The coverage is logged when the model is
            rewritten, with a warning when layers of unregistered types hold over 10% of the parameters.
    """

    def __init__(
        self,
        *,
        anneal_noise: bool = False,
        per_rank_noise: bool = False,
        save_path: Optional[Union[str, os.PathLike]] = None,
        collapse_module: bool = False,
        log_spread: bool = True,
        monitor: Optional[str] = "auto",
        form: str = "relative",
        noise: float = 0.3,
        decay: float = 5e-4,
        norm_batches: int = 8,
        **settings: Any,
    ) -> None:
        self.settings = Settings(form=form, noise=noise, decay=decay, **settings)
        if monitor is not None and not (isinstance(monitor, str) and monitor):
            raise ValueError(f"monitor names the logged validation loss (e.g. 'val_loss'), or is 'auto' or None; got {monitor!r}")
        self.monitor = monitor
        if isinstance(norm_batches, bool) or not isinstance(norm_batches, int) or norm_batches < 0:
            raise ValueError(f"norm_batches is the number of training forwards kept for batch-norm statistics, an int >= 0; got {norm_batches!r}")
        self.norm_batches = norm_batches
        self._norms: Optional[NormStatistics] = None  # while fitting
        self._noisy = False  # a training step drew with noise since the statistics were last recomputed
        self._norms_warned = False
        #: The noise level's controller when ``monitor`` is set (its ceiling is ``noise``), else None.
        self.control = None if monitor is None or not self._random else NoiseOnGap(self.settings.noise)
        self._unmeasured: Optional[str] = None  # with monitor="auto": why the level stays at zero (warned once)
        self._train_loss: tuple[Any, int] = (0.0, 0)  # sum and count of the training losses since the last validation
        flags = dict(anneal_noise=anneal_noise, per_rank_noise=per_rank_noise, collapse_module=collapse_module)
        for name, flag in (flags | {"log_spread": log_spread}).items():
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be True or False, got {flag!r}")
        self.anneal_noise = anneal_noise
        self.per_rank_noise = per_rank_noise
        self.save_path = None if save_path is None else os.fspath(save_path)
        self.collapse_module = collapse_module
        self.log_spread = log_spread
        self._module: Optional[weakref.ref] = None  # the module this callback rewrote (and maybe collapsed)
        #: The handle of the module being trained: set when the module is rewritten, None once collapsed.
        self.kernels: Optional[MajorityKernels] = None
        self._fitting = True  # False in validate/test/predict, which read only the mean
        #: The file the current (or last) fit writes the small model to: ``save_path``, or its default.
        self.small_model_path = self.save_path
        self._total_steps = 0  # optimizer steps in this fit, for anneal_noise

    @property
    def _random(self) -> bool:
        """False for a re-parametrisation (``form="doconv"``, ``"expand"``): no draws, so no noise level to control or log."""
        return get_form(self.settings.form).random

    @classmethod
    def published(cls, **options: Any) -> "MajorityKernelCallback":
        """Majority Kernels as published: the copies themselves (``form="copies"``), their mean deployed, every
        draw at full noise, no controller, no decay, batch-norm statistics as training left them; ``options`` as for the constructor."""
        return cls(**(dict(form="copies", noise=1.0, decay=0.0, monitor=None, norm_batches=0) | options))

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        strategy = trainer.strategy
        if not isinstance(strategy, SUPPORTED_STRATEGIES):
            raise ValueError(
                "MajorityKernelCallback supports the single-device, DDP, FSDP and DeepSpeed strategies, "
                f"not {type(strategy).__name__}"
            )
        if self.collapse_module and isinstance(strategy, SHARDED_STRATEGIES):
            raise ValueError(
                f"collapse_module=True rewrites the module in place, which {type(strategy).__name__} has wrapped "
                "or partitioned; load the saved small model (save_path) into a new module instead"
            )
        self._fitting = stage == "fit"
        if self._fitting:
            if self._owns(pl_module) and self.kernels is None:
                raise ValueError(
                    "this module was collapsed by this MajorityKernelCallback at the end of an earlier fit; "
                    "use a new MajorityKernelCallback to train it with majority kernels again"
                )
            if self.anneal_noise and trainer.max_steps == -1 and trainer.max_epochs == -1:
                raise ValueError("anneal_noise=True needs a finite training length: set max_epochs or max_steps")
            self._resolve_save_path(trainer)
            averaging = _averaging(trainer.callbacks[: trainer.callbacks.index(self)])
            if averaging:
                raise ValueError(
                    f"{type(averaging[0]).__name__} comes before MajorityKernelCallback in the trainer's callbacks, so it "
                    "would average the model before it has copies: put MajorityKernelCallback first"
                )
        # Lightning calls configure_model right after setup; call it first, in the contexts Lightning uses (it
        # must be idempotent: Lightning calls it once per stage), so that layers built there get copies before
        # the strategy wraps the model or a checkpoint is restored, as WeightAveraging does
        if is_overridden("configure_model", pl_module):
            with strategy.tensor_init_context(), strategy.model_sharded_context(), trainer.precision_plugin.module_init_context():
                pl_module.configure_model()
        self._apply(pl_module)
        if self._fitting and self._norms is None:
            self._norms = NormStatistics(pl_module, self.norm_batches)

    def _resolve_save_path(self, trainer: "pl.Trainer") -> None:
        """This fit's file (``save_path``, or by default in this trainer's log directory), checked on rank zero
        for writing before training. Paths and URLs go through fsspec, as Lightning's checkpoints do
        (``s3://``, ``memory://``, ...)."""
        default = self.save_path is None
        self.small_model_path = os.path.join(trainer.log_dir or trainer.default_root_dir, "small_model.pt") if default else self.save_path
        fs, path = url_to_fs(self.small_model_path)
        directory = posixpath.dirname(path)
        if default:
            fs.makedirs(directory, exist_ok=True)
        if not trainer.is_global_zero:
            return
        if fs.isdir(path):
            raise ValueError(f"save_path={self.small_model_path!r} is a directory; give a file path")
        if not _is_dir(fs, directory):  # object stores have no directories: any prefix not taken by a file
            raise ValueError(f"the directory of save_path={self.small_model_path!r} does not exist: create it first")
        if not isinstance(fs, LocalFileSystem):  # a probe there would leave an object, or need the right to delete
            return
        try:  # os.access() says yes to root on read-only places; a real file says the truth
            with tempfile.TemporaryFile(dir=directory):
                pass
        except OSError as e:
            raise ValueError(f"cannot write to the directory of save_path={self.small_model_path!r}: {e}") from None

    def _owns(self, pl_module: "pl.LightningModule") -> bool:
        return self._module is not None and self._module() is pl_module

    def _apply(self, pl_module: "pl.LightningModule") -> None:
        """Rewrite the module, unless an earlier stage already did (e.g. ``trainer.test()`` after ``fit``)."""
        if self._owns(pl_module):
            return
        if any(isinstance(m, FullyShardedDataParallel) for m in pl_module.modules()):
            raise ValueError(
                "configure_model wrapped layers in FSDP itself; MajorityKernelCallback must rewrite them first: "
                "let FSDPStrategy wrap them (its auto_wrap_policy) instead"
            )
        with _gathered(pl_module.parameters()):  # DeepSpeed ZeRO-3 built the layers partitioned
            rank = pl_module.global_rank if self.per_rank_noise else None
            self.kernels = apply_majority_kernels(pl_module, self.settings, rank=rank, step_on_forward=False)
        if isinstance(pl_module.trainer.strategy, FSDPStrategy):
            # FSDP1 keeps the copies as views of a flat parameter whose gradient has the sharded size,
            # which dynamo cannot trace (torch 2.13): draw eagerly there, a graph break per kernel
            for module in pl_module.modules():
                if isinstance(module, MajorityKernel):
                    module.traceable = False
        self._module = weakref.ref(pl_module)
        if isinstance(pl_module.trainer.strategy, SHARDED_STRATEGIES):
            _refuse_pickled_modules(pl_module)
        _report_coverage(self.kernels.coverage, pl_module.trainer)

    @override
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.kernels is not None and not has_majority_kernels(pl_module):
            raise RuntimeError(
                "configure_model built new layers after MajorityKernelCallback gave the first ones copies; make it "
                "idempotent, as Lightning asks (build the layers only if they do not exist yet)"
            )

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.anneal_noise:  # only then: estimating the run's length may set up the train dataloader
            self._total_steps = trainer.estimated_stepping_batches

    @override
    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int) -> None:
        # one draw per optimizer step, numbered from 1; a resumed run continues from the restored global_step
        self.kernels.step = trainer.global_step + 1
        # set every step (the buffers may have been re-materialised since setup); annealed by optimizer steps
        # taken, so a resumed run continues the schedule
        anneal = max(0.0, 1.0 - trainer.global_step / self._total_steps) if self.anneal_noise else 1.0
        level = self.settings.noise if self.control is None else self.control.level
        self.kernels.draws.noise = level * anneal
        self._noisy = self._noisy or (self._random and level * anneal > 0)

    @override
    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.control is None:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor):
            self._unmeasurable(
                f"MajorityKernelCallback(monitor={self.monitor!r}) compares the training loss with the validation loss, "
                f"and training_step returned {type(outputs).__name__}: return the loss (or a dict with 'loss')",
                TypeError,
            )
            return
        scale = trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1  # Lightning divided it
        total, count = self._train_loss
        self._train_loss = (loss.detach().float() * scale + total, count + 1)  # no device sync per step

    def _unmeasurable(self, message: str, error: type) -> None:
        """A loss the controller needs is missing: an error for a named ``monitor``; with ``monitor="auto"`` the
        level stays where it is (zero: plain training), with one warning."""
        if self.monitor != "auto":
            raise error(message)
        if self._unmeasured is None:
            self._unmeasured = message
            rank_zero_warn(f"{message}. Until it is, the noise level stays at {self.control.level:g}")

    @override
    def on_validation_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._fitting and not trainer.sanity_checking:
            self._recalibrate()

    def _recalibrate(self) -> None:
        """The deployed model's batch-norm statistics, if a step drew with noise since they were last computed."""
        if not (self._noisy and self._norms is not None and self._norms.hooked):
            return
        if self._norms.recalibrate():
            self._noisy = False
        elif not self._norms_warned:
            self._norms_warned = True
            rank_zero_warn(
                "MajorityKernelCallback: the batch-norm statistics were not recomputed for the deployed kernels: no "
                "training forward was kept (under torch.compile the model runs in compiled graphs, where keeping "
                "inputs would recompile every step); they stay those of the sampled kernels"
            )

    @override
    def on_validation_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.control is None or not self._fitting or trainer.sanity_checking:
            return
        name = _validation_loss(trainer.callback_metrics) if self.monitor == "auto" else self.monitor
        if name not in trainer.callback_metrics:
            self._unmeasurable(
                f"MajorityKernelCallback(monitor={self.monitor!r}) sets the noise level from the validation loss, which "
                f"was not logged (logged: {sorted(trainer.callback_metrics)}); log it, or name it with monitor=",
                KeyError,
            )
            return
        value = trainer.callback_metrics[name]
        total, count = self._train_loss
        if count == 0:  # a validation without training since the last one
            return
        # every rank's training loss and rank zero's validation loss, so that all ranks draw at one level
        train = trainer.strategy.reduce(torch.as_tensor(total / count, device=pl_module.device), reduce_op="mean")
        self.control.update(float(train), trainer.strategy.broadcast(float(value), src=0))
        self._train_loss = (0.0, 0)

    @override
    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.log_spread and self._random:
            spread = _copy_spread(trainer.strategy)
            metrics = {f"mk/spread/{name}": value for name, value in spread.items()}
            metrics["mk/spread"] = sum(spread.values()) / len(spread)
            if self.control is not None:
                metrics["mk/noise"] = self.control.level
            pl_module.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=True)  # equal on every rank

    @override
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        for averaging in _averaging(trainer.callbacks[trainer.callbacks.index(self) + 1 :]):
            averaging.on_train_end(trainer, pl_module)  # the average is the model trained: deploy it (idempotent)
            self._noisy = True  # and its batch-norm statistics are an average of statistics: recompute them
        self._recalibrate()
        state = _full_state(trainer.strategy)
        if trainer.is_global_zero:
            small = collapsed_state_dict(state)
            diverged = [name for name, value in small.items() if _non_finite(value)]
            if diverged:  # a diverged run does not overwrite a good file
                rank_zero_warn(
                    f"MajorityKernelCallback: the trained model has non-finite values in {', '.join(diverged)}; "
                    f"it was NOT saved, {self.small_model_path} is left as it was"
                )
            else:
                write_atomically(self.small_model_path, lambda f: torch.save(small, f))
                rank_zero_info(f"MajorityKernelCallback: saved the plain model (k={self.settings.k} collapsed) to {self.small_model_path}")
        trainer.strategy.barrier("majority_kernels_saved")
        if self.collapse_module:
            self.kernels.collapse()
            self.kernels = None

    @override
    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage == "fit" and self._norms is not None:
            self._norms.remove()
            self._norms = None
        # ddp_spawn/ddp_fork: the main process loads this worker's state dict into its own, plain module with
        # strict=False, which would drop the copies without a word: hand it the deployed model instead
        if stage == "fit" and self.kernels is not None and isinstance(trainer.strategy.launcher, _MultiProcessingLauncher):
            self.kernels.collapse()
            self.kernels = None

    @override
    def state_dict(self) -> dict[str, Any]:
        state = self.settings.resumed()
        if self.control is not None:
            state["noise_control"] = self.control.state_dict() | {"train_loss": [float(self._train_loss[0]), self._train_loss[1]]}
        return state

    @override
    def on_save_checkpoint(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", checkpoint: dict[str, Any]) -> None:
        """Make the checkpoint the plain model's, as ``ModelPruning`` makes its pruning permanent there: the
        ``state_dict`` deployed, the copies moved to this callback's state (``kernels``), and every module among
        the hyperparameters (a ``net`` passed to ``__init__`` and kept by ``save_hyperparameters``) a collapsed
        copy, which pickles. Sharded checkpoints are written by the strategy and keep the copies in place."""
        if self.kernels is None or isinstance(trainer.strategy, SHARDED_STRATEGIES):
            return
        state = checkpoint["state_dict"]
        small = collapsed_state_dict(state)
        checkpoint["state_dict"] = small
        checkpoint["callbacks"][self.state_key]["kernels"] = {key: value for key, value in state.items() if key not in small}
        hparams = checkpoint.get(pl_module.CHECKPOINT_HYPER_PARAMS_KEY)
        if isinstance(hparams, dict):
            for name, value in hparams.items():
                if isinstance(value, nn.Module) and has_majority_kernels(value):
                    hparams[name] = collapse(copy.deepcopy(value))

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the copies saved with the checkpoint (its ``state_dict`` loaded them as copies of the deployed
        kernel). Training on needs the checkpoint's k, scheme, init, form and seed (the draws continue its
        sequence, from the restored ``global_step``); validate, test and predict use the eval-mode kernel only
        and take any, restoring the copies when k, scheme and form match."""
        if self._fitting:
            self.settings.check_resume(state_dict, "the checkpoint being resumed", "this MajorityKernelCallback")
        if self._fitting and self.control is not None and "noise_control" in state_dict:
            self.control.load_state_dict(state_dict["noise_control"])
            total, count = state_dict["noise_control"]["train_loss"]
            self._train_loss = (total, count)
        same = all(state_dict.get(name) == getattr(self.settings, name) for name in ("k", "scheme", "form"))
        if "kernels" in state_dict and self.kernels is not None and same:
            loaded = self.kernels.module.load_state_dict(state_dict["kernels"], strict=False)
            if loaded.unexpected_keys:
                raise ValueError(
                    f"the checkpoint's majority kernels {loaded.unexpected_keys} are not in this model: resume with "
                    "the include, exclude, layer_types and biases it was trained with"
                )


#: What ``monitor="auto"`` takes for the validation loss: val_loss, val/loss, valid_loss, validation_loss, ...
_VALIDATION_LOSS = re.compile(r"val(id(ation)?)?[_/.\-]?loss(_epoch)?", re.IGNORECASE)


def _validation_loss(metrics: dict[str, Any]) -> Optional[str]:
    """The name of the validation loss among the logged ``metrics`` (the first in sorted order), or None."""
    return next((name for name in sorted(metrics) if _VALIDATION_LOSS.fullmatch(name)), None)


def _averaging(callbacks: list[Callback]) -> list[WeightAveraging]:
    return [callback for callback in callbacks if isinstance(callback, WeightAveraging)]


def _gathered(params: Iterable[torch.Tensor]) -> contextlib.AbstractContextManager:
    """Inside, those of ``params`` that DeepSpeed ZeRO-3 partitions are whole on every rank."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned)


def _copy_spread(strategy: Strategy) -> dict[str, float]:
    """:func:`copy_spread` of the MK model, the same on every rank (a collective), never gathered whole: under
    FSDP from each rank's rows of the copies (its sharded state dict), under ZeRO-3 one kernel gathered at a
    time, from its fp32 master as at the end; elsewhere every rank holds the copies."""
    if isinstance(strategy, FSDPStrategy):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return copy_spread(get_model_state_dict(strategy.model, options=StateDictOptions(full_state_dict=False)))
    if isinstance(strategy, DeepSpeedStrategy):
        return copy_spread(strategy.lightning_module.state_dict(keep_vars=True), whole=_deepspeed_master)
    return copy_spread(strategy.lightning_module)


def _full_state(strategy: Strategy) -> dict[str, Any]:
    """The MK model's state dict with whole tensors, complete on rank zero (a collective: every rank calls it).

    Single-device and DDP: the module's own tensors, on every rank. FSDP: its full state dict, gathered
    into rank zero's CPU memory when training on GPUs (other ranks get ``{}``). DeepSpeed: see
    :func:`_deepspeed_masters`.
    """
    if isinstance(strategy, FSDPStrategy):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        to_cpu = strategy.root_device.type != "cpu"
        return get_model_state_dict(strategy.model, options=StateDictOptions(full_state_dict=True, cpu_offload=to_cpu))
    state = strategy.lightning_module.state_dict(keep_vars=True)
    return _deepspeed_masters(strategy, state) if isinstance(strategy, DeepSpeedStrategy) else state


def _deepspeed_masters(strategy: DeepSpeedStrategy, state: dict[str, Any]) -> dict[str, Any]:
    """``state`` with each parameter replaced by DeepSpeed's fp32 master of it, whole, in rank zero's CPU
    memory (other ranks get ``{}``). Under mixed precision Lightning's DeepSpeed turns the module itself
    into 16-bit copies of the masters, which live, sharded, in DeepSpeed's optimizer; so the small model
    is collapsed from the masters, in fp32 as with the other strategies (in the module's dtype under a "-true"
    precision). A parameter the optimizer does not hold (frozen) is read from the module."""
    true_precision = strategy.precision_plugin.precision.endswith("-true")
    whole: dict[int, Optional[torch.Tensor]] = {}  # by parameter: tied copies are read once and stay one tensor
    for key, value in state.items():
        if not isinstance(value, torch.nn.Parameter):
            continue
        if id(value) not in whole:
            with _deepspeed_master(value) as source:
                dtype = value.dtype if true_precision else torch.float32
                whole[id(value)] = source.to("cpu", dtype, copy=True) if strategy.is_global_zero else None
        state[key] = whole[id(value)]
    return state if strategy.is_global_zero else {}


@contextlib.contextmanager
def _deepspeed_master(param: torch.Tensor) -> Iterator[torch.Tensor]:
    """Inside, one parameter whole on every rank (a collective): DeepSpeed's fp32 master of it, or, for a
    parameter its optimizer does not hold (frozen), the module's own, gathered under ZeRO-3."""
    from deepspeed.utils import safe_get_full_fp32_param

    master = safe_get_full_fp32_param(param) if param.requires_grad else None
    with _gathered([param] if master is None else []):
        yield param.detach() if master is None else master


def _non_finite(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all())


def _refuse_pickled_modules(pl_module: "pl.LightningModule") -> None:
    """A module among the hyperparameters is pickled into every checkpoint, which a module with majority kernels
    cannot be; single-device and DDP checkpoints pickle a collapsed copy, sharded ones cannot make one."""
    held = [name for name, value in pl_module.hparams.items() if isinstance(value, nn.Module) and has_majority_kernels(value)]
    if held:
        raise ValueError(
            f"the hyperparameters hold the module(s) {held}, which Lightning pickles into every checkpoint; under "
            f"{type(pl_module.trainer.strategy).__name__} a module with majority kernels cannot be pickled: call "
            f"self.save_hyperparameters(ignore={held}) in the LightningModule's __init__"
        )


def _report_coverage(coverage: Coverage, trainer: "pl.Trainer") -> None:
    """Log what got copies, to the console and the trainer's loggers (with the run's hyperparameters); warn when
    layers of unregistered types hold over 10% of the parameters, so a model built from other libraries'
    layers is not trained mostly single without a word."""
    rank_zero_info(f"MajorityKernelCallback: {coverage}")
    summary = {"mk/coverage": coverage.share, "mk/kernels": coverage.kernels, "mk/deployed_parameters": coverage.total}
    for logger in trainer.loggers:
        logger.log_hyperparams(summary)
    if coverage.unregistered_share > 0.1:
        kinds = sorted(coverage.unregistered.items(), key=lambda item: -item[1])
        named = ", ".join(f"{kind.__module__}.{kind.__qualname__} ({n / coverage.total:.1%})" for kind, n in kinds)
        rank_zero_warn(
            f"MajorityKernelCallback: {coverage.unregistered_share:.1%} of the trainable parameters are in layers of "
            f"types no registered layer type covers, and train without copies: {named}. To give them copies, call "
            "lightning_mk.register_layer(<type or its qualified name>, kernels=(<parameter names>,)) before fit."
        )
