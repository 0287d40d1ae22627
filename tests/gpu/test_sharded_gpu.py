"""Lightning FSDP and DeepSpeed ZeRO-2/3 with MajorityKernelCallback on CUDA GPUs (all visible, at most 2):
the checks of test_sharded.py, without its CPU shims, in 32-true and 16-mixed. Skips without CUDA.

    pytest -q tests/gpu
"""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sharded import run_and_check  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("strategy", ["fsdp", "fsdp_wrap_linear", "deepspeed_stage_2", "deepspeed_stage_3"])
@pytest.mark.parametrize("precision", ["32-true", "16-mixed"])
def test_sharded_strategy_on_gpus(tmp_path, strategy, precision):
    run_and_check(tmp_path, strategy, precision, "gpu", devices=min(2, torch.cuda.device_count()))
