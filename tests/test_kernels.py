"""The Lightning-free mechanism: every layer type, exact collapse, schemes, gradients, ties, options."""

import copy

import pytest
import torch
from torch import nn

from lightning_mk import SCHEMES, Scheme, apply_majority_kernels, collapse, collapsed_state_dict, copy_spread, kernel_copies
from lightning_mk.schemes import Random, get_scheme


class Seq(nn.Module):
    """Wraps one layer with an input builder, so every layer type runs through the same test."""

    def __init__(self, make_layer, make_input, call=None):
        super().__init__()
        self.layer = make_layer()
        self.make_input, self.call = make_input, call or (lambda layer, x: layer(x))

    def forward(self, x):
        out = self.call(self.layer, x)
        return out[0] if isinstance(out, tuple) else out


LAYERS = {
    "Linear": (lambda: nn.Linear(6, 5), lambda: torch.randn(4, 6)),
    "Conv1d": (lambda: nn.Conv1d(3, 4, 3), lambda: torch.randn(2, 3, 9)),
    "Conv2d": (lambda: nn.Conv2d(3, 4, 3), lambda: torch.randn(2, 3, 7, 7)),
    "Conv3d": (lambda: nn.Conv3d(2, 3, 2), lambda: torch.randn(2, 2, 4, 4, 4)),
    "ConvTranspose1d": (lambda: nn.ConvTranspose1d(3, 4, 3), lambda: torch.randn(2, 3, 9)),
    "ConvTranspose2d": (lambda: nn.ConvTranspose2d(3, 4, 3, stride=2), lambda: torch.randn(2, 3, 5, 5)),
    "ConvTranspose3d": (lambda: nn.ConvTranspose3d(2, 3, 2), lambda: torch.randn(2, 2, 3, 3, 3)),
    "Embedding": (lambda: nn.Embedding(11, 5, padding_idx=0), lambda: torch.randint(0, 11, (4, 7))),
    "Bilinear": (lambda: nn.Bilinear(4, 3, 5), lambda: (torch.randn(6, 4), torch.randn(6, 3))),
    "MultiheadAttention": (lambda: nn.MultiheadAttention(8, 2, batch_first=True), lambda: torch.randn(2, 5, 8)),
    "MultiheadAttention-kdim": (
        lambda: nn.MultiheadAttention(8, 2, kdim=6, vdim=4, batch_first=True),
        lambda: (torch.randn(2, 5, 8), torch.randn(2, 3, 6), torch.randn(2, 3, 4)),
    ),
}


def build(name, seed=0):
    torch.manual_seed(seed)
    make_layer, make_input = LAYERS[name]
    call = None
    if name == "Bilinear":
        call = lambda layer, x: layer(*x)  # noqa: E731
    elif name == "MultiheadAttention":
        call = lambda layer, x: layer(x, x, x)  # noqa: E731
    elif name == "MultiheadAttention-kdim":
        call = lambda layer, x: layer(*x)  # noqa: E731
    return Seq(make_layer, make_input, call), make_input()


def train_a_little(model, x, steps=3):
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        model(x).float().pow(2).mean().backward()
        opt.step()


@pytest.mark.parametrize("form", ["copies", "decoupled"])
@pytest.mark.parametrize("scheme", sorted(SCHEMES))
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_collapse_is_exact_and_keeps_keys(name, scheme, form):
    model, x = build(name)
    plain = copy.deepcopy(model)
    shapes = {k: v.shape for k, v in plain.state_dict().items()}
    n_params = sum(p.numel() for p in plain.parameters())
    apply_majority_kernels(model, k=3, scheme=scheme, biases=True, form=form)
    assert kernel_copies(model), "no kernel was given copies"
    train_a_little(model, x)
    model.eval()
    with torch.no_grad():
        expected = model(x)

    small = collapsed_state_dict(model)
    assert {k: v.shape for k, v in small.items()} == shapes
    fresh, _ = build(name, seed=1)
    fresh.load_state_dict(small, strict=True)
    fresh.eval()
    with torch.no_grad():
        assert (fresh(x) - expected).abs().max() <= 1e-5

    collapse(model)
    assert type(model.layer) is type(plain.layer)
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes
    assert sum(p.numel() for p in model.parameters()) == n_params
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))


