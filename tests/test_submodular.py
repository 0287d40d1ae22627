"""Submodular neuron selection: the two objectives, the refit, and pruning every model class to its width (whose
``n`` is its hidden dimensions' width, as the CNN's test checks)."""

import pytest
import torch
from torch import nn

from lightning_mk.experiments.models import CNN, MLP, ResNet, Transformer
from lightning_mk.experiments.submodular import facility_location, least_squares_refit, prune_to_width, reconstruction

MODELS = {
    "mlp": (lambda n: MLP((40,), 5, n=n), (40,)),
    "resnet-1d": (lambda n: ResNet((40,), 5, n=n, channels=8), (40,)),
    "resnet-2d": (lambda n: ResNet((1, 8, 8), 5, n=n, channels=8), (1, 8, 8)),
    "cnn": (lambda n: CNN((40,), 5, n=n, channels=8), (40,)),
    "transformer-mha": (lambda n: Transformer((40,), 5, n=n, d_model=8, heads=2, attention="mha"), (40,)),
    "transformer-linear": (lambda n: Transformer((40,), 5, n=n, d_model=8, heads=2, attention="linear"), (40,)),
}
N, K = 4, 3


@pytest.mark.parametrize("shape", [(40,), (1, 40)])
def test_the_cnn_takes_a_signal_with_or_without_channels_and_n_is_its_hidden_width(shape):
    n, k = 6, 3
    model, wide = CNN(shape, 10, n=n), CNN(shape, 10, n=k * n)
    assert model(torch.randn(5, *shape)).shape == (5, 10) and wide(torch.randn(5, *shape)).shape == (5, 10)
    assert model.head.in_features == 32 * 10, "40 points, two stride-2 convolutions: 10 positions of 32 channels"
    assert {type(m) for m in model.modules()} == {CNN, nn.Conv1d, nn.Linear, nn.Dropout}, "no normalisation layers"
    for m, width in ((model, n), (wide, k * n)):
        assert [h.name for h in m.hidden()] == ["conv1", "conv2"]
        assert all(h.producer.out_channels == h.consumer.in_channels == width and h.norm is None for h in m.hidden())
    with pytest.raises(ValueError, match=r"CNN is 1-D"):
        CNN((1, 8, 8), 10)


def build(name, n, seed):
    """A model in eval mode whose norms have non-trivial statistics (a fresh BatchNorm is nearly the identity)."""
    torch.manual_seed(seed)
    model = MODELS[name][0](n).eval()
    with torch.no_grad():
        for h in model.hidden():
            if h.norm is not None:
                h.norm.weight.normal_(1, 0.5), h.norm.bias.normal_(0, 0.5)
                h.norm.running_mean.normal_(0, 0.5), h.norm.running_var.uniform_(0.5, 2)
    return model


def batches(name, seed, count=2, size=32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, *MODELS[name][1], generator=g) for _ in range(count)]


@pytest.mark.parametrize("needed", [2, 5])  # with 2, the target is explained before the budget is spent
@pytest.mark.parametrize("groups", [1, 3])
def test_duplicate_units_are_never_both_picked_while_distinct_ones_remain(groups, needed):
    g, distinct = torch.Generator().manual_seed(0), 5
    base = torch.randn(40, distinct, groups, generator=g)
    units = torch.cat([base, base[:, :3]], 1)  # units 5, 6, 7 duplicate units 0, 1, 2
    target = base[:, :needed].flatten(1) @ torch.randn(needed * groups, 6, generator=g)
    for picks, values in (
        reconstruction(units, target, distinct),
        facility_location(units.transpose(0, 1).flatten(1), distinct),
    ):
        assert sorted(p % distinct for p in picks) == list(range(distinct))
        assert len(values) == distinct and all(b >= a for a, b in zip(values, values[1:]))
    picks, values = reconstruction(units, target, len(units[0]))  # a budget past the distinct ones: fills up
    assert sorted(picks) == list(range(8)) and all(b >= a for a, b in zip(values, values[1:]))


def test_reconstruction_finds_the_three_units_the_target_depends_on():
    g = torch.Generator().manual_seed(1)
    space = torch.linalg.qr(torch.randn(200, 7, generator=g, dtype=torch.float64)).Q
    relevant = space[:, :3] @ torch.randn(3, 3, generator=g, dtype=torch.float64)
    irrelevant = space[:, 3:] @ torch.randn(4, 7, generator=g, dtype=torch.float64)  # 7 units, rank 4: dependent
    units = torch.cat([irrelevant[:, :2], relevant[:, :1], irrelevant[:, 2:5], relevant[:, 1:2], irrelevant[:, 5:],
                       relevant[:, 2:]], 1)  # relevant units at 2, 6, 9
    target = relevant @ torch.randn(3, 4, generator=g, dtype=torch.float64)
    picks, values = reconstruction(units[:, :, None], target, 3)
    assert sorted(picks) == [2, 6, 9]
    assert values[-1] == pytest.approx(float(target.square().sum()), rel=1e-4)
    fit = least_squares_refit(units[:, sorted(picks)], target)
    torch.testing.assert_close(units[:, sorted(picks)] @ fit, target, rtol=1e-6, atol=1e-8)


