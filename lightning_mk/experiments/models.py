"""Small models for the examples and experiments: plain PyTorch networks and one LightningModule."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple, Optional

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

__all__ = ["MLP", "ResNet", "CNN", "Transformer", "Hidden", "Classifier"]


class Hidden(NamedTuple):
    """One prunable hidden dimension of width ``n``: ``producer`` makes the units (output rows, with its
    bias), ``norm`` (optional) normalises them per unit, ``consumer`` reads them (input columns).

    The width parameter ``n`` of every model here is exactly the size of these dimensions, so the
    k-times-wider model and the small model differ only there, and selecting n of its k*n units gives
    the small model's architecture (the submodular baseline relies on it)."""

    name: str
    producer: nn.Module
    norm: Optional[nn.Module]
    consumer: nn.Module


def _check_width(**sizes: int) -> None:
    for key, value in sizes.items():
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"model {key} must be a positive integer, got {value!r}")


class MLP(nn.Module):
    """``depth`` hidden layers of width ``n`` with ReLU."""

    def __init__(self, in_shape: Sequence[int], num_classes: int, n: int = 128, depth: int = 2, dropout: float = 0.0) -> None:
        super().__init__()
        _check_width(n=n, depth=depth)
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(in_shape)
        for _ in range(depth):
            layers += [nn.Linear(width, n), nn.ReLU(), nn.Dropout(dropout)]  # always there: same keys with or without
            width = n
        layers.append(nn.Linear(width, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    def hidden(self) -> list[Hidden]:
        linears = [(name, m) for name, m in self.layers.named_children() if isinstance(m, nn.Linear)]
        return [Hidden(f"layers.{a}", pa, None, pb) for (a, pa), (_, pb) in zip(linears, linears[1:])]


class ResidualBlock(nn.Module):
    """conv(channels -> n) BN ReLU conv(n -> channels) BN, plus the identity."""

    def __init__(self, channels: int, n: int, dim: int) -> None:
        super().__init__()
        conv, norm = (nn.Conv1d, nn.BatchNorm1d) if dim == 1 else (nn.Conv2d, nn.BatchNorm2d)
        self.conv1, self.norm1 = conv(channels, n, 3, padding=1, bias=False), norm(n)
        self.conv2, self.norm2 = conv(n, channels, 3, padding=1, bias=False), norm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.norm2(self.conv2(F.relu(self.norm1(self.conv1(x))))))


class ResNet(nn.Module):
    """A small ResNet over 1-D signals (``in_shape = (length,)`` or ``(channels, length)``) or images
    (``(channels, height, width)``): a stem to ``channels``, ``blocks`` residual blocks of inner
    width ``n``, global average pooling, a linear head."""

    def __init__(
        self, in_shape: Sequence[int], num_classes: int, n: int = 32, channels: int = 32, blocks: int = 2, dropout: float = 0.0
    ) -> None:
        super().__init__()
        _check_width(n=n, channels=channels, blocks=blocks)
        self.in_shape = tuple(in_shape) if len(in_shape) > 1 else (1, *in_shape)
        dim = len(self.in_shape) - 1
        conv, norm = (nn.Conv1d, nn.BatchNorm1d) if dim == 1 else (nn.Conv2d, nn.BatchNorm2d)
        self.stem = nn.Sequential(conv(self.in_shape[0], channels, 3, padding=1, bias=False), norm(channels), nn.ReLU())
        self.blocks = nn.Sequential(*(ResidualBlock(channels, n, dim) for _ in range(blocks)))
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.stem(x.view(x.shape[0], *self.in_shape)))
        return self.head(self.dropout(h.flatten(2).mean(2)))

    def hidden(self) -> list[Hidden]:
        return [Hidden(f"blocks.{i}", b.conv1, b.norm1, b.conv2) for i, b in enumerate(self.blocks)]