def test_train_mode_samples_and_eval_mode_is_the_mean():
    model, x = build("Linear")
    apply_majority_kernels(model, k=4, scheme="convex", init="independent")
    copies = kernel_copies(model)["layer.weight"]
    model.train()
    a, b = model.layer.weight, model.layer.weight
    assert torch.equal(a, b), "one step must see one draw (ties, recomputation)"
    model(x)  # a training forward advances the draw
    assert not torch.equal(model.layer.weight, a)
    model.eval()
    assert torch.equal(model.layer.weight, copies.mean(0))


def randoms(n, key=1):
    """The random sources of n consecutive steps of one kernel."""
    for step in range(n):
        yield Random(key, Random.state_of(torch.tensor(step)))


def test_random_numbers_are_uniform_and_independent_across_steps_calls_and_keys():
    def random(key, step):
        return Random(key, Random.state_of(torch.tensor(step)))

    counts = torch.bincount(random(3, 5).integers(8, (80000,), torch.device("cpu")), minlength=8)
    chi2 = ((counts - 10000.0) ** 2 / 10000.0).sum().item()
    assert chi2 < 24.3, f"chi-square {chi2:.1f} with 7 degrees of freedom (p = 0.001 at 24.3)"
    n, cpu = 40000, torch.device("cpu")
    u = []
    for key in range(3):
        for step in range(3):
            source = random(key, step)
            u += [source.uniform((n,), cpu) for _ in range(2)]
    assert all(0 < x.min() and x.max() < 1 and abs(x.mean() - 0.5) < 0.01 for x in u)
    corr = torch.corrcoef(torch.stack(u)) - torch.eye(len(u))
    assert corr.abs().max() < 5 / n**0.5, "steps, keys and successive calls draw unrelated numbers"
    assert torch.equal(random(2, 1).uniform((n,), cpu), u[-4]), "a step's first call repeats exactly"


def chi2_limit(dof, z=3.09):
    """The chi-square value exceeded with probability 0.001 (Wilson-Hilferty; z: the normal 0.999 quantile)."""
    return dof * (1 - 2 / (9 * dof) + z * (2 / (9 * dof)) ** 0.5) ** 3


def assert_uniform(values, cells, what):
    counts = torch.bincount(values.long(), minlength=cells).double()
    assert counts.numel() == cells, f"{what}: values outside [0, {cells})"
    expected = values.numel() / cells
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < chi2_limit(cells - 1), f"{what}: chi-square {chi2:.1f} with {cells - 1} degrees of freedom"


@pytest.mark.parametrize("k", [2, 3, 4, 8])
def test_integers_are_uniform_and_independent_across_elements_steps_kernels_and_seeds(k):
    """The draw of ``select`` (and ``majority``): for k a power of two one hash gives 32 // log2(k) neighbouring
    elements, so pairs inside a hash and across hashes are tested as well as the marginals."""
    n, cpu = 48000, torch.device("cpu")
    draws = {(key, step): Random(key, Random.state_of(torch.tensor(step))).integers(k, (n,), cpu) for key in (3, 4) for step in (5, 6)}
    x = draws[3, 5]
    assert x.dtype == torch.int64 and x.shape == (n,)
    assert_uniform(x, k, "marginal")
    for lag in (1, 2, 15, 16, 17, 31):  # within one hash (1, 2, 15), across hashes (16 at k = 4, 17, 31)
        assert_uniform(x[:-lag] * k + x[lag:], k * k, f"elements {lag} apart")
    assert_uniform(x * k + draws[3, 6], k * k, "neighbouring steps")
    assert_uniform(x * k + draws[4, 5], k * k, "two kernels")
    seeds = [Random(apply_key(seed), Random.state_of(torch.tensor(5))).integers(k, (n,), cpu) for seed in (0, 1)]
    assert_uniform(seeds[0] * k + seeds[1], k * k, "two seeds")
    assert torch.equal(Random(3, Random.state_of(torch.tensor(5))).integers(k, (n,), cpu), x), "a step repeats exactly"
    assert torch.equal(Random(3, Random.state_of(torch.tensor(5))).integers(k, (7, 11), cpu).flatten(), x[:77])


def apply_key(seed):
    """The draw key of a model's first kernel under ``seed``."""
    layer = nn.Linear(3, 2)
    apply_majority_kernels(layer, k=2, seed=seed)
    return layer.parametrizations.weight[0].key


