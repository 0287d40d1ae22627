"""The CPU select kernel (lightning_mk.native): the stock ops' draws, values and gradients bit for bit, in every
dtype and for any k; the draw of its forward in its backward; the stock ops where it is switched off or fails."""

import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

from lightning_mk import apply_majority_kernels, native
from lightning_mk.schemes import Random, Select

STATE = Random.state_of(torch.tensor(41))


def test_the_kernel_builds_with_the_test_install():
    """``pip install -e '.[test]'`` brings ninja; a C++ compiler is the machine's. Not skipped: a machine where it
    cannot be built would otherwise train, and test, the stock ops only."""
    assert native.available(), "the CPU select kernel could not be built: see the warning above"


def stock_select(copies, constant):
    """The stock ops' ``Select.combine`` of ``[k, *S]`` copies, drawing from the stream ``constant``."""
    draw = Random(0, STATE)
    draw.stream = lambda: constant
    return copies.reshape(len(copies), -1).gather(0, Select().index(copies, draw)).view(copies.shape[1:])


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 8, 16, 256, 300, 512, 1 << 16])
@pytest.mark.parametrize("n", [1, 959, 961, 5003])
def test_the_draw_is_random_integers_bit_for_bit(k, n):
    """Powers of two split each hash into lanes (block edges at 960 elements), others scale one
    hash per element: the uniformity and independence tests of ``Random.integers`` hold for the kernel."""
    draw = Random(9, STATE)
    expected = draw.integers(k, (n,), torch.device("cpu"))
    assert torch.equal(native.index(STATE, Random(9, STATE).stream(), k, n), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", [(3001,), (7, 11, 5)])
def test_values_and_gradients_are_the_stock_ops(dtype, k, shape):
    """``[k, *S]`` copies give a ``[*S]`` kernel and a ``[k, *S]`` gradient (no reshapes around the op)."""
    copies = torch.randn(k, *shape, dtype=dtype, requires_grad=True)
    grad = torch.randn(shape, dtype=dtype)
    expected = stock_select(copies, 12345)
    got = native.select(copies, STATE, 12345)
    assert torch.equal(got, expected)
    (expected_grad,) = torch.autograd.grad(expected, copies, grad)
    (got_grad,) = torch.autograd.grad(got, copies, grad)
    assert torch.equal(got_grad, expected_grad)


def test_the_backward_uses_the_forwards_draw_and_differentiates_twice():
    """The model's state moves on each training forward; a backward after a second forward (or a re-run) still
    routes each element's gradient to the copy its forward took. With create_graph, the gradient is itself
    differentiable (against finite differences)."""
    state = STATE.clone()
    copies = torch.randn(4, 50, dtype=torch.float64, requires_grad=True)
    kernel = native.select(copies, state, 7)
    drawn = native.index(state, 7, 4, 50)
    state.add_(1)  # the next step's draw
    (grad,) = torch.autograd.grad(kernel.sum(), copies)
    assert torch.equal(grad, nn.functional.one_hot(drawn, 4).T.double())
    assert torch.autograd.gradcheck(lambda c: native.select(c, STATE, 7), (copies,))
    assert torch.autograd.gradgradcheck(lambda c: native.select(c, STATE, 7) ** 2, (copies,))
    assert torch.autograd.gradgradcheck(lambda c: native.select(c, STATE, 7) ** 2, (copies.detach().view(4, 5, 10).requires_grad_(),))


def test_a_model_trains_the_same_with_and_without_the_kernel(monkeypatch):
    """Three SGD steps of an MLP with copies: identical losses and copies with the kernel and with the stock ops."""
    runs = []
    for use in (True, False):
        monkeypatch.setattr(native, "_loaded", use)
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(20, 300), nn.ReLU(), nn.Linear(300, 5))
        apply_majority_kernels(net, k=4, init="independent", seed=2)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
        losses = []
        for step in range(3):
            x, y = torch.randn(16, 20, generator=torch.Generator().manual_seed(step)), torch.arange(16) % 5
            loss = nn.functional.cross_entropy(net(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        runs.append((losses, [p.detach().clone() for p in net.parameters()]))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


def test_switched_off_it_is_never_built():
    code = "import sys; from lightning_mk import native; print(native.available(), 'torch.utils.cpp_extension' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "LIGHTNING_MK_NATIVE": "0"}, capture_output=True,
                         text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_a_failed_build_warns_once_and_training_uses_the_stock_ops(monkeypatch):
    from torch.utils import cpp_extension

    def broken(*args, **kwargs):
        raise RuntimeError("Error building extension 'lightning_mk_select'\nmore lines of the compiler's log")

    monkeypatch.setattr(cpp_extension, "load", broken)
    monkeypatch.setattr(native, "_loaded", None)
    with pytest.warns(UserWarning, match="could not be built, training uses the stock ops.*Error building extension"):
        assert not native.available()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not native.available()  # decided once
        net = nn.Linear(8, 8)
        apply_majority_kernels(net, k=4)
        net.train()(torch.randn(2, 8)).sum().backward()


def test_compiled_graphs_call_the_kernel_and_train_as_the_stock_graphs(monkeypatch):
    """Loaded before tracing (applying the copies loads it), the kernel is one op of a fullgraph training graph; the
    stock graph (the kernel switched off) gives the same losses."""
    import torch._dynamo

    runs = []
    for use in (True, False):
        monkeypatch.setattr(native, "_loaded", use)
        torch._dynamo.reset()
        graphs = []

        def backend(graph, inputs):
            graphs.append(graph.code)
            return graph.forward

        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 5))
        handle = apply_majority_kernels(net, k=4, seed=2, step_on_forward=False)
        forward = torch.compile(net, fullgraph=True, backend=backend)
        losses = []
        for step in range(3):
            handle.step = step + 1
            loss = nn.functional.cross_entropy(forward(torch.randn(8, 20, generator=torch.Generator().manual_seed(step))),
                                               torch.arange(8) % 5)
            loss.backward()
            losses.append(loss.item())
        assert len(graphs) == 1 and ("lightning_mk.select" in graphs[0]) == use
        runs.append(losses)
    assert runs[0] == pytest.approx(runs[1], abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [1, 3, 4, 8])
