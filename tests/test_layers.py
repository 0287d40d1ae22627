"""The layer registry: built-in and registered types (classes, names, glob parameter names), RNNs,
the coverage summary, and the callback's coverage log and warning."""

import logging
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call

from helpers import TinyModule, loader, trainer
import lightning_mk
from lightning_mk import (
    MajorityKernelCallback,
    apply_majority_kernels,
    collapse,
    collapsed_state_dict,
    kernel_copies,
    register_layer,
)
from lightning_mk.layers import SUPPORTED_LAYERS, Coverage, LayerParams


@pytest.fixture
def registry():
    """Registrations made in a test are undone after it, so tests stay independent."""
    saved = dict(SUPPORTED_LAYERS)
    yield SUPPORTED_LAYERS
    SUPPORTED_LAYERS.clear()
    SUPPORTED_LAYERS.update(saved)


class Gate(nn.Module):
    """A layer of someone else's library: two kernels, a bias and a scale, none named ``weight``."""

    def __init__(self, n: int = 4) -> None:
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(n, n))
        self.w_out = nn.Parameter(torch.randn(n, n))
        self.b_in = nn.Parameter(torch.randn(n))
        self.scale = nn.Parameter(torch.ones(n))

    def forward(self, x):
        return torch.tanh(x @ self.w_in + self.b_in) @ self.w_out * self.scale


class WideGate(Gate):
    pass


