"""The callback's defaults on two models written as a user would write them, outside the experiment app and the
tasks the defaults were chosen on: a VGG-style 2-D CNN with batch norm trained with SGD (on 1,000 training
samples, and overfitting on 200), and an overfitting ``torch.nn.TransformerEncoder`` trained with AdamW, all on
scikit-learn's 8x8 digits (no download). Each seed trains plain and with ``MajorityKernelCallback(k=4)`` from the
same initial weights and data order; the table gives test accuracy, the paired difference with its 95 % interval,
and the noise level the callback's controller ended at.

    python benchmarks/quality/heldout.py --seeds 0 1 2 3 4 --out benchmarks/results/quality/heldout.md
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_mk import MajorityKernelCallback
from lightning_mk.experiments.report import mean_interval


class VGG(nn.Module):
    def __init__(self) -> None:
        super().__init__()

        def block(i, o):
            return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]

        self.features = nn.Sequential(*block(1, 32), *block(32, 32), nn.MaxPool2d(2), *block(32, 64), *block(64, 64), nn.AdaptiveAvgPool2d(1))
        self.classifier = nn.Linear(64, 10)

    def forward(self, x):
        return self.classifier(self.features(x.view(-1, 1, 8, 8)).flatten(1))


class RowTransformer(nn.Module):
    """Each of the image's 8 rows a token."""

    def __init__(self, d: int = 64) -> None:
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.position = nn.Parameter(torch.zeros(1, 8, d))
        layer = nn.TransformerEncoderLayer(d, nhead=4, dim_feedforward=2 * d, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2)
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        h = self.encoder(self.embed(x.view(-1, 8, 8)) + self.position)
        return self.head(h.mean(1))


class Classifier(pl.LightningModule):
    def __init__(self, net: nn.Module, optimizer: str, lr: float, weight_decay: float) -> None:
        super().__init__()
        self.net, self.optimizer, self.lr, self.weight_decay = net, optimizer, lr, weight_decay

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        if self.optimizer == "sgd":
            opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=self.weight_decay, nesterov=True)
        else:
            opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        return [opt], [torch.optim.lr_scheduler.CosineAnnealingLR(opt, self.trainer.max_epochs)]


#: name: (model, optimizer, lr, weight decay, epochs, training samples)
MODELS = {
    "vgg_bn_sgd": (VGG, "sgd", 0.05, 5e-4, 30, 1000),
    "vgg_bn_sgd_overfit": (VGG, "sgd", 0.05, 5e-4, 60, 200),
    "transformer_overfit_adamw": (RowTransformer, "adamw", 1e-3, 1e-2, 100, 300),
}


def data(train_size: int):
    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images, dtype=torch.float32) / 16
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(1234))
    train, val, test = order[:train_size], order[1000:1300], order[1300:]
    x = (x - x[train].mean()) / x[train].std()
    y = torch.tensor(labels)
    return [TensorDataset(x[i], y[i]) for i in (train, val, test)]


def run(name: str, seed: int, mk: bool, root: str) -> tuple[float, float]:
    """Test accuracy (%) and the noise level the callback ended at (0 for plain training)."""
    make, optimizer, lr, wd, epochs, size = MODELS[name]
    train, val, test = data(size)
    pl.seed_everything(seed, verbose=False)
    model = Classifier(make(), optimizer, lr, wd)
    callback = MajorityKernelCallback(k=4, save_path=os.path.join(root, "small.pt"))
    callbacks = [callback] if mk else []
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=callbacks, default_root_dir=root,
    )
    shuffled = DataLoader(train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed))
    trainer.fit(model, shuffled, DataLoader(val, batch_size=300))
    if mk:  # the deployed model, as the user gets it: the saved file in a fresh, unmodified instance
        model = Classifier(make(), optimizer, lr, wd)
        model.load_state_dict(torch.load(os.path.join(root, "small.pt"), weights_only=True))
    level = callback.control.level if mk else 0.0
    return 100 * trainer.test(model, DataLoader(test, batch_size=500), verbose=False)[0]["test_acc"], level


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    lines = [
        "| model | seeds | plain | `MajorityKernelCallback(k=4)` | difference [95 % interval] | per seed | final noise level per seed |",
        "| --- | --: | --: | --: | --: | --- | --- |",
    ]
    for name in args.models:
        accs, levels = {False: [], True: []}, []
        for seed in args.seeds:
            for mk in (False, True):
                with tempfile.TemporaryDirectory() as root:
                    acc, level = run(name, seed, mk, root)
                accs[mk].append(acc)
            levels.append(level)
            print(name, seed, f"plain {accs[False][-1]:.2f} mk {accs[True][-1]:.2f}", flush=True)
        diff = np.array(accs[True]) - np.array(accs[False])
        ci = mean_interval(diff)
        interval = "" if ci is None else f" [{ci[0]:+.2f}, {ci[1]:+.2f}]"
        per_seed = ", ".join(f"{d:+.1f}" for d in diff)
        per_seed += " | " + ", ".join(f"{level:.2f}" for level in levels)
        lines.append(
            f"| {name} | {len(diff)} | {np.mean(accs[False]):.2f} | {np.mean(accs[True]):.2f} | {diff.mean():+.2f}{interval} | {per_seed} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"Test accuracy (%), `python {' '.join(['benchmarks/quality/heldout.py', *sys.argv[1:]])}`:\n\n{table}\n")


if __name__ == "__main__":
    main()