@pytest.mark.parametrize("decay", [None, 0.01])
@pytest.mark.parametrize("transposed", [False, True])
def test_the_default_forms_one_node_draws_and_differentiates_as_with_an_index(transposed, decay, k, dtype):
    """Decoupled/relative train ``select`` through one autograd node: the CPU kernel's (C++, given the kernel's stream;
    the centre computed in its pass) and the stock ops' (``_Selected``, given the stream's index and ``_mean``) give the
    same kernel and gradient of the stored tensor, bit for bit in every dtype up to k = 4 (above, the centre's sum is
    in another order: to rounding), also for a non-contiguous incoming gradient (a linear layer's is a transposed view);
    the kernel's node keeps the draw's state (the model's may move on before the backward)."""
    from lightning_mk.forms import _mean, _Selected

    stored = torch.randn(k + 1, 30, 67, dtype=dtype, requires_grad=True)
    c = torch.tensor(0.3, dtype=dtype)
    decay = None if decay is None else torch.tensor(decay)
    grad = torch.randn(67, 30, dtype=dtype).t() if transposed else torch.randn(30, 67, dtype=dtype)
    index = native.index(STATE, 99, k, 30 * 67).view(1, -1)
    state = STATE.clone()
    kernels = [_Selected.apply(stored, index, _mean(stored[1:].detach()), c, decay, 2.0),
               native.select_around(stored, state, 99, c, False, decay, 2.0)]
    state.add_(1)
    results = [(kernel, *torch.autograd.grad(kernel, stored, grad)) for kernel in kernels]
    for a, b in zip(*results):
        if k <= 4:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 4, 5])
