"""A user's code in the lightning-hydra-template's style, which knows nothing about Majority Kernels: the
LightningModule receives the network and keeps it with ``save_hyperparameters``, so Lightning pickles the
network into every checkpoint."""

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy


class DenseNet(nn.Module):
    def __init__(self, input_size: int = 8, hidden: int = 32, classes: int = 3) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Linear(input_size, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, classes))

    def forward(self, x):
        return self.model(x)


class LitModule(pl.LightningModule):
    def __init__(self, net: nn.Module, optimizer) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.net = net
        self.val_acc = MulticlassAccuracy(num_classes=3)
        self.test_acc = MulticlassAccuracy(num_classes=3)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val/loss", nn.functional.cross_entropy(logits, y))
        self.val_acc(logits, y)
        self.log("val/acc", self.val_acc)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.test_acc(self(x), y)
        self.log("test/acc", self.test_acc)

    def configure_optimizers(self):
        return self.hparams.optimizer(params=self.trainer.model.parameters())


class RandomData(pl.LightningDataModule):
    def __init__(self, n: int = 256, batch_size: int = 32, shuffle: bool = True) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, 8, generator=g)
        y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
        self.splits = torch.utils.data.random_split(TensorDataset(x, y), [0.5, 0.25, 0.25], generator=g)

    def train_dataloader(self):
        return DataLoader(self.splits[0], batch_size=self.hparams.batch_size, shuffle=self.hparams.shuffle)

    def val_dataloader(self):
        return DataLoader(self.splits[1], batch_size=self.hparams.batch_size)

    def test_dataloader(self):
        return DataLoader(self.splits[2], batch_size=self.hparams.batch_size)
