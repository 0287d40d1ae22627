"""Lightning FSDP and DeepSpeed ZeRO-2/3 with MajorityKernelCallback on the CPU (2 processes, gloo):
identical draws on every rank, copies sharded, the written small model equals the mean of the copies
read back from the sharded checkpoint, and training resumes from that checkpoint. The shims that let
Lightning run these strategies on the CPU are described in sharded_worker.py."""

import itertools

import pytest

from sharded import run_and_check

pytestmark = pytest.mark.distributed

CASES = [(s, p, False) for s, p in itertools.product(["fsdp", "fsdp_wrap_linear", "deepspeed_stage_2", "deepspeed_stage_3"], ["32-true", "bf16-mixed"])]
CASES.append(("deepspeed_stage_3", "bf16-true", False))  # the masters are cast to the module's dtype
CASES.append(("fsdp_wrap_linear", "32-true", True))  # torch.compile: no recompiles after the first step


@pytest.mark.parametrize("strategy, precision, compiled", CASES)
def test_sharded_strategy_on_the_cpu(tmp_path, strategy, precision, compiled):
    if strategy.startswith("deepspeed"):
        pytest.importorskip("deepspeed")  # an optional test dependency
    run_and_check(tmp_path, strategy, precision, "cpu", compiled=compiled)
