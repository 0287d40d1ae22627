"""The draws on a CUDA GPU: the same numbers as on the CPU, eager (batched or not) and compiled (Triton), and a
compiled training step without recompiles. Skips without CUDA.

    pytest -q tests/gpu
"""

import copy

import pytest
import torch
from torch import nn

from lightning_mk import SCHEMES, apply_majority_kernels
from lightning_mk.schemes import Random

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


@pytest.mark.parametrize("k", [2, 3, 4, 8])
def test_random_numbers_on_the_gpu_are_the_cpu_numbers(k):
    def numbers(device):
        source = Random(7, Random.state_of(torch.tensor(3, device=device)))
        return source.integers(k, (5000,), torch.device(device)), source.uniform((999,), torch.device(device))

    for on_cpu, on_gpu in zip(numbers("cpu"), numbers("cuda")):
        assert torch.equal(on_cpu, on_gpu.cpu())


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 300), nn.ReLU(), nn.Linear(300, 300), nn.ReLU(), nn.Linear(300, 10))


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_a_model_draws_on_the_gpu_what_it_draws_on_the_cpu(scheme):
    weights = {}
    for device in ("cpu", "cuda"):
        net = model()
        handle = apply_majority_kernels(net, k=4, scheme=scheme, init="independent", step_on_forward=False)
        net.to(device).train()
        weights[device] = []
        for step in (1, 2, 3):  # from step 2 the small draws come from the batch
            handle.step = step
            weights[device] += [layer.weight.detach().cpu() for layer in net[::2]]
    for on_cpu, on_gpu in zip(weights["cpu"], weights["cuda"]):
        torch.testing.assert_close(on_gpu, on_cpu, rtol=1e-6, atol=1e-6)  # convex/layer: float arithmetic


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_compiled_training_on_the_gpu_matches_eager_without_recompiling(scheme):
    from torch._dynamo.utils import counters

    losses, x, y = {}, torch.randn(64, 16, device=CUDA), torch.randint(0, 10, (64,), device=CUDA)
    for compiled in (False, True):
        net = model()
        handle = apply_majority_kernels(net, k=4, scheme=scheme, init="independent", step_on_forward=False)
        net.to(CUDA).train()
        forward = torch.compile(net, fullgraph=True) if compiled else net
        optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
        torch._dynamo.reset()
        counters.clear()
        losses[compiled], graphs = [], []
        for step in range(1, 6):
            handle.step = step
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(forward(x), y)
            loss.backward()
            optimizer.step()
            losses[compiled].append(loss.item())
            graphs.append(counters["stats"]["unique_graphs"])
        if compiled:
            assert graphs[-1] == graphs[0], f"recompiled as the step advanced: {graphs}"
    assert losses[True] == pytest.approx(losses[False], rel=1e-4, abs=1e-5)