@pytest.mark.parametrize("k", [2, 3, 4, 8])
def test_batched_draws_are_the_draws_made_alone(k):
    """Each step the small requests of a model are hashed together: every scheme's draws stay those of each
    kernel drawn by itself, for small, large (unbatched) and tied kernels, step after step."""
    from lightning_mk.schemes import Batch, _numbers

    class Alone(Batch):
        def numbers(self, constant, count, width, state, device):
            return _numbers(constant, count, width, state, device)

    for scheme in sorted(SCHEMES):
        models = []
        for batch in (True, False):
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 300), nn.Linear(300, 300), nn.Linear(300, 16), nn.Linear(16, 8))
            model[4].weight = model[0].weight  # tied: two layers hold one kernel (only read here, never applied)
            handle = apply_majority_kernels(model, k=k, scheme=scheme, init="independent", seed=3, step_on_forward=False)
            if not batch:
                model[0].parametrizations.weight[0].draws.batch = Alone()
            models.append((model.train(), handle))
        for step in range(1, 5):
            weights = []
            for model, handle in models:
                handle.step = step
                weights.append([layer.weight for layer in model] + [model[0].weight])  # read twice: one draw
            for batched, alone in zip(*weights):
                assert torch.equal(batched, alone), (scheme, step)
            assert torch.equal(weights[0][0], weights[0][4]) and torch.equal(weights[0][0], weights[0][-1])


def test_a_steps_small_requests_come_from_one_batch_and_large_ones_alone():
    from lightning_mk.schemes import Batch

    batch, cpu, large = Batch(), torch.device("cpu"), 16 * (Batch.LARGEST + 1)
    for step in (1, 2):  # the first step's requests are planned for the second
        state = Random.state_of(torch.tensor(step))
        batch.advance()
        got = [Random(key, state, batch).integers(4, (n,), cpu) for key, n in ((1, 1000), (2, 77), (3, large))]
        got.append(Random(4, state, batch).bits((10,), cpu))
        for key, n, numbers in zip((1, 2, 3), (1000, 77, large), got):
            assert torch.equal(numbers, Random(key, state).integers(4, (n,), cpu))
        assert torch.equal(got[3], Random(4, state).bits((10,), cpu))
    storage = [numbers.untyped_storage().data_ptr() for numbers in got]
    assert storage[0] == storage[1] != storage[2], "the small requests of one width share one tensor, a large one not"


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
@pytest.mark.parametrize("k", [2, 3, 4, 8])
def test_scheme_is_unbiased(scheme, k):
    """Monte Carlo: the average sampled kernel converges to the mean of the copies."""
    torch.manual_seed(0)
    copies = torch.randn(k, 3, 5, dtype=torch.float64)
    n = 20000
    draws = torch.stack([get_scheme(scheme).combine(copies, random) for random in randoms(n)])
    mean = copies.mean(0)
    sem = draws.std(0) / n**0.5
    assert ((draws.mean(0) - mean).abs() <= 5 * sem + 1e-12).all()
    # the advertised second moment, E[sum a_i^2], is what a draw of one-hot copies gives
    eye = torch.eye(k, dtype=torch.float64).view(k, k, 1)
    coeffs = torch.stack([get_scheme(scheme).combine(eye.expand(k, k, 200), random) for random in randoms(200, key=9)])
    second = coeffs.pow(2).sum(1).mean().item()
    assert second == pytest.approx(get_scheme(scheme).second_moment(k), rel=0.05)


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_gradients_reach_every_copy(scheme):
    model, x = build("Conv2d")
    apply_majority_kernels(model, k=4, scheme=scheme, init="independent")
    model.train()
    model(x).pow(2).mean().backward()
    grad = kernel_copies(model)["layer.weight"].grad
    assert grad is not None
    assert (grad.flatten(1).abs().sum(1) > 0).all()


def test_grad_scale_multiplies_the_copies_gradients():
    grads = {}
    for grad_scale in ("none", "k", "matched", 2.5):
        model, x = build("Linear")
        apply_majority_kernels(model, k=4, scheme="layer", grad_scale=grad_scale, seed=3)
        model(x).pow(2).mean().backward()
        grads[grad_scale] = kernel_copies(model)["layer.weight"].grad
    torch.testing.assert_close(grads["k"], 4 * grads["none"])
    torch.testing.assert_close(grads["matched"], 2.5 * grads["none"])  # (k + 1) / 2 for `layer`
    torch.testing.assert_close(grads[2.5], 2.5 * grads["none"])


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(13, 6)
        self.mix = nn.Linear(6, 6)
        self.head = nn.Linear(6, 13, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.mix(self.embed(tokens))))


