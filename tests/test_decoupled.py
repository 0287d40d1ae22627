"""form="decoupled": the stored tensor is [mu, delta_1..k]; mu trains at the plain model's pace and is deployed."""

import copy
import json

import pytest
import torch
from torch import nn

from helpers import TinyModule, loader, trainer
from lightning_mk import SCHEMES, MajorityKernelCallback, apply_majority_kernels, collapsed_state_dict, copy_spread
from lightning_mk import kernel_copies


def _linear(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def _stored(module, name="0"):
    return module.get_submodule(name).parametrizations.weight.original


def _assert_unbiased(kernels, steps, mu):
    """Monte Carlo over ``steps`` draws of the handle's single layer: their mean is ``mu`` within 5 standard errors.
    Returns the draws."""
    draws = []
    for step in range(steps):
        kernels.step = step
        draws.append(kernels.module.weight.detach())
    draws = torch.stack(draws)
    sem = draws.std(0) / len(draws) ** 0.5
    assert ((draws.mean(0) - mu).abs() <= 5 * sem + 1e-12).all()
    return draws


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
@pytest.mark.parametrize("k", [2, 4])
def test_every_scheme_is_unbiased_around_mu(scheme, k):
    """Monte Carlo: the average sampled kernel converges to mu, not to mu + mean(delta)."""
    model = apply_majority_kernels(nn.Linear(5, 3).double(), k=k, scheme=scheme, form="decoupled", step_on_forward=False)
    stored = _stored(model.module, "")
    with torch.no_grad():
        stored[1:] = torch.randn(k, 3, 5, dtype=torch.float64) + 0.7  # deviations with a non-zero mean
    _assert_unbiased(model, 10000, stored[0])
    model.module.eval()
    assert torch.equal(model.module.weight, stored[0]), "eval mode is mu"


@pytest.mark.parametrize("init_noise", [0.0, 0.1])
def test_replicate_starts_mu_at_the_weight_and_independent_at_the_draws_mean(init_noise):
    plain = _linear()
    model = apply_majority_kernels(copy.deepcopy(plain), k=3, form="decoupled", init_noise=init_noise).module
    stored = _stored(model)
    assert stored.shape == (4, 8, 6)
    assert torch.equal(stored[0], plain[0].weight)
    assert torch.equal(stored[1:], torch.zeros(3, 8, 6)) == (init_noise == 0)
    as_copies = apply_majority_kernels(copy.deepcopy(plain), k=3, init_noise=init_noise).module
    torch.testing.assert_close(kernel_copies(model)["0.weight"], kernel_copies(as_copies)["0.weight"].detach())
    x = torch.randn(4, 6)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), plain.eval()(x))

    model = apply_majority_kernels(_linear(), k=3, init="independent", form="decoupled", seed=5).module
    as_copies = apply_majority_kernels(_linear(), k=3, init="independent", seed=5).module
    draws = kernel_copies(as_copies)["0.weight"].detach()
    torch.testing.assert_close(_stored(model)[0].detach(), draws.mean(0))
    torch.testing.assert_close(kernel_copies(model)["0.weight"], draws)


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
@pytest.mark.parametrize("init_noise", [0.0, 0.3])
def test_mu_gets_the_plain_models_gradient_and_grad_scale_only_the_deviations(scheme, init_noise):
    """mu's gradient is exactly the plain model's at the sampled kernel (the weight itself when the
    deviations are zero); grad_scale multiplies the deviations' gradients and leaves mu's alone."""
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    grads = {}
    for grad_scale in ("none", "k"):
        kernels = apply_majority_kernels(_linear(), k=4, scheme=scheme, form="decoupled", init_noise=init_noise,
                                         grad_scale=grad_scale, step_on_forward=False)
        model = kernels.module.train()
        kernels.step = 3
        plain = _linear()
        with torch.no_grad():
            for name in ("0", "2"):
                plain.get_submodule(name).weight.copy_(model.get_submodule(name).weight)  # the sampled kernel
        nn.functional.cross_entropy(model(x), y).backward()
        nn.functional.cross_entropy(plain(x), y).backward()
        for name in ("0", "2"):
            assert torch.equal(_stored(model, name).grad[0], plain.get_submodule(name).weight.grad), name
        grads[grad_scale] = _stored(model, "0").grad
    assert torch.equal(grads["k"][0], grads["none"][0])
    torch.testing.assert_close(grads["k"][1:], 4 * grads["none"][1:])
    assert grads["none"][1:].abs().sum() > 0
    torch.testing.assert_close(grads["none"][1:].sum(0), torch.zeros(8, 6), atol=1e-6, rtol=0)  # (a_i - 1/k) G


