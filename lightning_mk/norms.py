"""Running statistics of the deployed model's normalisation layers: :class:`NormStatistics`."""

from __future__ import annotations

import collections
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.utils._pytree import tree_map

__all__ = ["NormStatistics"]


class NormStatistics:
    """Recomputes the running statistics of a model's batch-norm layers as the deployed kernels make them.

    In training a batch-norm layer records the statistics of the sampled kernels' activations, and the deployed
    kernel's differ (the draws' noise widens them); evaluating the deployed model with the sampled ones costs
    accuracy, the more the noisier the draws. So this keeps the inputs of the last ``batches`` training forwards
    of the outermost modules that hold such layers (references to tensors the step made anyway: ``batches``
    times one batch of memory), and :meth:`recalibrate` runs them again through the model in eval mode, the
    kernels deployed and the layers' statistics reset and averaged over those forwards (as
    ``torch.optim.swa_utils.update_bn`` does for an averaged model). Dropout is off in those forwards, as in
    evaluation. A model without such layers costs nothing.
    """

    def __init__(self, module: nn.Module, batches: int) -> None:
        self.inputs: collections.deque = collections.deque(maxlen=max(batches, 1))
        self._open: list[bool] = []  # per hooked forward running now: whether it counts as the model's call
        self._replaying = False  # inside recalibrate(), whose forwards are not kept
        self._handles = []
        names = [name for name, m in module.named_modules() if _tracks(m)]
        if not names or batches == 0:
            return
        # the root ("") and every module on the way to a layer, the layers' parents included: they stay when a
        # strategy swaps the layers themselves (DDP's sync_batchnorm converts them to SyncBatchNorm after setup)
        holders = {".".join(name.split(".")[:i]) for name in names for i in range(name.count(".") + 1)}
        for name in sorted(holders):
            holder = module.get_submodule(name)
            self._handles.append(holder.register_forward_pre_hook(self._enter, with_kwargs=True))
            self._handles.append(holder.register_forward_hook(self._exit, always_call=True))

    def _enter(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if torch.compiler.is_compiling():  # traced, this would guard on the kept inputs: a recompile per step
            return
        # a forward patched on the instance is Lightning's redirection of training_step through a strategy's
        # wrapper (DDP, FSDP, DeepSpeed): the step's own calls of the model are the ones to keep
        counted = "forward" not in vars(module)
        outermost = not self._replaying and not any(self._open)  # nested calls are part of the kept one
        if counted and outermost and module.training:
            self.inputs.append((module, tree_map(_detached, args), tree_map(_detached, kwargs)))
        self._open.append(counted)

    def _exit(self, module: nn.Module, args: tuple, output: Any) -> None:
        if not torch.compiler.is_compiling():
            self._open.pop()

    @property
    def hooked(self) -> bool:
        """Whether the model has layers with running statistics to recompute (and this is watching them)."""
        return bool(self._handles)

    def recalibrate(self) -> bool:
        """Reset the layers' statistics and average them over the kept inputs, run through the model in eval mode
        (its majority kernels deployed) with only those layers training; False when nothing was kept."""
        if not self.inputs:
            return False
        modules = {m for module, _, _ in self.inputs for m in module.modules()}
        norms = [m for m in modules if _tracks(m)]  # found now: the layers may have been swapped since
        modes = {m: m.training for m in modules}
        kept = [(norm.momentum, norm.num_batches_tracked.clone()) for norm in norms]
        try:
            for m in modules:
                m.training = False
            for norm in norms:
                norm.reset_running_stats()
                norm.momentum = None  # a cumulative average over the kept forwards
                norm.training = True
            self._replaying = True
            with torch.no_grad():
                for module, args, kwargs in self.inputs:
                    module(*args, **kwargs)
        finally:
            self._replaying = False
            for norm, (momentum, tracked) in zip(norms, kept):
                norm.momentum = momentum
                norm.num_batches_tracked.copy_(tracked)  # the count of training batches, as without this
            for m, mode in modes.items():
                m.training = mode
        return True

    def remove(self) -> None:
        """Remove the hooks and drop the kept inputs."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.inputs.clear()


def _tracks(module: nn.Module) -> bool:
    """A normalisation layer with running statistics (batch norm, or instance norm that tracks them)."""
    return isinstance(module, _NormBase) and module.track_running_stats


def _detached(value: Any) -> Any:
    return value.detach() if isinstance(value, torch.Tensor) else value