@pytest.mark.parametrize("form", ["copies", "decoupled"])
@pytest.mark.parametrize("init", ["replicate", "independent"])
def test_tied_weights_stay_tied(init, form):
    torch.manual_seed(0)
    model = TiedLM()
    n_params = sum(p.numel() for p in model.parameters())
    keys = set(model.state_dict())
    x = torch.randint(0, 13, (4, 5))
    apply_majority_kernels(model, k=3, init=init, form=form)
    copies = kernel_copies(model)
    assert sorted(copies) == ["embed.weight", "mix.weight"]  # one set for the tied pair
    assert model.embed.parametrizations.weight.original is model.head.parametrizations.weight.original
    model.train()
    assert torch.equal(model.embed.weight, model.head.weight), "tied layers must share each draw"
    train_a_little(model, x)
    model.eval()
    with torch.no_grad():
        expected = model(x)
    small = collapsed_state_dict(model)
    assert set(small) == keys
    assert small["embed.weight"] is small["head.weight"], "a tied tensor is collapsed once"
    collapse(model)
    assert model.head.weight is model.embed.weight
    assert sum(p.numel() for p in model.parameters()) == n_params
    with torch.no_grad():
        assert torch.equal(model(x), expected)


def test_copy_spread_of_a_module_or_its_state_dict_counts_tied_copies_once():
    model = apply_majority_kernels(TiedLM(), k=2, step_on_forward=False).module
    copies = kernel_copies(model)
    with torch.no_grad():
        copies["embed.weight"][0] = 1.0
        copies["embed.weight"][1] = 3.0  # mean 2, every copy 1 from it: relative RMS spread 1/2
        copies["mix.weight"][1] = copies["mix.weight"][0]
    assert copy_spread(model) == {"embed.weight": pytest.approx(0.5), "mix.weight": 0.0}
    assert copy_spread(model.state_dict()) == copy_spread(model)


def test_tied_weight_with_one_user_excluded_is_an_error():
    with pytest.raises(ValueError, match="head.weight is tied to embed.weight"):
        apply_majority_kernels(TiedLM(), k=2, exclude=["head"])


def test_replicate_keeps_the_function_and_independent_redraws():
    model, x = build("Linear")
    plain = copy.deepcopy(model).eval()
    apply_majority_kernels(model, k=4, init="replicate", init_noise=0.1).module.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x))
    copies = kernel_copies(model)["layer.weight"]
    assert not torch.equal(copies[0], copies[1]), "init_noise must make the copies differ"

    model, _ = build("Linear")
    apply_majority_kernels(model, k=4, init="independent", seed=5)
    copies = kernel_copies(model)["layer.weight"]
    assert all(not torch.equal(copies[0], copies[i]) for i in range(1, 4))
    bound = 1 / 6**0.5  # nn.Linear's own init: U(-1/sqrt(in), 1/sqrt(in))
    assert copies.abs().max() <= bound
    again, _ = build("Linear")
    apply_majority_kernels(again, k=4, init="independent", seed=5)
    assert torch.equal(kernel_copies(again)["layer.weight"], copies), "independent init is seeded"


def test_include_exclude_and_layer_types_choose_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.Flatten(), nn.Linear(4 * 6, 8), nn.ReLU(), nn.Linear(8, 3))
    apply_majority_kernels(model, k=2, exclude=["4"])
    assert sorted(kernel_copies(model)) == ["0.weight", "2.weight"]
    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.Flatten(), nn.Linear(4 * 6, 8))
    apply_majority_kernels(model, k=2, layer_types=["Conv1d"])
    assert sorted(kernel_copies(model)) == ["0.weight"]
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    model[0].weight.requires_grad_(False)
    apply_majority_kernels(model, k=2)
    assert sorted(kernel_copies(model)) == ["1.weight"], "frozen kernels are left alone"


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_noise_level_scales_the_draws_deviation_from_the_mean(scheme):
    model, _ = build("Linear")
    draws = apply_majority_kernels(model, k=4, scheme=scheme, init="independent", step_on_forward=False).draws
    mean = kernel_copies(model)["layer.weight"].mean(0)
    model.train()
    draws.step = 5
    full = model.layer.weight
    draws.noise = 0.25
    torch.testing.assert_close(model.layer.weight, mean + 0.25 * (full - mean))
    draws.noise = 0.0
    torch.testing.assert_close(model.layer.weight, mean, rtol=0, atol=0)


