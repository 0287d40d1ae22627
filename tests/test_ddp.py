"""DDP with 2 CPU processes, fp32, bf16-mixed and torch.compile: identical draws on every rank (or each
its own, with per_rank_noise; and with the noise level set from ranks' differing losses), identical parameters,
one small-model file, no recompiles after step 1."""

import os
import sys

import pytest
import torch

from helpers import ConvModule, NormModule, TinyModule, run_ranks

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize(
    "per_rank, precision, compiled, gap, form",
    [
        (False, "32-true", False, False, None),
        (True, "32-true", False, False, None),
        (False, "bf16-mixed", False, False, None),
        (False, "32-true", True, False, None),
        (False, "32-true", False, True, None),
        (False, "32-true", False, False, "doconv"),
        (False, "32-true", False, False, "expand"),
    ],
)
def test_ddp_two_cpu_processes(tmp_path, per_rank, precision, compiled, gap, form):
    worker = os.path.join(os.path.dirname(__file__), "ddp_worker.py")
    command = [sys.executable, worker, str(tmp_path), precision] + ["per_rank"] * per_rank + ["compile"] * compiled + ["gap"] * gap + ([form] if form else [])
    done = run_ranks(command, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert len(rank0["sampled"]) == len(rank1["sampled"]) == 8  # 2 epochs x 4 batches per rank
    same = [torch.equal(a, b) for a, b in zip(rank0["sampled"], rank1["sampled"])]
    if per_rank:  # the first step cannot differ: replicated copies are all equal until the first update
        assert not any(same[1:]), "with per_rank_noise each rank draws its own coefficients"
    else:
        assert all(same), "every rank must draw the same coefficients"
    assert not torch.equal(rank0["sampled"][0], rank0["sampled"][1]), "each step draws afresh"
    frames = rank0["frames"]
    if compiled:
        assert frames[0] > 0 and frames[-1] == frames[0], f"recompiled after the first step: {frames}"
    else:
        assert frames[-1] == 0
    for key, value in rank0["params"].items():  # batch norm's statistics are each rank's, as in plain DDP
        assert "running_" in key or torch.equal(value, rank1["params"][key]), key
    if gap:  # the level rose at both validations, on both ranks alike
        assert rank0["level"] == rank1["level"] == {"level": 0.06, "updates": 2}
        # epoch 1 drew at level 0; the statistics were recomputed before the second validation, on both ranks
        assert rank0["recalibrations"] == rank1["recalibrations"] == [8]  # from the last 8 forwards: both epochs
    assert (rank0["writes"], rank1["writes"]) == (1, 0), "the small model is written once, by rank zero"
    small = torch.load(tmp_path / "small.pt", weights_only=True)
    assert all(v.dtype == torch.float32 for v in small.values() if v.is_floating_point()), "bf16-mixed keeps fp32 parameters"
    (NormModule if gap else ConvModule if form else TinyModule)().load_state_dict(small, strict=True)
