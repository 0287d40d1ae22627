"""Lightning FSDP and DeepSpeed ZeRO-3 with MajorityKernelCallback, on CUDA. Skips without CUDA.

    pytest -q tests/gpu            # DeepSpeed cases also need `pip install deepspeed`

Lightning refuses its FSDP strategy on the CPU and DeepSpeed needs CUDA, so these cannot run in CI;
they are the check that decides whether FSDP and DeepSpeed join ``VERIFIED_STRATEGIES``. Each case
trains with the callback under the sharded strategy and compares the written small model with a
single-process collapse of the consolidated copies, then resumes from a sharded checkpoint.
"""

import importlib.util
import os
import sys

import pytest
import torch

import lightning_mk.callback as callback_module

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from helpers import TinyModule, loader, trainer  # noqa: E402
from lightning_mk import MajorityKernelCallback  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
STRATEGIES = ["fsdp", "deepspeed_stage_2", "deepspeed_stage_3"]


class BuiltLate(TinyModule):
    """Layers built in configure_model, as FSDP users do."""

    def __init__(self):
        super().__init__()
        self.net = None

    def configure_model(self):
        if self.net is None:
            self.net = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3))


@pytest.fixture(autouse=True)
def sharded_allowed(monkeypatch):
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    monkeypatch.setattr(callback_module, "VERIFIED_STRATEGIES", callback_module.VERIFIED_STRATEGIES + (FSDPStrategy, DeepSpeedStrategy))


def consolidated(trainer, ckpt) -> dict | None:
    """The MK model's full state, on rank zero (None elsewhere): FSDP's own full state dict (a collective:
    every rank calls this), or DeepSpeed's checkpoint read back by its own converter, which does not go
    through the in-memory gather that the callback does."""
    if trainer.strategy.strategy_name == "fsdp":
        state = trainer.strategy.lightning_module_state_dict()
        return state if trainer.is_global_zero else None
    if not trainer.is_global_zero:
        return None
    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    return convert_zero_checkpoint_to_fp32_state_dict(ckpt, ckpt.parent / "consolidated.pt")["state_dict"]


def single_process_collapse(state: dict) -> dict:
    """Copies ``<layer>.parametrizations.<name>.original`` -> ``<layer>.<name>`` = their mean, written out
    here rather than with collapsed_state_dict, so the test does not check the code with itself."""
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


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("precision", ["32-true", "16-mixed"])
def test_sharded_training_writes_the_gathered_small_model(tmp_path, strategy, precision):
    if strategy.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed")
    model = BuiltLate()
    cb = MajorityKernelCallback(k=4, scheme="select", save_path=tmp_path / "small.pt")
    t = trainer(tmp_path, accelerator="gpu", devices=torch.cuda.device_count(), strategy=strategy, precision=precision,
                max_epochs=2, callbacks=[cb], enable_checkpointing=True)
    t.fit(model, loader(n=256))
    t.save_checkpoint(tmp_path / "sharded.ckpt")
    state = consolidated(t, tmp_path / "sharded.ckpt")
    if t.is_global_zero:
        small = torch.load(tmp_path / "small.pt", weights_only=True)
        assert set(small) == {"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"}
        expected = single_process_collapse(state)
        tolerance = {} if precision == "32-true" else {"rtol": 2e-3, "atol": 2e-3}  # DeepSpeed's fp16 module copy
        for key, value in expected.items():
            torch.testing.assert_close(small[key].float(), value.float().cpu(), **tolerance)
        plain = BuiltLate()
        plain.configure_model()
        plain.load_state_dict(small, strict=True)

    resumed = BuiltLate()
    cb2 = MajorityKernelCallback(k=4, scheme="select", save_path=tmp_path / "small2.pt")
    t2 = trainer(tmp_path, accelerator="gpu", devices=torch.cuda.device_count(), strategy=strategy, precision=precision,
                 max_epochs=3, callbacks=[cb2])
    t2.fit(resumed, loader(n=256), ckpt_path=tmp_path / "sharded.ckpt")
    assert cb2.state_dict()["step"] > cb.state_dict()["step"]