def test_the_draw_state_is_the_steps_hash_however_the_step_is_set():
    """The state is hashed on the host (one fill per step); it is the tensor hash of the step, which compiled graphs
    and earlier versions' draws used, for any step (negative ones and ones past 32 bits too)."""
    model, x = build("Linear")
    handle = apply_majority_kernels(model, k=4)
    for step in (0, 1, 7, 2**32 + 3, -5):
        handle.step = step
        assert handle.step == step
        assert int(handle.draws.state) == int(Random.state_of(torch.tensor(step))) == Random.state_of(step)
    model.train()
    model(x)  # the draw-step hook: one step on
    assert handle.step == -4 and int(handle.draws.state) == Random.state_of(-4)


def test_rank_gives_each_process_its_own_draws():
    sampled = {}
    for rank in (None, 0, 1):
        model, _ = build("Linear")
        apply_majority_kernels(model, k=4, init="independent", rank=rank)
        model.train()
        sampled[rank] = model.layer.weight
    assert not torch.equal(sampled[0], sampled[1])
    assert not torch.equal(sampled[None], sampled[0]), "rank None (shared draws) is its own stream"
    model, _ = build("Linear")
    apply_majority_kernels(model, k=4, init="independent", rank=1)
    model.train()
    assert torch.equal(model.layer.weight, sampled[1]), "the same rank draws the same coefficients"


def test_raw_pytorch_draws_once_per_training_forward_and_collapse_removes_the_hook():
    model, x = build("Linear")
    kernels = apply_majority_kernels(model, k=4, scheme="select")
    model.train()
    model(x)
    model(x)
    assert kernels.step == 2
    model.eval()
    model(x)
    assert kernels.step == 2
    assert kernels.collapse() is model
    assert not model._forward_pre_hooks


def test_user_scheme_via_registry():
    class First(Scheme):
        def combine(self, copies, random):
            return copies.mean(0)

        def second_moment(self, k):
            return 1.0 / k

    from lightning_mk import register_scheme
    from lightning_mk.schemes import SCHEMES as registry

    register_scheme("mean-only", First())
    try:
        model, x = build("Linear")
        apply_majority_kernels(model, k=2, scheme="mean-only", grad_scale="matched")
        assert model.layer.parametrizations.weight[0].grad_scale == 2.0
        with pytest.raises(ValueError, match="already registered"):
            register_scheme("mean-only", First())
    finally:
        registry.pop("mean-only")


def test_loading_a_state_with_other_k_or_scheme_names_both():
    model, _ = build("Linear")
    apply_majority_kernels(model, k=3, scheme="select")
    other, _ = build("Linear")
    apply_majority_kernels(other, k=2, scheme="convex")
    with pytest.raises(ValueError, match=r"k=3, scheme='select'.*k=2, scheme='convex'"):
        other.load_state_dict(model.state_dict())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(k=1), "k must be an integer >= 2"),
        (dict(k=2.5), "k must be an integer >= 2"),
        (dict(k=True), "k must be an integer >= 2"),
        (dict(k="4"), "k must be an integer >= 2"),
        (dict(scheme="dirichlet"), r"unknown scheme 'dirichlet'; valid schemes: \['convex', 'layer', 'majority', 'select'\]"),
        (dict(init="zeros"), r"unknown init 'zeros'; valid inits: \['replicate', 'independent'\]"),
        (dict(form="mean"), r"unknown form 'mean'; valid forms: \['copies', 'decoupled', 'relative', 'doconv', 'expand'\]"),
        (dict(grad_scale="auto"), r"unknown grad_scale 'auto'; valid: \['none', 'k', 'matched'\]"),
        (dict(grad_scale=-1.0), "grad_scale must be"),
        (dict(init_noise=-0.1), "init_noise must be a number >= 0"),
        (dict(noise=-0.5), "noise must be a number >= 0"),
        (dict(noise=float("nan")), "noise must be a number >= 0"),
        (dict(include=["encoder.*"]), r"include pattern 'encoder.\*' matches no eligible layer; eligible layers: \['0', '2'\]"),
        (dict(exclude=["head"]), r"exclude pattern 'head' matches no eligible layer; eligible layers: \['0', '2'\]"),
        (dict(exclude=["*"]), "leave no layer"),
        (dict(layer_types=["LayerNorm"]), "unknown layer type 'LayerNorm'; registered layer types: "),
    ],
)
def test_bad_options_are_rejected(kwargs, message):
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=message):
        apply_majority_kernels(model, **kwargs)
    assert not kernel_copies(model), "a rejected call must leave the model untouched"