def _train(model, optimizer, batches, after_step=lambda: None):
    model.train()
    for x, y in batches:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        after_step()


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("scheme", ["select", "layer"])
@pytest.mark.parametrize("how", ["noise 0", "deviations reset"])
def test_at_zero_deviation_it_is_exactly_plain_training(optimizer, scheme, how):
    """20 steps with the deviations kept at zero (no noise, or reset after each step) train mu exactly as
    plain training trains the weight, under SGD with momentum and weight decay and under Adam; the
    copies form at zero noise does not under SGD (its mean gets 1/k of the gradient; Adam's
    normalisation hides that scale when the copies are equal)."""
    make = {
        "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-3),
        "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    }[optimizer]
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(20)]
    plain = _linear()
    _train(plain, make(plain.parameters()), batches)

    ends = {}
    for form in ("decoupled", "copies"):
        kernels = apply_majority_kernels(_linear(), k=4, scheme=scheme, form=form)
        stored = [_stored(kernels.module, name) for name in ("0", "2")]

        def reset():
            with torch.no_grad():
                for s in stored:
                    s[1:] = 0

        if how == "noise 0":
            kernels.draws.noise = 0.0
        _train(kernels.module, make(kernels.module.parameters()), batches, reset if how == "deviations reset" else lambda: None)
        ends[form] = kernels.collapsed_state_dict()
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(ends["decoupled"][key], value, rtol=0, atol=1e-6)
    if how == "noise 0" and optimizer == "sgd":
        assert (ends["copies"]["0.weight"] - plain[0].weight).abs().max() > 1e-3


def test_noise_level_lerps_between_mu_and_the_draw():
    kernels = apply_majority_kernels(_linear(), k=4, scheme="convex", init="independent", form="decoupled",
                                     step_on_forward=False)
    model = kernels.module.train()
    mu = _stored(model)[0]
    kernels.step = 5
    full = model[0].weight
    assert not torch.allclose(full, mu)
    kernels.draws.noise = 0.25
    torch.testing.assert_close(model[0].weight, mu + 0.25 * (full - mu))
    kernels.draws.noise = 0.0
    assert torch.equal(model[0].weight, mu)


def test_copies_and_spread_are_around_mu():
    model = apply_majority_kernels(_linear(), k=2, form="decoupled", step_on_forward=False).module
    with torch.no_grad():
        _stored(model)[0] = 2.0
        _stored(model)[1] = 5.0
        _stored(model)[2] = 3.0  # mean(delta) 4: the copies are mu -+ 1
    copies = kernel_copies(model)
    assert copies["0.weight"].shape == (2, 8, 6) and copies["2.weight"].shape == (2, 3, 8)
    assert torch.equal(copies["0.weight"], torch.stack([torch.full((8, 6), 3.0), torch.full((8, 6), 1.0)]))
    assert copy_spread(model) == {"0.weight": pytest.approx(0.5), "2.weight": 0.0}
    assert copy_spread(model.state_dict()) == copy_spread(model)


def test_the_collapsed_state_is_mu_and_holds_no_deviations():
    """torch.save writes a tensor's whole storage: a view of row 0 would save the deviations too."""
    model = apply_majority_kernels(_linear(), k=3, form="decoupled", init_noise=0.1).module
    small = collapsed_state_dict(model.state_dict())
    assert torch.equal(small["0.weight"], _stored(model)[0])
    assert small["0.weight"].untyped_storage().nbytes() == small["0.weight"].nbytes


def _extra_state(module):
    return module[0].parametrizations.weight[0].get_extra_state()