class Mixer(nn.Module):
    """A weight-bearing layer of a type no registered type covers."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.mix = nn.Parameter(torch.randn(n, n) / n**0.5)

    def forward(self, x):
        return x @ self.mix


def test_built_in_layer_types():
    assert lightning_mk.register_layer is register_layer
    assert SUPPORTED_LAYERS[nn.Linear] == LayerParams(("weight",), ("bias",))
    assert SUPPORTED_LAYERS[nn.Embedding].biases == ()
    assert SUPPORTED_LAYERS["transformers.pytorch_utils.Conv1D"].kernels == ("weight",)
    for rnn in (nn.RNN, nn.GRU, nn.LSTM):
        assert SUPPORTED_LAYERS[rnn] == LayerParams(("weight_ih_l*", "weight_hh_l*", "weight_hr_l*"), ("bias_*",))


def test_importing_the_registry_imports_no_third_party_library():
    code = "import sys, lightning_mk.layers; assert 'transformers' not in sys.modules, 'transformers was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_class_registers_with_glob_names_and_covers_subclasses(registry):
    register_layer(Gate, kernels=("w_*",), biases=("b_*",))
    torch.manual_seed(0)
    model = nn.Sequential(Gate(), WideGate())
    plain = nn.Sequential(Gate(), WideGate())
    plain.load_state_dict(model.state_dict())
    handle = apply_majority_kernels(model, k=3, init_noise=0.5, step_on_forward=False)
    assert sorted(kernel_copies(model)) == ["0.w_in", "0.w_out", "1.w_in", "1.w_out"]
    assert handle.coverage.single == {Gate: 8, WideGate: 8}, "biases and the scale stay single"
    assert handle.coverage.unregistered == {Gate: 4, WideGate: 4}, "the scale matches no registered name"

    model.train()
    handle.step = 1
    loss = model(torch.randn(5, 4)).square().sum()
    loss.backward()
    assert all(copies.grad.abs().sum() > 0 for copies in kernel_copies(model).values())

    # resume: the MK state loads into the same MK model built again
    again = nn.Sequential(Gate(), WideGate())
    apply_majority_kernels(again, k=3)
    again.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(5, 4)
    model.eval()
    again.eval()
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(again(x), expected)
        small = collapsed_state_dict(model)
        plain.load_state_dict(small, strict=True)
        torch.testing.assert_close(plain(x), expected, rtol=0, atol=1e-5)
        collapse(model)
        assert type(model[1]) is WideGate
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-5)

    fresh = nn.Sequential(Gate(), WideGate())
    apply_majority_kernels(fresh, k=2, biases=True)
    assert sorted(kernel_copies(fresh)) == ["0.b_in", "0.w_in", "0.w_out", "1.b_in", "1.w_in", "1.w_out"]


class NamedGate(Gate):
    """Registered by its qualified name in the tests below."""


def test_a_name_registers_without_importing_its_library(registry):
    register_layer("mk_test_absent_library.layers.Gate")
    assert "mk_test_absent_library" not in sys.modules
    register_layer(f"{__name__}.NamedGate", kernels=("w_in",))
    model = nn.Sequential(NamedGate(), Gate())
    apply_majority_kernels(model, k=2)
    assert sorted(kernel_copies(model)) == ["0.w_in"], "only the registered type (Gate is not)"
    for layer_types in (["NamedGate"], [f"{__name__}.NamedGate"], [NamedGate]):
        model = nn.Sequential(NamedGate(), nn.Linear(4, 4))
        apply_majority_kernels(model, k=2, layer_types=layer_types)
        assert sorted(kernel_copies(model)) == ["0.w_in"], layer_types


def test_a_type_registers_once(registry):
    before = dict(registry)
    for again in (nn.Linear, "torch.nn.Linear", "torch.nn.modules.linear.Linear", "transformers.pytorch_utils.Conv1D"):
        with pytest.raises(ValueError, match=r"layer type '.*' is already registered .*registered layer types: \["):
            register_layer(again)
    register_layer(f"{__name__}.NamedGate")
    with pytest.raises(ValueError, match="already registered"):
        register_layer(NamedGate)
    del registry[f"{__name__}.NamedGate"]
    assert registry == before


@pytest.mark.parametrize(
    ("args", "error", "message"),
    [
        (("Linear",), ValueError, "a class or its fully qualified name"),
        ((nn.Linear(2, 2),), TypeError, "a subclass of torch.nn.Module"),
        (("torch.optim.SGD",), TypeError, "a subclass of torch.nn.Module"),
        ((Gate, "w_in"), TypeError, "kernels takes a sequence of parameter names"),
        ((Gate, ()), ValueError, "needs at least one kernel parameter name"),
        ((Gate, ("w_in",), [""]), TypeError, "biases takes a sequence"),
    ],
)
def test_bad_registrations_are_refused(registry, args, error, message):
    before = dict(registry)
    with pytest.raises(error, match=message):
        register_layer(*args)
    assert registry == before


@pytest.mark.parametrize(
    ("layer_types", "message"),
    [
        (
            ["LayerNorm"],
            r"unknown layer type 'LayerNorm'; registered layer types: \[.*'LSTM'.*\]; "
            "add others with lightning_mk.register_layer",
        ),
        (["lstm"], r"'lstm' differs only in case from \['torch.nn.modules.rnn.LSTM'\]"),
        (
            ["conv1d"],
            r"differs only in case from \['torch.nn.modules.conv.Conv1d', 'transformers.pytorch_utils.Conv1D'\]",
        ),
        ([nn.LayerNorm], "unknown layer type 'torch.nn.modules.normalization.LayerNorm'"),
        ([], "layer_types=\\[\\] selects no layer type"),
    ],
)
def test_unknown_layer_types_fail_when_the_callback_is_made(layer_types, message):
    with pytest.raises(ValueError, match=message):
        MajorityKernelCallback.published(layer_types=layer_types)
    with pytest.raises(ValueError, match=message):
        apply_majority_kernels(nn.Linear(2, 2), layer_types=layer_types)


def test_other_layer_type_arguments_that_cannot_match_fail_early():
    with pytest.raises(TypeError, match="layer_types takes a list of layer types"):
        MajorityKernelCallback.published(layer_types="Linear")
    with pytest.raises(ValueError, match=r"include=\[\] chooses no layer"):
        MajorityKernelCallback.published(include=[])
    # a registered name that misses the model by case says so
    model = nn.Sequential(nn.Conv1d(2, 2, 1))
    with pytest.raises(
        ValueError,
        match=r"of a chosen type \(\['Conv1D'\]\); note that \['torch.nn.modules.conv.Conv1d'\] differ only in case",
    ):
        apply_majority_kernels(model, layer_types=["Conv1D"])
    assert not kernel_copies(model)


def test_layer_types_that_select_no_layer_name_the_models_types():
    """So the user can pick one: the types that hold trainable parameters, not activations or containers."""
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.LayerNorm(8), nn.Linear(8, 2))
    with pytest.raises(
        ValueError,
        match=r"Sequential has no layer with a trainable kernel of a chosen type \(\['LSTM'\]\); "
        r"the model's layer types with trainable parameters: \['Conv2d', 'LayerNorm', 'Linear'\]; register",
    ):
        apply_majority_kernels(model, layer_types=["LSTM"])
    assert not kernel_copies(model)


def test_lazy_layers_are_refused_before_anything_changes():
    model = nn.Sequential(nn.Linear(3, 3), nn.LazyConv1d(2, 1))
    with pytest.raises(ValueError, match="layer '1' is lazy and not yet initialised: run one forward"):
        apply_majority_kernels(model)
    assert not kernel_copies(model)


def test_independent_init_needs_reset_parameters(registry):
    register_layer(Gate, kernels=("w_*",))
    model = nn.Sequential(nn.Linear(4, 4), Gate())
    with pytest.raises(ValueError, match=r"reset_parameters\(\), which \['Gate'\] lack; use init='replicate'"):
        apply_majority_kernels(model, init="independent")
    assert not kernel_copies(model), "refused before any layer changed"
    apply_majority_kernels(model, init="independent", exclude=["1"])


RNNS = {  # a layer and its inputs (cells get a hidden state: from zeros, weight_hh would get no gradient)
    "lstm-bidirectional-2-layers-proj": (
        lambda: nn.LSTM(3, 5, num_layers=2, bidirectional=True, proj_size=2, batch_first=True),
        lambda: (torch.randn(2, 6, 3),),
    ),
    "gru-bidirectional-2-layers": (
        lambda: nn.GRU(3, 5, num_layers=2, bidirectional=True),
        lambda: (torch.randn(6, 2, 3),),
    ),
    "rnn": (lambda: nn.RNN(3, 4, nonlinearity="relu"), lambda: (torch.randn(6, 2, 3),)),
    "lstm-cell": (lambda: nn.LSTMCell(3, 4), lambda: (torch.randn(2, 3), (torch.randn(2, 4), torch.randn(2, 4)))),
    "gru-cell": (lambda: nn.GRUCell(3, 4), lambda: (torch.randn(2, 3), torch.randn(2, 4))),
}


def _output(out):
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
@pytest.mark.parametrize("name", sorted(RNNS))
def test_recurrent_layers_use_the_sampled_weights_and_collapse_exactly(name):
    build, inputs = RNNS[name]
    torch.manual_seed(0)
    rnn, plain = build(), build()
    plain.load_state_dict(rnn.state_dict())  # the biases stay single: the same in both
    kernels = [n for n, _ in rnn.named_parameters() if n.startswith("weight")]
    handle = apply_majority_kernels(rnn, k=3, init="independent", step_on_forward=False)
    assert sorted(kernel_copies(rnn)) == sorted(kernels), "every layer, direction and projection"
    x = inputs()

    rnn.train()
    handle.step = 3
    sampled = {n: getattr(rnn, n).detach().requires_grad_() for n in kernels}
    copies = kernel_copies(rnn)
    assert not any(torch.allclose(sampled[n], copies[n].mean(0)) for n in kernels), "a draw, not the mean"
    out = _output(rnn(*x))
    expected = _output(functional_call(plain, sampled, x))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    out.square().sum().backward()
    expected.square().sum().backward()
    for n in kernels:  # select: each element's gradient goes to the one copy drawn
        assert copies[n].grad.abs().sum() > 0, n
        torch.testing.assert_close(copies[n].grad.sum(0), sampled[n].grad, rtol=0, atol=1e-5)

    rnn.eval()
    with torch.no_grad():
        mk_eval = _output(rnn(*x))
        plain.load_state_dict(collapsed_state_dict(rnn), strict=True)
        torch.testing.assert_close(_output(plain(*x)), mk_eval, rtol=0, atol=1e-5)
        collapse(rnn)
        assert type(rnn) is type(plain)
        torch.testing.assert_close(_output(rnn(*x)), mk_eval, rtol=0, atol=1e-5)


def test_coverage_counts_parameters_by_type():
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), Mixer(8), nn.Linear(8, 2))
    coverage = apply_majority_kernels(model, k=2).coverage
    assert coverage == Coverage(
        kernels=2,
        covered=48,
        total=138,
        single={nn.Linear: 10, nn.LayerNorm: 16, Mixer: 64},
        unregistered={Mixer: 64},
        single_names={nn.Linear: ("bias",), nn.LayerNorm: ("weight", "bias"), Mixer: ("mix",)},
    )
    assert coverage.share == pytest.approx(48 / 138)
    assert coverage.unregistered_share == pytest.approx(64 / 138)
    assert str(coverage) == (
        "2 kernels have copies: 34.8% of the deployed model's 138 trainable parameters; "
        "left single: Mixer mix 46.4% (unregistered type), LayerNorm weight/bias 11.6%, Linear bias 7.2%"
    )
    tied = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    tied[1].weight = tied[0].weight
    assert apply_majority_kernels(tied, k=2).coverage == Coverage(1, 40, 40, {}, {}, {}), "a tied kernel counts once"


class MixerModule(TinyModule):
    def __init__(self, middle: nn.Module) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), middle, nn.Linear(16, 3))


def _fit(tmp_path, model, **kwargs):
    cb = MajorityKernelCallback.published(k=2, save_path=tmp_path / "small.pt", log_spread=False, **kwargs)
    trainer(tmp_path, limit_train_batches=2, callbacks=[cb]).fit(model, loader())
    return cb


@pytest.fixture
def lightning_log(caplog):
    """Lightning's own logger does not propagate to the root one, where caplog listens."""
    logger = logging.getLogger("lightning.pytorch")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO)
    yield caplog
    logger.removeHandler(caplog.handler)