def test_the_relative_forms_node_computes_its_noise_scale_as_the_stock_ops(k, dtype):
    """With ``normalise`` the kernel's node multiplies ``c`` by the relative form's noise scale, computed in its own
    pass: the stock composition (``_mean``, ``_rms_ratio``, ``_Selected``) to rounding, kernel and gradient, and the
    same for any number of threads."""
    from lightning_mk.forms import _mean, _rms_ratio, _Selected

    stored = torch.randn(k + 1, 40, 1001, dtype=torch.float64)
    stored[1:] *= 0.05
    stored = stored.to(dtype).requires_grad_()
    level, decay, grad = torch.tensor(0.3, dtype=dtype), torch.tensor(0.01), torch.randn(40, 1001, dtype=dtype)
    mu, deviations = stored[0].detach(), stored[1:].detach()
    center = _mean(deviations)
    c = level * _rms_ratio(mu, deviations - center)
    index = native.index(STATE, 7, k, 40 * 1001).view(1, -1)
    stock = _Selected.apply(stored, index, center, c, decay, 2.0)
    expected = (stock, *torch.autograd.grad(stock, stored, grad))
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            kernel = native.select_around(stored, STATE, 7, level, True, decay, 2.0)
            got = (kernel, *torch.autograd.grad(kernel, stored, grad))
            for a, b in zip(got, expected):
                torch.testing.assert_close(a, b, **({} if dtype != torch.bfloat16 else dict(rtol=2e-2, atol=2e-2)))
            if count == 1:
                first = got
            else:
                assert all(torch.equal(a, b) for a, b in zip(first, got))
    finally:
        torch.set_num_threads(threads)
    if k & (k - 1) == 0:  # equal deviations (their mean exact): no noise, the kernel is mu
        equal = stored.detach().clone()
        equal[1:] = equal[1]
        assert torch.equal(native.select_around(equal, STATE, 7, level, True, None, 1.0), equal[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_the_relative_forms_noise_scale_is_one_op_the_same_for_any_thread_count(dtype):
    """The relative form's noise scale RMS(mu) / RMS(deviations - centre) from one kernel op (no ``[k, *S]``
    difference): the value of the formula in double, to rounding, and the same with one thread or two; 1e6 for equal
    deviations."""
    from lightning_mk.forms import _mean

    rows, mu = torch.randn(4, 50_000, dtype=dtype) * 3 + 1, torch.randn(50_000, dtype=dtype)
    center = _mean(rows)
    exact = mu.double().pow(2).mean().sqrt() / (rows.double() - center.double()).pow(2).mean().sqrt()
    threads = torch.get_num_threads()
    try:
        got = []
        for count in (1, 2):
            torch.set_num_threads(count)
            got.append(native.normaliser(mu, rows, center))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(got[0], got[1]) and got[0].dtype == dtype
    torch.testing.assert_close(got[0].double(), exact.to(dtype).double(), rtol=1e-6, atol=0)
    equal = rows[:1].expand(4, -1).contiguous()
    assert native.normaliser(mu, equal, _mean(equal)).item() == pytest.approx(1e6, rel=1e-2)


def test_the_relative_forms_noise_scale_is_the_stock_ops_to_rounding(monkeypatch):
    """With the kernel (eager, CPU) or without it (a GPU, compiled, no compiler), the scale is the same to rounding."""
    from lightning_mk.forms import _mean, _normaliser

    mu, deviations = torch.randn(64, 33), torch.randn(4, 64, 33) * 0.1
    scales = []
    for use in (True, False):
        monkeypatch.setattr(native, "_loaded", use)
        scales.append(_normaliser(mu, deviations, _mean(deviations)))
    torch.testing.assert_close(scales[0], scales[1], rtol=1e-6, atol=0)


@pytest.mark.parametrize("compiled", [False, True])
def test_two_training_forwards_before_one_backward_route_each_gradient_to_its_own_draw(compiled, monkeypatch):
    """The raw API draws anew at every training forward (the model's state moves on in place): a loss over two
    forwards backpropagates each through its own draw, eager and compiled, as the stock ops do."""
    import torch._dynamo

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(16, 8)

        def forward(self, x):
            return self.a(x)

    grads = []
    for use in (True, False):
        torch._dynamo.reset()
        torch.manual_seed(0)
        net = Net()
        apply_majority_kernels(net, k=4)
        monkeypatch.setattr(native, "_loaded", use)
        forward = torch.compile(net, fullgraph=True, backend="aot_eager") if compiled else net
        x = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
        (forward(x).sum() + forward(x).pow(2).sum()).backward()
        grads.append(net.a.parametrizations.weight.original.grad)
    torch.testing.assert_close(grads[0], grads[1])
