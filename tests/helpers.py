"""Tiny models, a Trainer factory and a launcher of multi-process runs shared by the tests (CPU, a few batches, no
logger)."""

import os
import signal
import subprocess

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class TinyModule(pl.LightningModule):
    """A user's LightningModule: knows nothing about Majority Kernels."""

    def __init__(self, width: int = 16, lr: float = 0.05) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, 3))
        self.training_steps = 0

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        self.training_steps += 1
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def norm_net(width: int = 16) -> nn.Sequential:
    """TinyModule's network with batch norm (and dropout between)."""
    return nn.Sequential(nn.Linear(8, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Dropout(0.3), nn.Linear(width, 3), nn.BatchNorm1d(3))


class NormModule(TinyModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = norm_net()


class ConvModule(TinyModule):
    """TinyModule with a 1-D convolution first (its input read as one channel of 8 samples)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv1d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32, 3))

    def forward(self, x):
        return self.net(x.unsqueeze(1))


class Generalising(TinyModule):
    """Logs a ``score`` always below its training loss: a controller monitoring it keeps the noise at zero."""

    def on_validation_epoch_end(self):
        self.log("score", 0.0)


class GeneralisingWithNorms(NormModule):
    on_validation_epoch_end = Generalising.on_validation_epoch_end


def tear_down_together() -> None:
    """Every rank waits for the others, then destroys the process group (if there is one): gloo's threads left to
    interpreter exit can abort a worker (SIGABRT, "terminate called without an active exception"), and so can one
    rank destroying the group while another still works. Lightning destroys it at exit for NCCL only."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


class TearDownTogether(pl.Callback):
    """:func:`tear_down_together` at the end of a fit, for workers whose script does not run after it (``ddp_spawn``).
    Put it after the callbacks under test (teardown runs last)."""

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        tear_down_together()


def loader(n: int = 64, batch_size: int = 16, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def trainer(root, **kwargs) -> pl.Trainer:
    options = dict(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )
    options.update(kwargs)
    return pl.Trainer(**options)


def run_ranks(command: list, timeout: float, env: dict = None, cwd=None) -> subprocess.CompletedProcess:
    """Run ``command`` (a script, or a job that may start its other ranks as child processes) in a process group of
    its own, with its output captured: past ``timeout`` seconds the whole group is killed, so that no rank outlives
    the test (a rank that hangs keeps the output pipes open after rank zero has exited), and the test fails with the
    output so far."""
    env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1")
    process = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"not done within {timeout} s (rank zero's exit code: {process.returncode}); the ranks' output:\n"
                    f"{stdout[-3000:]}\n{stderr[-5000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