def test_the_callback_logs_the_coverage_and_warns_about_unregistered_layers(tmp_path, lightning_log):
    with pytest.warns(UserWarning) as record:
        _fit(tmp_path, MixerModule(Mixer(16)))
    messages = [str(w.message) for w in record if "registered" in str(w.message)]
    assert len(messages) == 1, messages
    assert messages[0].startswith(
        "MajorityKernelCallback: 56.8% of the trainable parameters are in layers of types no registered"
    )
    assert f"{__name__}.Mixer (56.8%)" in messages[0] and "lightning_mk.register_layer(" in messages[0]
    logged = (
        "MajorityKernelCallback: 2 kernels have copies: 39.0% of the deployed model's 451 trainable parameters; "
        "left single: Mixer mix 56.8%"
    )
    assert logged + " (unregistered type)" in lightning_log.text


def test_registering_the_type_removes_the_warning_and_covers_it(tmp_path, registry):
    register_layer(Mixer, kernels=("mix",))
    model = MixerModule(Mixer(16))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        cb = _fit(tmp_path, model)
    assert not [w for w in record if "registered" in str(w.message)]
    assert sorted(kernel_copies(model)) == ["net.0.weight", "net.2.mix", "net.3.weight"]
    assert cb.kernels.coverage.share == pytest.approx(432 / 451)


