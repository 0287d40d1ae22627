"""The Lightning-free API under Lightning Fabric with DDP on 2 CPU processes (the example, run as is)."""

import os
import re
import sys

import pytest
import torch

from helpers import run_ranks
from lightning_mk.experiments.models import MLP

pytestmark = pytest.mark.distributed

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "fabric_ddp.py")


def test_fabric_ddp_example(tmp_path):
    cmd = [sys.executable, EXAMPLE, "--devices", "2", "--epochs", "1", "--num-samples", "600", "--out", str(tmp_path)]
    done = run_ranks(cmd, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    checksums = dict(re.findall(r"rank (\d): plain-model checksum (-?\d+\.\d{10})", done.stdout + done.stderr))
    assert set(checksums) == {"0", "1"} and checksums["0"] == checksums["1"], "ranks must end with identical weights"
    assert "test accuracy" in done.stdout
    small = MLP((40,), 10, n=64)
    small.load_state_dict(torch.load(tmp_path / "small_model.pt", weights_only=True), strict=True)
