"""Your own LightningModule and LightningDataModule, trained and compared by the experiment app.

    PYTHONPATH=examples python -m lightning_mk.experiments.run --config-dir examples/conf model=tiny data=blobs method=mk

Their configs, examples/conf/model/tiny.yaml and examples/conf/data/blobs.yaml, name the classes below by
``_target_``; ``--config-dir`` adds them to the app's config groups and PYTHONPATH makes this file importable.
What the app needs from a model of your own:

- every method: the module logs ``val/acc`` and ``test/acc`` (recorded as ``val_acc`` and ``test_acc``; ``test/loss``
  too if logged);
- ``distill``: its forward returns logits ``[batch, classes]`` and batches are ``(x, y)``;
- ``wide``, ``distill method.teacher=wide``, ``submodular``: an argument that sets the width, named by
  ``model.width_arg``; ``submodular`` also a ``hidden()`` listing the prunable dimensions.
"""

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_mk.experiments.models import Hidden


class Blobs(pl.LightningDataModule):
    """Overlapping Gaussian clusters, one per class; the points are fixed, the train/val split follows ``seed``."""

    def __init__(self, num_samples: int = 2000, features: int = 16, classes: int = 4, batch_size: int = 64, seed: int = 0) -> None:
        super().__init__()
        self.num_samples, self.features, self.classes, self.batch_size, self.seed = num_samples, features, classes, batch_size, seed

    def setup(self, stage: str | None = None) -> None:
        g = torch.Generator().manual_seed(0)
        centres = 0.3 * torch.randn(self.classes, self.features, generator=g)
        y = torch.randint(self.classes, (self.num_samples,), generator=g)
        x = centres[y] + torch.randn(self.num_samples, self.features, generator=g)
        test = self.num_samples // 5
        self.test_set = TensorDataset(x[:test], y[:test])
        order = torch.randperm(self.num_samples - test, generator=torch.Generator().manual_seed(self.seed)) + test
        val = len(order) // 8
        self.val_set = TensorDataset(x[order[:val]], y[order[:val]])
        self.train_set = TensorDataset(x[order[val:]], y[order[val:]])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, self.batch_size, shuffle=True, generator=torch.Generator().manual_seed(self.seed))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, self.batch_size)


class TinyClassifier(pl.LightningModule):
    """One hidden layer of width ``hidden``; its own loss, metrics and optimizer."""

    def __init__(self, features: int = 16, classes: int = 4, hidden: int = 32, lr: float = 1e-2) -> None:
        super().__init__()
        self.lr = lr
        self.fc1, self.fc2 = nn.Linear(features, hidden), nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True)
        self.log(f"{stage}/acc", (logits.argmax(1) == y).float().mean(), on_step=False, on_epoch=True)
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)

    def hidden(self) -> list[Hidden]:
        """For ``method=submodular``: fc1 makes the ``hidden`` units, fc2 reads them."""
        return [Hidden("fc1", self.fc1, None, self.fc2)]