def test_lazy_facility_location_equals_plain_greedy():
    g = torch.Generator().manual_seed(2)
    features = torch.randn(30, 12, generator=g)
    unit = features.double() / features.double().norm(dim=1, keepdim=True)
    sim = (1 + unit @ unit.T) / 2
    covered, picks, values = torch.zeros(30, dtype=torch.float64), [], []
    for _ in range(10):
        gain = (sim - covered[:, None]).clamp_min(0).sum(0)
        gain[picks] = -1
        j = int(gain.argmax())
        covered = torch.maximum(covered, sim[:, j])
        picks.append(j), values.append(float(covered.sum()))
    lazy_picks, lazy_values = facility_location(features, 10)
    assert lazy_picks == picks
    assert lazy_values == pytest.approx(values, rel=1e-12)
    assert all(b > a for a, b in zip(values, values[1:]))


@pytest.mark.parametrize("groups", [1, 3])
def test_reconstruction_equals_plain_greedy_on_least_squares(groups):
    g = torch.Generator().manual_seed(3)
    units = torch.randn(60, 10, groups, generator=g, dtype=torch.float64)
    target = units[:, :4].flatten(1) @ torch.randn(4 * groups, 5, generator=g, dtype=torch.float64)
    target += 0.5 * torch.randn(60, 5, generator=g, dtype=torch.float64)

    def value(chosen):
        kept = units[:, chosen].flatten(1)
        return float(target.square().sum() - (target - kept @ torch.linalg.lstsq(kept, target).solution).square().sum())

    picks, values = [], []
    for _ in range(7):
        best = max((u for u in range(10) if u not in picks), key=lambda u: value(picks + [u]))
        picks.append(best), values.append(value(picks))
    greedy_picks, greedy_values = reconstruction(units, target, 7)
    assert greedy_picks == picks
    assert greedy_values == pytest.approx(values, rel=1e-10)


def test_unknown_objective_names_the_valid_ones():
    with pytest.raises(ValueError, match="reconstruction, facility_location"):
        prune_to_width(build("mlp", K * N, 0), build("mlp", N, 0), batches("mlp", 0), objective="magnitude")


def masked_to(wide, chosen):
    """The wide model with the consumer columns of every unchosen unit zeroed: the sub-network of the chosen units."""
    with torch.no_grad():
        for h, idx in zip(wide.hidden(), chosen):
            mask = torch.zeros(h.consumer.weight.shape[1], dtype=torch.bool)
            mask[idx] = True
            h.consumer.weight[:, ~mask] = 0
    return wide


@pytest.mark.parametrize("refit", [False, True])
@pytest.mark.parametrize("objective", ["reconstruction", "facility_location"])
@pytest.mark.parametrize("name", list(MODELS))
def test_prune_gives_the_small_architecture(name, objective, refit):
    wide, fresh = build(name, K * N, 0), build(name, N, 1)
    before = {k: v.clone() for k, v in wide.state_dict().items()}
    small = prune_to_width(wide, build(name, N, 2), batches(name, 0), objective, refit)
    assert all(torch.equal(v, before[k]) for k, v in wide.state_dict().items())
    assert {k: v.shape for k, v in small.state_dict().items()} == {k: v.shape for k, v in fresh.state_dict().items()}
    assert sum(p.numel() for p in small.parameters()) == sum(p.numel() for p in fresh.parameters())
    fresh.load_state_dict(small.state_dict(), strict=True)
    # which wide unit each small unit is, read off a per-unit tensor (distinct in a random model)
    chosen = []
    for hw, hs in zip(wide.hidden(), small.hidden()):
        per_unit = [h.producer.bias if h.norm is None else h.norm.running_mean for h in (hw, hs)]
        chosen.append([int((per_unit[0] == v).nonzero()) for v in per_unit[1]])
        assert chosen[-1] == sorted(set(chosen[-1])) and len(chosen[-1]) == N
    if not refit:  # the pruned model is exactly the wide model's sub-network of the chosen units
        x = torch.randn(16, *MODELS[name][1])
        torch.testing.assert_close(small(x), masked_to(wide, chosen)(x), rtol=0, atol=1e-5)


def stacked(small, wide, k):
    """Make ``wide`` compute ``small``'s function: each hidden unit k times, consumer columns divided by k."""
    names = {m: name for name, m in small.named_modules()}
    state = small.state_dict()
    for h in small.hidden():
        key = names[h.consumer] + ".weight"
        state[key] = torch.cat([state[key]] * k, 1) / k
        for module in filter(None, (h.producer, h.norm)):
            for p in ("weight", "bias", "running_mean", "running_var"):
                if f"{names[module]}.{p}" in state:
                    state[f"{names[module]}.{p}"] = torch.cat([state[f"{names[module]}.{p}"]] * k)
    wide.load_state_dict(state)
    return wide


@pytest.mark.parametrize("objective", ["reconstruction", "facility_location"])
@pytest.mark.parametrize("name", list(MODELS))
def test_prune_with_refit_recovers_the_model_a_stacked_wide_model_copies(name, objective):
    small = build(name, N, 3)
    wide = stacked(small, build(name, K * N, 0), K)
    x = torch.randn(64, *MODELS[name][1])
    torch.testing.assert_close(wide(x), small(x), rtol=0, atol=1e-5)
    pruned = prune_to_width(wide, build(name, N, 4), batches(name, 5), objective, refit=True).eval()
    assert (pruned(x) - small(x)).abs().max() <= 1e-4