def test_no_eligible_layer_and_applying_twice_are_errors():
    with pytest.raises(ValueError, match="has no layer with a trainable kernel of a supported type"):
        apply_majority_kernels(nn.Sequential(nn.ReLU(), nn.LayerNorm(3)))
    model = apply_majority_kernels(nn.Linear(3, 3), k=2).module
    with pytest.raises(ValueError, match="already has majority kernels"):
        apply_majority_kernels(model, k=2)
    with pytest.raises(ValueError, match="lazy and not yet initialised"):
        apply_majority_kernels(nn.Sequential(nn.LazyLinear(3)))


def test_initialisation_is_the_same_in_another_process():
    """Ranks and reruns must agree: a seed derived from a salted str hash would differ per process."""
    import subprocess
    import sys

    code = (
        "import torch; from torch import nn; from lightning_mk import apply_majority_kernels, kernel_copies; "
        "torch.manual_seed(0); m = apply_majority_kernels(nn.Linear(4, 3), k=3, init='independent', init_noise=0.1, seed=5).module; "
        "print(float(kernel_copies(m)['weight'].double().sum()))"
    )
    sums = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout for _ in range(2)}
    assert len(sums) == 1, sums


def _resumable_run(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    return apply_majority_kernels(net, k=3, scheme="convex", init="independent", seed=4)


def _train_raw(kernels, optimizer, batches):
    kernels.module.train()
    for x, y in batches:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(kernels.module(x), y).backward()
        optimizer.step()


def test_raw_training_resumes_bit_for_bit_from_module_handle_and_optimizer_state(tmp_path):
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(6)]
    straight = _resumable_run()
    straight.draws.noise = 0.5
    _train_raw(straight, torch.optim.Adam(straight.module.parameters(), lr=0.01), batches)

    first = _resumable_run()
    first.draws.noise = 0.5
    optimizer = torch.optim.Adam(first.module.parameters(), lr=0.01)
    _train_raw(first, optimizer, batches[:3])
    checkpoint = {"module": first.module.state_dict(), "mk": first.state_dict(), "optimizer": optimizer.state_dict()}
    torch.save(checkpoint, tmp_path / "ckpt.pt")

    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    expected = {"k": 3, "scheme": "convex", "init": "independent", "form": "copies", "seed": 4, "rank": None}
    assert saved["mk"] == expected | {"step": 3, "noise": 0.5}
    ends = {}
    for restore_handle in (True, False):
        resumed = _resumable_run(seed=1)  # other initial weights: everything must come from the files
        optimizer = torch.optim.Adam(resumed.module.parameters(), lr=0.01)
        resumed.module.load_state_dict(saved["module"])
        optimizer.load_state_dict(saved["optimizer"])
        if restore_handle:
            resumed.load_state_dict(saved["mk"])
        _train_raw(resumed, optimizer, batches[3:])
        ends[restore_handle] = resumed.module.state_dict()
    assert resumed.step == 3 and first.step == 3 and straight.step == 6
    for key, value in straight.module.state_dict().items():
        assert torch.equal(ends[True][key], value), key
    differs = [key for key, value in straight.module.state_dict().items() if not torch.equal(ends[False][key], value)]
    assert differs, "without the handle's state the draws restart at step 1: the run must end elsewhere"


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(seed=5), r"the state being loaded has seed=4, but this model has seed=5; use the same seed to resume"),
        (dict(init="replicate"), r"has init='independent', but this model has init='replicate'; use the same init"),
        (dict(k=2), r"has k=3, but this model has k=2"),
    ],
)
def test_loading_handle_state_with_other_settings_names_both_values(change, message):
    saved = _resumable_run()
    saved.step = 7
    options = dict(k=3, scheme="convex", init="independent", seed=4) | change
    other = apply_majority_kernels(nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)), **options)
    with pytest.raises(ValueError, match=message):
        other.load_state_dict(saved.state_dict())
    assert other.step == 0, "a refused state leaves the draw position as it was"
    with pytest.raises(ValueError, match=r"lacks \['noise'\]"):
        saved.load_state_dict({key: value for key, value in saved.state_dict().items() if key != "noise"})


