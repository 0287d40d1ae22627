"""Knowledge distillation (Hinton et al., 2015): the small model learns the teacher's soft targets."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lightning_mk.experiments.models import Classifier

__all__ = ["kd_loss", "Ensemble", "Distiller"]


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor, temperature: float, alpha: float) -> torch.Tensor:
    """``alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)) + (1 - alpha) * CE(student, target)``.

    The ``T^2`` keeps the soft-target gradients on the scale of the hard-label ones as ``T`` changes.
    """
    soft = F.kl_div(
        F.log_softmax(student / temperature, dim=-1), F.log_softmax(teacher / temperature, dim=-1), reduction="batchmean", log_target=True
    )
    return alpha * temperature**2 * soft + (1 - alpha) * F.cross_entropy(student, target)


class Ensemble(nn.Module):
    """The mean of its members' logits (the teacher of a "distilled ensemble")."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members]).mean(0)


class Distiller(Classifier):
    """A ``Classifier`` whose training loss is :func:`kd_loss` against a frozen ``teacher``. The student ``net`` may
    be a LightningModule (whose forward gives logits): it then keeps its own optimizers."""

    def __init__(self, net: nn.Module, teacher: nn.Module, num_classes: int, temperature: float = 4.0, alpha: float = 0.9, optimizer=None) -> None:
        super().__init__(net, num_classes, optimizer)
        if temperature <= 0 or not 0 <= alpha <= 1:
            raise ValueError(f"distillation needs temperature > 0 and 0 <= alpha <= 1, got {temperature}, {alpha}")
        self.teacher = teacher.eval().requires_grad_(False)
        self.temperature, self.alpha = temperature, alpha

    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        self.teacher.eval()  # always: dropout or batch-norm updates would change the targets
        return self

    def training_loss(self, x: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher = self.teacher(x)
        return kd_loss(logits, teacher, y, self.temperature, self.alpha)
