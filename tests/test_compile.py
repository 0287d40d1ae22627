"""torch.compile(fullgraph=True) of models whose forward loops over blocks: the draw is traced into the
graph (no break, no recompilation as the step advances) and the compiled run matches the eager one."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from lightning_mk import SCHEMES, MajorityKernelCallback, apply_majority_kernels
from lightning_mk.experiments.models import MLP, ResNet, Transformer

MODELS = {
    "mlp": (lambda: MLP((16,), 5, n=32, depth=3), (16,)),
    "resnet": (lambda: ResNet((1, 16), 5, n=8, channels=8, blocks=2), (1, 16)),
    "transformer": (lambda: Transformer((16,), 5, n=16, d_model=16, heads=2, layers=2, patch=4), (16,)),
}


def train(net, forward, shape, steps=20, anneal=False):
    """Losses of ``steps`` SGD steps (train mode) and eval-mode outputs, and the graphs compiled after each."""
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    losses, outputs, graphs = [], [], []
    for step in range(steps):
        x, y = torch.randn(8, *shape, generator=g), torch.randint(0, 5, (8,), generator=g)
        if anneal:
            net.draws.noise = 1 - step / steps
        net.train()
        loss = F.cross_entropy(forward(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        net.eval()
        with torch.no_grad():
            outputs.append(forward(x))
        losses.append(loss.item())
        graphs.append(counters["stats"]["unique_graphs"])
    return losses, outputs, graphs


def compiled_and_eager(model, scheme, backend, form="copies", anneal=False, **options):
    build, shape = MODELS[model]
    torch.manual_seed(0)
    base = build()
    runs = []
    for compiled in (False, True):
        net = copy.deepcopy(base)
        net.draws = apply_majority_kernels(net, k=4, scheme=scheme, form=form, seed=1, **options).draws
        torch._dynamo.reset()
        counters.clear()
        forward = torch.compile(net, fullgraph=True, backend=backend) if compiled else net
        runs.append(train(net, forward, shape, anneal=anneal))
        assert not counters["graph_break"], dict(counters["graph_break"])
    return runs


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_fullgraph_traces_every_scheme_without_recompiling(model, scheme):
    (eager, eager_out, _), (compiled, compiled_out, graphs) = compiled_and_eager(model, scheme, "aot_eager")
    assert graphs[1] > 0 and graphs[-1] == graphs[1], f"recompiled after step 2: {graphs}"
    assert compiled == pytest.approx(eager, abs=1e-5), "the same draws as eager"
    torch.testing.assert_close(compiled_out[-1], eager_out[-1])


@pytest.mark.parametrize("form", ["decoupled", "relative"])
def test_fullgraph_decoupled_forms_and_annealed_noise_without_recompiling(form):
    (eager, _, _), (compiled, _, graphs) = compiled_and_eager("mlp", "select", "aot_eager", form, anneal=True)
    assert graphs[2] > 0 and graphs[-1] == graphs[2], f"recompiled as the noise level changed: {graphs}"
    assert compiled == pytest.approx(eager, abs=1e-5)


def test_inductor_matches_eager_over_20_steps():
    (eager, _, _), (compiled, _, graphs) = compiled_and_eager("mlp", "select", "inductor")
    assert graphs[1] > 0 and graphs[-1] == graphs[1], f"recompiled after step 2: {graphs}"
    assert compiled == pytest.approx(eager, abs=1e-3)


def test_the_callbacks_default_compiles_to_the_cpu_kernels_node():
    """Compiled on the CPU, the callback's default (form relative at its ceiling noise level, its decay, scheme
    select) trains through the kernel's one autograd node, as eager training does, not the general composition."""
    settings = MajorityKernelCallback(k=4).settings
    options = dict(noise=settings.noise, decay=settings.decay)
    (eager, _, _), (compiled, _, graphs) = compiled_and_eager("mlp", settings.scheme, "inductor", settings.form, **options)
    assert graphs[1] > 0 and graphs[-1] == graphs[1], f"recompiled after step 2: {graphs}"
    assert compiled == pytest.approx(eager, abs=1e-3)

    targets = set()

    def recording(graph, inputs):
        targets.update(str(node.target) for node in graph.graph.nodes)
        return graph.forward

    net = MODELS["mlp"][0]()
    apply_majority_kernels(net, settings)
    torch._dynamo.reset()
    torch.compile(net.train(), fullgraph=True, backend=recording)(torch.randn(2, 16))
    assert "lightning_mk.select_around" in targets, sorted(targets)


def test_lightning_fits_a_compiled_module_with_fullgraph(tmp_path):
    from helpers import TinyModule, loader, trainer

    from lightning_mk import MajorityKernelCallback

    torch._dynamo.reset()
    counters.clear()
    graphs = []

    class Counting(TinyModule):
        def training_step(self, batch, batch_idx):  # no self.log: Lightning compiles training_step too
            x, y = batch
            return F.cross_entropy(self(x), y)

        def on_train_batch_end(self, *args):
            graphs.append(counters["stats"]["unique_graphs"])

    model = Counting()
    callback = MajorityKernelCallback.published(k=4, save_path=str(tmp_path / "small.pt"))
    trainer(tmp_path, max_epochs=2, callbacks=[callback]).fit(torch.compile(model, fullgraph=True, backend="aot_eager"), loader())
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert graphs[1] > 0 and graphs[-1] == graphs[1], f"recompiled after step 2: {graphs}"
    TinyModule().load_state_dict(torch.load(tmp_path / "small.pt", weights_only=True))


def test_a_compiled_model_with_batch_norm_does_not_recompile_and_says_its_statistics_stay(tmp_path):
    from helpers import NormModule, loader, trainer

    from lightning_mk import MajorityKernelCallback

    torch._dynamo.reset()
    counters.clear()
    graphs = []

    class Counting(NormModule):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y)

        def on_train_batch_end(self, *args):
            graphs.append(counters["stats"]["unique_graphs"])

    callback = MajorityKernelCallback(k=4, monitor=None, noise=0.3, save_path=str(tmp_path / "small.pt"))
    with pytest.warns(UserWarning, match="batch-norm statistics were not recomputed"):
        trainer(tmp_path, max_epochs=2, callbacks=[callback]).fit(torch.compile(Counting(), fullgraph=True, backend="aot_eager"), loader())
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert graphs[0] > 0 and graphs[-1] == graphs[0], f"recompiled: {graphs}"


def test_the_raw_apis_training_forward_is_one_graph():
    """The step hook runs eagerly before the forward, so a compiled training step is the model's graph alone."""

    class Net(torch.nn.Module):  # a forward of its own (nn.Sequential hides the hook from explain)
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(8, 16), torch.nn.Linear(16, 3)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    net = Net()
    kernels = apply_majority_kernels(net, k=4)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(net.train())(torch.randn(2, 8))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    assert kernels.step == 1, "the hook still advanced the draw"