def test_loading_a_state_of_the_other_form_names_both_and_an_old_state_reads_as_copies():
    decoupled = apply_majority_kernels(_linear(), k=3, form="decoupled").module
    copies = apply_majority_kernels(_linear(), k=3).module
    with pytest.raises(ValueError, match=r"form='decoupled', but this model has k=3, scheme='select', form='copies'"):
        copies.load_state_dict(decoupled.state_dict())
    assert json.loads(bytes(_extra_state(decoupled).tolist())) == {"k": 3, "scheme": "select", "form": "decoupled"}

    old = copies.state_dict()  # as saved before forms existed: no "form" in the kernels' settings
    for key in [key for key in old if key.endswith("._extra_state")]:
        old[key] = torch.frombuffer(bytearray(b'{"k": 3, "scheme": "select"}'), dtype=torch.uint8)
    apply_majority_kernels(_linear(), k=3).module.load_state_dict(old)
    assert set(collapsed_state_dict(old)) == set(_linear().state_dict())
    with pytest.raises(ValueError, match=r"form='copies', but this model has .*form='decoupled'"):
        apply_majority_kernels(_linear(), k=3, form="decoupled").module.load_state_dict(old)


def test_handle_state_holds_the_form_and_refuses_another():
    decoupled = apply_majority_kernels(_linear(), k=3, form="decoupled")
    assert decoupled.state_dict()["form"] == "decoupled"
    copies = apply_majority_kernels(_linear(), k=3)
    with pytest.raises(ValueError, match="has form='decoupled', but this model has form='copies'; use the same form"):
        copies.load_state_dict(decoupled.state_dict())
    old = {key: value for key, value in copies.state_dict().items() if key != "form"} | {"step": 4}
    copies.load_state_dict(old)  # saved before forms existed: copies
    assert copies.step == 4
    with pytest.raises(ValueError, match="has form='copies', but this model has form='decoupled'"):
        decoupled.load_state_dict(old)


def test_callback_trains_mu_and_saves_it_as_the_plain_model(tmp_path):
    torch.manual_seed(0)
    model = TinyModule()
    before = copy.deepcopy(model.net[0].weight)
    cb = MajorityKernelCallback.published(k=3, scheme="layer", form="decoupled", save_path=tmp_path / "small.pt")
    t = trainer(tmp_path, max_epochs=2, callbacks=[cb])
    t.fit(model, loader())
    stored = model.net[0].parametrizations.weight.original
    assert stored.shape == (4, 16, 8) and not torch.equal(stored[0], before)
    assert cb.state_dict()["form"] == "decoupled" and t.callback_metrics["mk/spread"] > 0
    small = TinyModule()
    small.load_state_dict(torch.load(tmp_path / "small.pt", weights_only=True), strict=True)
    x = torch.randn(32, 8)
    with torch.no_grad():
        assert torch.equal(small.eval()(x), model.eval()(x))


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_relative_form_is_unbiased_around_mu_at_a_fixed_relative_distance(scheme):
    """form="relative": the deviations are rescaled (without gradient) so the copies sit at mu's RMS from mu;
    the draws average to mu, eval mode is mu, and a `select` draw is `noise` (relative RMS) away from mu."""
    kernels = apply_majority_kernels(nn.Linear(50, 40).double(), k=4, scheme=scheme, form="relative", step_on_forward=False)
    assert kernels.settings.init_noise == 1.0  # the form's own: the deviations start random
    stored = _stored(kernels.module, "")
    with torch.no_grad():
        stored[1:] *= 7.0  # their size does not matter
    copies = kernel_copies(kernels.module)["weight"]
    rms = stored[0].pow(2).mean().sqrt()
    torch.testing.assert_close((copies - stored[0]).pow(2).mean().sqrt(), rms)
    assert copy_spread(kernels.module) == {"weight": 1.0}
    kernels.draws.noise = 0.3
    draws = _assert_unbiased(kernels, 4000, stored[0])
    if scheme == "select":
        distance = (draws - stored[0]).pow(2).mean((1, 2)).sqrt() / rms
        torch.testing.assert_close(distance.mean(), torch.tensor(0.3, dtype=torch.float64), rtol=0.05, atol=0)
    kernels.module.eval()
    assert torch.equal(kernels.module.weight, stored[0])