class CNN(nn.Module):
    """A small 1-D convolutional network without normalisation layers, over signals (``in_shape = (length,)``
    or ``(channels, length)``): conv(kernel 5) to ``n`` channels, conv(kernel 3, stride 2) to ``n``, conv(kernel 3,
    stride 2) to ``channels``, each with ReLU, then a linear head on the flattened features.

    ``n`` is the width of the two hidden dimensions between the convolutions. The last convolution's
    ``channels`` stay as they are in the k-times-wider model (like the ResNet's): the linear head reads each of
    them as one feature per position, a consumer the submodular selection does not handle."""

    def __init__(self, in_shape: Sequence[int], num_classes: int, n: int = 32, channels: int = 32, dropout: float = 0.0) -> None:
        super().__init__()
        _check_width(n=n, channels=channels)
        self.in_shape = tuple(in_shape) if len(in_shape) > 1 else (1, *in_shape)
        if len(self.in_shape) != 2:
            raise ValueError(f"CNN is 1-D: in_shape must be (length,) or (channels, length), got {tuple(in_shape)}")
        in_channels, length = self.in_shape
        self.conv1 = nn.Conv1d(in_channels, n, 5, padding=2)
        self.conv2 = nn.Conv1d(n, n, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(n, channels, 3, stride=2, padding=1)
        length = (length + 1) // 2  # each stride-2 convolution: ceil(length / 2)
        length = (length + 1) // 2
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(channels * length, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1(x.view(x.shape[0], *self.in_shape)))
        h = F.relu(self.conv3(F.relu(self.conv2(h))))
        return self.head(self.dropout(h.flatten(1)))

    def hidden(self) -> list[Hidden]:
        return [Hidden("conv1", self.conv1, None, self.conv2), Hidden("conv2", self.conv2, None, self.conv3)]


class LinearAttention(nn.Module):
    """Multi-head self-attention with separate ``nn.Linear`` q, k, v and output projections."""

    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.out = (nn.Linear(d_model, d_model) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (f(x).view(b, t, self.heads, d // self.heads).transpose(1, 2) for f in (self.q, self.k, self.v))
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d))


class EncoderBlock(nn.Module):
    """Pre-norm Transformer block; its MLP has hidden width ``n``."""

    def __init__(self, d_model: int, heads: int, n: int, attention: str, dropout: float) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.mha = attention == "mha"
        self.attn = nn.MultiheadAttention(d_model, heads, batch_first=True) if self.mha else LinearAttention(d_model, heads)
        self.fc1, self.fc2 = nn.Linear(d_model, n), nn.Linear(n, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        h = self.attn(h, h, h, need_weights=False)[0] if self.mha else self.attn(h)
        x = x + self.dropout(h)
        return x + self.dropout(self.fc2(F.gelu(self.fc1(self.norm2(x)))))


class Transformer(nn.Module):
    """An encoder classifier over patches: a 1-D signal in patches of ``patch`` points, or an image in
    ``patch x patch`` squares; learned positions, ``layers`` blocks, mean pooling, a linear head."""

    def __init__(
        self,
        in_shape: Sequence[int],
        num_classes: int,
        n: int = 64,
        d_model: int = 32,
        heads: int = 4,
        layers: int = 2,
        patch: int = 4,
        attention: str = "mha",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        _check_width(n=n, d_model=d_model, heads=heads, layers=layers, patch=patch)
        if attention not in ("mha", "linear"):
            raise ValueError(f"model attention must be 'mha' or 'linear', got {attention!r}")
        if d_model % heads:
            raise ValueError(f"model d_model={d_model} must be divisible by heads={heads}")
        self.in_shape = tuple(in_shape) if len(in_shape) > 1 else (1, *in_shape)
        channels, *space = self.in_shape
        if any(size % patch for size in space):
            raise ValueError(f"model patch={patch} must divide the input size {space}")
        self.patch = patch
        tokens = math.prod(size // patch for size in space)
        self.embed = nn.Linear(channels * patch ** len(space), d_model)
        self.position = nn.Parameter(torch.randn(1, tokens, d_model) * 0.02)
        self.blocks = nn.Sequential(*(EncoderBlock(d_model, heads, n, attention, dropout) for _ in range(layers)))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_classes)

    def _patches(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(x.shape[0], *self.in_shape)
        if x.dim() == 3:  # (batch, channels, length) -> (batch, tokens, channels * patch)
            return x.unfold(2, self.patch, self.patch).permute(0, 2, 1, 3).flatten(2)
        return F.unfold(x, self.patch, stride=self.patch).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.embed(self._patches(x)) + self.position)
        return self.head(self.norm(h).mean(1))

    def hidden(self) -> list[Hidden]:
        return [Hidden(f"blocks.{i}", b.fc1, None, b.fc2) for i, b in enumerate(self.blocks)]


class Classifier(pl.LightningModule):
    """Cross-entropy training of ``net`` (any module whose forward gives logits); logs loss and accuracy for train,
    val and test. Without ``optimizer``, a LightningModule ``net`` is optimised by its own ``configure_optimizers``.
    ``scheduler`` (optional) makes a learning-rate scheduler from the optimizer, stepped once per epoch."""

    def __init__(
        self,
        net: nn.Module,
        num_classes: int,
        optimizer: Optional[Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]] = None,
        scheduler: Optional[Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]] = None,
    ) -> None:
        super().__init__()
        if scheduler is not None and optimizer is None and isinstance(net, pl.LightningModule):
            raise ValueError("a scheduler needs an optimizer: a LightningModule net without one keeps its own optimizers")
        self.net = net
        self.optimizer, self.scheduler = optimizer, scheduler
        self.accuracy = nn.ModuleDict({s: MulticlassAccuracy(num_classes) for s in ("train_", "val_", "test_")})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_loss(self, x: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The loss minimised in training; validation and test always report cross-entropy."""
        return F.cross_entropy(logits, y)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = self.training_loss(x, logits, y) if stage == "train" else F.cross_entropy(logits, y)
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

    def configure_optimizers(self):
        if self.optimizer is not None:
            optimizer = self.optimizer(self.net.parameters())
        elif isinstance(self.net, pl.LightningModule):
            return self.net.configure_optimizers()  # a LightningModule as ``net`` keeps its own optimizers
        else:
            optimizer = torch.optim.Adam(self.net.parameters(), lr=1e-3)
        if self.scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler(optimizer), "interval": "epoch"}}