def test_normalization_layers_stay_single_without_a_warning(tmp_path, lightning_log):
    model = MixerModule(nn.LayerNorm(16))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        cb = _fit(tmp_path, model)
    assert not [w for w in record if "registered" in str(w.message)]
    assert cb.kernels.coverage.single[nn.LayerNorm] == 32
    assert cb.kernels.coverage.unregistered == {}
    assert "left single: LayerNorm weight/bias 14.1%" in lightning_log.text


@pytest.mark.parametrize(
    "build, kernels, forward",
    [
        (lambda: nn.LSTM(8, 16, num_layers=2), 8, lambda lstm, x: lstm(x)[0]),
        (lambda: nn.MultiheadAttention(8, 2), 4, lambda attention, x: attention(x, x, x)[0]),
    ],
    ids=["lstm", "attention"],
)
def test_a_layer_that_reads_its_weights_several_times_draws_each_kernel_once_per_forward(monkeypatch, build, kernels, forward):
    """nn.LSTM reads each weight about 2.5 times per forward, nn.MultiheadAttention its ``in_proj_weight`` three
    times; the cache makes each one draw, with the same result."""
    from torch.nn.utils import parametrize

    from lightning_mk.collapsing import collapse
    from lightning_mk.parametrization import MajorityKernel

    def make(cached):
        torch.manual_seed(0)
        layer = build()
        majority = apply_majority_kernels(layer, k=3, biases=True, init_noise=0.3, step_on_forward=False)
        if not cached:
            layer._forward_pre_hooks.clear(), layer._forward_hooks.clear()
        majority.step = 3
        return layer.train()

    draws = []
    kernel = MajorityKernel._kernel
    monkeypatch.setattr(MajorityKernel, "_kernel", lambda self, stored: draws.append(self.index) or kernel(self, stored))
    x = torch.randn(5, 2, 8)
    cached, plain = make(True), make(False)
    out = forward(cached, x)
    assert sorted(draws) == list(range(kernels)), f"{kernels} kernels (weights and biases), each drawn once"
    out.square().sum().backward()
    expected = forward(plain, x)
    expected.square().sum().backward()
    assert torch.equal(out, expected)
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(cached.parameters(), plain.parameters()))
    with pytest.raises((RuntimeError, AssertionError)):
        forward(cached, torch.randn(5, 2, 9))
    assert parametrize._cache_enabled == 0, "a failed forward closes the cache"
    collapse(cached)
    assert not cached._forward_pre_hooks and not cached._forward_hooks, "collapse removes the hooks"
