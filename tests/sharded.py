"""Lightning FSDP and DeepSpeed with MajorityKernelCallback, one process per device: runs sharded_worker.py
and checks what it wrote. Used by test_sharded.py (CPU, gloo) and gpu/test_sharded_gpu.py (CUDA)."""

import os
import sys

import pytest
import torch

from helpers import TinyModule, run_ranks

COPIES = 4 * 64 * 8  # net.0.weight's copies: k=4 of a 64x8 kernel


def consolidated(checkpoint) -> dict:
    """The MK model's full state, read back from the sharded checkpoint on disk by the strategies' own
    converters (DCP for FSDP, zero_to_fp32 for DeepSpeed): not the in-memory gather the callback does."""
    if (checkpoint / "checkpoint").is_dir():  # DeepSpeed
        from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

        return convert_zero_checkpoint_to_fp32_state_dict(checkpoint, checkpoint.parent / (checkpoint.name + ".pt"))["state_dict"]
    from lightning.fabric.utilities.load import _load_distributed_checkpoint

    return _load_distributed_checkpoint(checkpoint)["model"]


def mean_of_copies(state: dict) -> dict:
    """``<layer>.parametrizations.<name>.original`` -> ``<layer>.<name>`` = their mean, written out here
    rather than with collapsed_state_dict, so the test does not check the code with itself."""
    out = {}
    for key, value in state.items():
        if key.endswith("._extra_state"):
            continue
        if key.endswith(".original"):
            layer, _, name = key[: -len(".original")].rpartition("parametrizations.")
            out[layer + name] = value.float().mean(0)
        else:
            out[key] = value
    return out


def run_and_check(tmp_path, strategy: str, precision: str, accelerator: str, devices: int = 2, compiled: bool = False) -> None:
    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sharded_worker.py")
    env = dict(os.environ)
    if accelerator == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    command = [sys.executable, worker, str(tmp_path), strategy, precision, accelerator, str(devices)] + ["compile"] * compiled
    done = run_ranks(command, timeout=540, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]

    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(devices)]
    epoch = 64 // 8 // devices  # batches per rank
    assert all(r["steps"] == [2 * epoch, 3 * epoch] for r in ranks), "2 epochs, then a third resumed from the checkpoint"
    assert all(r["gathers"] == 2 for r in ranks), "the whole model is gathered once per fit, for the small model only"
    for r in ranks[1:]:
        for key in ("sampled", "resumed_sampled"):
            for a, b in zip(ranks[0][key], r[key], strict=True):
                assert torch.equal(a, b), "every rank must draw the same coefficients"
    sampled = ranks[0]["sampled"] + ranks[0]["resumed_sampled"]
    assert len(sampled) == 3 * epoch and all(not torch.equal(a, b) for a, b in zip(sampled, sampled[1:])), "each step draws afresh"
    frames = ranks[0]["frames"]
    assert (frames[0] > 0 and frames[-1] == frames[0]) if compiled else frames[-1] == 0, f"compiled frames: {frames}"
    if strategy == "deepspeed_stage_2" or devices == 1:
        assert all(r["held"] == COPIES for r in ranks), "ZeRO-2 shards optimizer states, not parameters"
    else:
        assert all(r["held"] < COPIES for r in ranks), "the copies must be sharded"

    # Under mixed precision the small model is the mean of the fp32 masters (FSDP's parameters, DeepSpeed's
    # optimizer's), saved in fp32; under bf16-true it is saved in bf16, the parameters' dtype
    dtype = torch.bfloat16 if precision == "bf16-true" else torch.float32
    tolerance = {"rtol": 1e-2, "atol": 1e-2} if precision == "bf16-true" else {"rtol": 1e-5, "atol": 1e-6}
    for run in ("first", "resumed"):
        small = torch.load(tmp_path / f"{run}.pt", weights_only=True)
        assert set(small) == {"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"}
        assert {value.dtype for value in small.values()} == {dtype}
        state = consolidated(tmp_path / f"{run}.ckpt")
        if run == "first":  # the spread logged at the last epoch's end, from the same weights as the checkpoint
            copies = [value.float() for key, value in state.items() if key.endswith(".original")]
            spread = sum(((c - c.mean(0)).pow(2).mean() / c.mean(0).pow(2).mean()).sqrt() for c in copies) / len(copies)
            assert len({r["spread"] for r in ranks}) == 1, "every rank logs the same spread"
            assert ranks[0]["spread"] == pytest.approx(spread.item(), rel=tolerance["rtol"])
        expected = mean_of_copies(state)
        assert set(expected) == set(small)
        for key, value in expected.items():
            torch.testing.assert_close(small[key].float(), value.float(), **tolerance, msg=f"{run}: {key}")
        plain = TinyModule(width=64)
        plain.load_state_dict(small, strict=True)