def test_relative_form_gives_mu_the_plain_gradient_and_is_plain_training_at_zero_noise():
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    kernels = apply_majority_kernels(_linear(), k=4, form="relative", step_on_forward=False)
    model = kernels.module.train()
    kernels.step = 3
    plain = _linear()
    with torch.no_grad():
        for name in ("0", "2"):
            plain.get_submodule(name).weight.copy_(model.get_submodule(name).weight)
    nn.functional.cross_entropy(model(x), y).backward()
    nn.functional.cross_entropy(plain(x), y).backward()
    for name in ("0", "2"):
        assert torch.equal(_stored(model, name).grad[0], plain.get_submodule(name).weight.grad), name

    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(20)]
    plain = _linear()
    _train(plain, torch.optim.Adam(plain.parameters(), lr=1e-2), batches)
    kernels = apply_majority_kernels(_linear(), k=4, form="relative")
    kernels.draws.noise = 0.0
    _train(kernels.module, torch.optim.Adam(kernels.module.parameters(), lr=1e-2), batches)
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(kernels.collapsed_state_dict()[key], value, rtol=0, atol=1e-6)


@pytest.mark.parametrize("form", ["decoupled", "relative"])
def test_a_training_step_reaches_the_stored_tensor_by_one_edge(form):
    """With the callback's noise level and decay, a step uses mu several times and the deviations: all come from
    one split of the stored tensor, so its gradient is written once, not once per use into a zero-filled tensor
    of the stored tensor's full size."""
    model = _linear()
    apply_majority_kernels(model, MajorityKernelCallback(k=4, form=form).settings)
    stored = _stored(model)
    edges, seen, todo = 0, set(), [model(torch.randn(5, 6)).sum().grad_fn]
    while todo:
        node = todo.pop()
        for child, _ in node.next_functions:
            if child is None:
                continue
            edges += getattr(child, "variable", None) is stored
            if child not in seen:
                seen.add(child)
                todo.append(child)
    assert edges == 1


@pytest.mark.parametrize("form", ["decoupled", "relative"])
@pytest.mark.parametrize("options", [dict(), dict(grad_scale="k", noise=0.5, decay=0.1)])
def test_select_as_one_node_equals_the_general_composition(form, options):
    """The decoupled forms' eager select path (one autograd node) draws the kernel and writes the gradient the
    composition of the scheme, the form, the noise level and decay gives."""
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 3, (16,))
    runs = []
    for fused in (True, False):
        kernels = apply_majority_kernels(_linear().double(), k=4, form=form, init_noise=0.5, step_on_forward=False, **options)
        for layer in kernels.module[0], kernels.module[2]:
            layer.parametrizations.weight[0]._select = fused
        kernels.draws.noise = options.get("noise", 1.0) * 0.6  # below the ceiling: lerped towards mu, less decay
        kernels.step = 7
        weights = [kernels.module[0].weight, kernels.module[2].weight]
        nn.functional.cross_entropy(kernels.module(x), y).backward()
        runs.append(weights + [_stored(kernels.module, name).grad for name in ("0", "2")])
    for got, expected in zip(*runs):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)


def test_select_as_one_node_has_the_gradients_of_its_formula_first_and_second_order():
    """Its hand-written backward (no decay, which is not a gradient of the kernel) against finite differences of
    mu + c (deviations[index] - mean(deviations)), and differentiable again (create_graph)."""
    from lightning_mk.forms import _Selected

    g = torch.Generator().manual_seed(0)
    stored = torch.randn(5, 3, 4, dtype=torch.float64, generator=g).requires_grad_()
    index = torch.randint(0, 4, (1, 12), generator=g)

    def kernel(stored):
        return _Selected.apply(stored, index, stored[1:].detach().mean(0), torch.tensor(0.7, dtype=torch.float64), None, 1.0)

    assert torch.autograd.gradcheck(kernel, (stored,))
    assert torch.autograd.gradgradcheck(kernel, (stored,))
