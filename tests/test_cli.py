"""LightningCLI: the callback is added from a YAML config like any of Lightning's own callbacks."""

import sys

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LightningCLI

from helpers import TinyModule, loader
from lightning_mk import MajorityKernelCallback


class TinyData(pl.LightningDataModule):
    def train_dataloader(self):
        return loader()


def test_callback_from_a_yaml_config(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train.py"])  # the CLI reads only `args`, not pytest's own arguments
    config = tmp_path / "config.yaml"
    config.write_text(
        f"""
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  max_epochs: 1
  limit_train_batches: 2
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  default_root_dir: {tmp_path}
  callbacks:
    - class_path: lightning_mk.MajorityKernelCallback
      init_args:
        k: 4
        save_path: {tmp_path / "small.pt"}
"""
    )
    cli = LightningCLI(TinyModule, TinyData, args=["fit", "--config", str(config)], save_config_callback=None)
    (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, MajorityKernelCallback)]
    assert (cb.settings.k, cb.settings.scheme) == (4, "select")
    assert cli.model.training_steps == 2
    plain = TinyModule()
    plain.load_state_dict(torch.load(tmp_path / "small.pt", weights_only=True), strict=True)
    cli.model.eval()
    x = torch.randn(8, 8)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), cli.model(x))
