"""Small models for the examples and experiments: plain PyTorch networks and one LightningModule."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Optional

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

__all__ = ["MLP", "Classifier"]


class MLP(nn.Module):
    """``depth`` hidden layers of width ``n`` with ReLU."""

    def __init__(self, in_features: int, num_classes: int, n: int = 128, depth: int = 2, dropout: float = 0.0) -> None:
        super().__init__()
        if n <= 0 or depth <= 0:
            raise ValueError(f"MLP width n and depth must be > 0, got n={n}, depth={depth}")
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for _ in range(depth):
            layers += [nn.Linear(width, n), nn.ReLU()] + ([nn.Dropout(dropout)] if dropout else [])
            width = n
        layers.append(nn.Linear(width, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class Classifier(pl.LightningModule):
    """Cross-entropy training of ``net``; logs loss and accuracy for train, val and test."""

    def __init__(
        self,
        net: nn.Module,
        num_classes: int,
        optimizer: Optional[Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]] = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.optimizer = optimizer
        self.accuracy = nn.ModuleDict({s: MulticlassAccuracy(num_classes) for s in ("train_", "val_", "test_")})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.accuracy[stage + "_"](logits, y)
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True)
        self.log(f"{stage}/acc", self.accuracy[stage + "_"], on_step=False, on_epoch=True, prog_bar=stage != "train")
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer is None:
            return torch.optim.Adam(self.parameters(), lr=1e-3)
        return self.optimizer(self.parameters())