@pytest.mark.parametrize("fused", [False, True])
def test_eval_mean_is_computed_once_per_change_of_the_copies(fused):
    model, x = build("Linear")
    apply_majority_kernels(model, k=4, init="independent")
    copies = kernel_copies(model)["layer.weight"]
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1, fused=fused)
    model.eval()
    with torch.no_grad():
        first = model.layer.weight
        assert model.layer.weight is first, "no-grad eval reuses the mean"
    with torch.enable_grad():
        assert model.layer.weight is not first, "with autograd the mean is a fresh graph node"
    model.train()
    model(x).pow(2).mean().backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.layer.weight, copies.mean(0))  # the optimizer step is seen
        assert not torch.equal(model.layer.weight, first)
        copies.mul_(2)  # any in-place change of the copies is seen too
        torch.testing.assert_close(model.layer.weight, copies.mean(0))


@pytest.mark.parametrize("form", ["copies", "decoupled"])
@pytest.mark.parametrize("scheme", ["select", "layer"])
def test_noise_scales_the_draws_deviation_from_the_eval_kernel(form, scheme):
    kernels = {}
    for noise in (1.0, 0.3, 0.0):
        model, x = build("Linear")
        handle = apply_majority_kernels(model, k=4, scheme=scheme, form=form, init="independent", noise=noise, seed=2)
        assert handle.state_dict()["noise"] == noise
        model.eval()
        deployed = model.layer.weight.detach().clone()
        model.train()
        model(x)  # step 1's draw
        kernels[noise] = model.layer.weight.detach() - deployed
    torch.testing.assert_close(kernels[0.3], 0.3 * kernels[1.0])
    assert torch.equal(kernels[0.0], torch.zeros_like(kernels[0.0])), "noise 0 trains the eval-mode kernel itself"


def test_collapsing_a_model_leaves_its_deep_copy_working():
    model, x = build("Linear")
    apply_majority_kernels(model, k=3, init="independent")
    twin = copy.deepcopy(model).eval()
    expected = twin(x)
    collapse(model)
    torch.testing.assert_close(twin(x), expected)
    torch.testing.assert_close(model.eval()(x), expected)
    collapse(twin)
    torch.testing.assert_close(twin(x), expected)


def test_draw_keys_mix_integers_explicitly_and_keep_earlier_draws():
    from lightning_mk.apply import _INIT_STEP, _NOISE_STEP
    from lightning_mk.parametrization import seed_of

    for ints in [(0, 1), (5, 3, 2), (123456, 0), (7,), (2**40, 9, 1)]:  # draw keys: seed, kernel[, rank] >= 0
        assert seed_of(*ints) == hash(ints) & (2**63 - 1), "the draws of earlier versions are unchanged"
    assert hash(-1) == hash(-2) and seed_of(-1) != seed_of(-2), "no two integers share a lane"
    assert seed_of(0, _INIT_STEP, 0) != seed_of(0, _NOISE_STEP, 0)


def test_initial_copies_and_their_noise_come_from_independent_streams():
    layer = nn.Linear(64, 64)

    def copies(init_noise):
        model = apply_majority_kernels(copy.deepcopy(layer), k=4, init="independent", init_noise=init_noise, seed=3).module
        return kernel_copies(model)["weight"].detach()

    drawn = copies(0.0)
    noise = copies(1.0) - drawn  # centred over the copies
    centred = drawn - drawn.mean(0)
    correlation = torch.corrcoef(torch.stack([centred.flatten(), noise.flatten()]))[0, 1]
    assert abs(correlation) < 0.05, f"correlated streams: {correlation:.3f} (16384 pairs: independent ones give |r| < 0.03)"


@pytest.mark.parametrize("form", ["copies", "decoupled"])
def test_a_plain_state_loads_into_majority_kernels_as_equal_copies(form):
    torch.manual_seed(0)
    model, pretrained = TiedLM(), TiedLM()
    apply_majority_kernels(model, k=4, init="independent", form=form)
    model.load_state_dict(pretrained.state_dict(), strict=True)
    assert torch.equal(kernel_copies(model)["mix.weight"], pretrained.mix.weight.detach().expand(4, -1, -1))
    assert model.embed.parametrizations.weight.original is model.head.parametrizations.weight.original
    x = torch.randint(0, 13, (4, 5))
    model.eval()
    pretrained.eval()
    with torch.no_grad():
        assert torch.equal(model(x), pretrained(x)), "the eval-mode model is the loaded one"
    collapse(model)
    model.load_state_dict(pretrained.state_dict(), strict=True)  # plain again: an ordinary load


