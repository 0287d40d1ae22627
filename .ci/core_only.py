"""The core install (`pip install torch==2.13.0 .`, no extras): the callback trains and saves a small
model with none of the experiment app's dependencies installed."""

import importlib.util
import tempfile
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_mk

absent = ["hydra", "omegaconf", "wandb", "sklearn", "matplotlib", "scipy", "mnist1d"]
present = [name for name in absent if importlib.util.find_spec(name) is not None]
assert not present, f"the core install pulled in {present}"
source = Path(lightning_mk.__file__).parent / "csrc" / "select.cpp"
assert source.is_file(), f"the installed package lacks the CPU select kernel's source ({source})"


class Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


data = DataLoader(TensorDataset(torch.randn(64, 8), torch.randint(0, 3, (64,))), batch_size=16)
with tempfile.TemporaryDirectory() as root:
    path = f"{root}/small.pt"
    callback = lightning_mk.MajorityKernelCallback(k=2, save_path=path)
    pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
               callbacks=[callback], default_root_dir=root).fit(Tiny(), data)  # fmt: skip
    Tiny().load_state_dict(torch.load(path, weights_only=True), strict=True)
print("core install: callback trained and saved a small model without the experiment dependencies")
