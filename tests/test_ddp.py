"""DDP with 2 CPU processes: identical draws on every rank, identical parameters, one small-model file."""

import os
import subprocess
import sys

import torch

from helpers import TinyModule


def test_ddp_two_cpu_processes(tmp_path):
    worker = os.path.join(os.path.dirname(__file__), "ddp_worker.py")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    done = subprocess.run([sys.executable, worker, str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert len(rank0["sampled"]) == len(rank1["sampled"]) == 8  # 2 epochs x 4 batches per rank
    for a, b in zip(rank0["sampled"], rank1["sampled"]):
        assert torch.equal(a, b), "every rank must draw the same coefficients"
    assert not torch.equal(rank0["sampled"][0], rank0["sampled"][1]), "each step draws afresh"
    for key, value in rank0["params"].items():
        assert torch.equal(value, rank1["params"][key]), key
    assert (rank0["writes"], rank1["writes"]) == (1, 0), "the small model is written once, by rank zero"
    TinyModule().load_state_dict(torch.load(tmp_path / "small.pt", weights_only=True), strict=True)