PINNED = {  # the first three elements of the kernel drawn at steps 1, 2 and 7 (k=3, init_noise=0.5, seed=11)
    "convex": [[0.012954, 0.067279, 0.240521], [-0.06933, 0.022135, 0.230672], [-0.187657, -0.216608, 0.240747]],
    "layer": [[-0.086077, -0.157715, 0.116448], [-0.044908, 0.032251, 0.171755], [-0.045549, 0.174395, 0.204274]],
    "majority": [[0.092191, 0.281414, 0.17105], [-0.217403, 0.240568, 0.17105], [0.125212, -0.221982, 0.277031]],
    "select": [[-0.184382, -0.262829, 0.257899], [0.434806, -0.181136, 0.257899], [-0.250424, 0.743964, 0.045938]],
}


PINNED_SPLIT = {  # the same at k=4: integers split from shared hashes
    "majority": [[-0.144381, -0.032207, 0.274478], [-0.144381, 0.151819, 0.238018], [-0.144381, 0.004228, 0.274478]],
    "select": [[0.433142, 0.49662, -0.023435], [0.433142, -0.055456, 0.085947], [0.433142, 0.387316, -0.023435]],
}


@pytest.mark.parametrize("form", ["copies", "decoupled"])
@pytest.mark.parametrize("scheme, k", [(scheme, 3) for scheme in sorted(PINNED)] + [(scheme, 4) for scheme in sorted(PINNED_SPLIT)])
def test_draws_are_pinned(scheme, k, form):
    """Refactoring must not move a draw: these values were taken from the library and must stay."""
    layer = nn.Linear(4, 3)
    with torch.no_grad():
        layer.weight.copy_(torch.arange(12.0).view(3, 4) / 10)
    kernels = apply_majority_kernels(layer, k=k, scheme=scheme, form=form, init_noise=0.5, seed=11)
    layer.train()
    for step, expected in zip((1, 2, 7), (PINNED if k == 3 else PINNED_SPLIT)[scheme]):
        kernels.step = step
        assert layer.weight.detach().flatten()[:3].tolist() == pytest.approx(expected, abs=1e-6), step


def test_independent_copies_per_rank_draws_and_noise_level_are_pinned():
    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    kernels = apply_majority_kernels(layer, k=3, init="independent", seed=11, rank=2, noise=0.5)
    copies = kernel_copies(layer)["weight"].detach().flatten()[:4].tolist()
    assert copies == pytest.approx([0.252871, -0.249766, -0.446993, -0.400891], abs=1e-6)
    layer.train()
    kernels.step = 5
    assert layer.weight.detach().flatten()[:3].tolist() == pytest.approx([-0.019129, -0.106477, 0.222646], abs=1e-6)


def test_a_new_form_is_one_class_and_one_register_form_call(tmp_path):
    """A toy form (copies stored doubled) works everywhere by name: raw API, callback, collapse, state."""
    from lightning_mk import FORMS, Form, MajorityKernelCallback, register_form

    class Doubled(Form):
        name = "doubled"

        def store(self, copies, weight, replicated, seed):
            return 2 * copies

        def rows(self, stored):
            return stored / 2

        def copies(self, stored):
            return stored / 2

    register_form(Doubled())
    try:
        torch.manual_seed(0)
        model, x = build("Linear")
        plain = copy.deepcopy(model)
        kernels = apply_majority_kernels(model, k=3, form="doubled", init_noise=0.2)
        assert kernel_copies(model)["layer.weight"].shape == (3, 5, 6)
        model.eval()
        with torch.no_grad():
            torch.testing.assert_close(model(x), plain(x), msg="the deployed kernel is the copies' mean")
        train_a_little(model, x)
        model.eval()
        with torch.no_grad():
            expected = model(x)
        small = kernels.collapsed_state_dict()
        plain.load_state_dict(small, strict=True)
        with torch.no_grad():
            torch.testing.assert_close(plain(x), expected, rtol=0, atol=1e-6)
        assert MajorityKernelCallback.published(k=2, form="doubled").settings.form == "doubled"
    finally:
        del FORMS["doubled"]
