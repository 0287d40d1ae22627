"""Scale on the CPU: FSDP2 gather-and-collapse with 2 processes, bf16 mixed precision, torch.compile."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from helpers import TinyModule, loader, trainer
from lightning_mk import MajorityKernelCallback, apply_majority_kernels, collapsed_state_dict, copy_spread, kernel_copies

STEPS = 4


def make_mk_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    return apply_majority_kernels(net, k=4, scheme="convex", init="independent", seed=3).module


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g)


def train(net, x, y):
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(STEPS):
        optimizer.zero_grad()
        F.cross_entropy(net(x), y).backward()
        optimizer.step()


def fsdp2_worker(rank: int, world: int, port: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        net = make_mk_net()
        mesh = init_device_mesh("cpu", (world,))
        for layer in net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(net, mesh=mesh)
        assert type(kernel_copies(net)["0.weight"]).__name__ == "DTensor", "the copies must be sharded"
        x, y = batch()
        train(net, x.chunk(world)[rank], y.chunk(world)[rank])  # FSDP averages the two halves' gradients
        state = collapsed_state_dict(net)  # a collective: every rank gathers
        spread = copy_spread(net)  # a collective too: from each rank's own rows of the copies
        torch.save(spread, f"{out}.spread{rank}")
        if rank == 0:
            torch.save(state, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_fsdp2_gather_and_collapse_equals_the_unsharded_run(tmp_path):
    out = str(tmp_path / "small.pt")
    mp.start_processes(fsdp2_worker, args=(2, free_port(), out), nprocs=2, start_method="spawn")
    sharded = torch.load(out, weights_only=True)

    reference = make_mk_net()
    x, y = batch()
    train(reference, x, y)
    expected = collapsed_state_dict(reference)
    assert set(sharded) == set(expected) == {f"{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")}
    for key, value in expected.items():
        torch.testing.assert_close(sharded[key], value, rtol=1e-5, atol=1e-6)
    assert not torch.equal(expected["0.weight"], collapsed_state_dict(make_mk_net())["0.weight"]), "it trained"
    spreads = [torch.load(f"{out}.spread{rank}", weights_only=True) for rank in (0, 1)]
    assert spreads[0] == spreads[1], "every rank gets the same spread"
    assert spreads[0] == pytest.approx(copy_spread(reference), rel=1e-5) and min(spreads[0].values()) > 0


@pytest.mark.parametrize("precision, dtype", [("bf16-mixed", torch.float32), ("bf16-true", torch.bfloat16)])
def test_bf16_trains_and_saves_in_the_parameter_dtype(tmp_path, precision, dtype):
    model = TinyModule()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cb = MajorityKernelCallback.published(k=3, scheme="select", save_path=tmp_path / "small.pt")
    trainer(tmp_path, precision=precision, limit_train_batches=3, callbacks=[cb]).fit(model, loader())
    assert all(c.dtype == dtype for c in kernel_copies(model).values()), "copies stay in the parameters' precision"
    small = torch.load(tmp_path / "small.pt", weights_only=True)
    assert {k: v.dtype for k, v in small.items()} == {k: dtype for k in before}
    assert not torch.equal(small["net.0.weight"].float(), before["net.0.weight"].float())
    fresh = TinyModule().to(dtype)
    fresh.load_state_dict(small, strict=True)
    model.eval(), fresh.eval()
    x = torch.randn(16, 8, dtype=dtype)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
        assert torch.equal(fresh(x), model(x)), "the sampled or mean kernel is cast like any weight"


def test_compile_trains_without_recompiling_every_step():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    net = make_mk_net()
    compiled = torch.compile(net, backend="aot_eager")
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    x, y = batch()
    graphs, sampled = [], []
    for _ in range(8):
        optimizer.zero_grad()
        F.cross_entropy(compiled(x), y).backward()
        optimizer.step()
        graphs.append(counters["frames"]["total"])  # frames dynamo has compiled, recompilations included
        sampled.append(net[0].weight.detach().clone())  # this step's draw, read eagerly
    assert graphs[1] > 0 and graphs[-1] == graphs[1], f"recompiled after the first steps: {graphs}"
    assert kernel_copies(net)["0.weight"].grad is not None
    assert not torch.equal(sampled[-1], sampled[-2]), "each compiled step still draws afresh"
