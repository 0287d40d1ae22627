"""form="doconv" (DO-Conv) and form="expand" (ExpandNets): deterministic re-parametrisations of the kernels on the
same machinery as the copies. Each starts as the user's model, folds exactly into it, trains every factor, and
resumes exactly."""

import copy
import math
import os

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch._dynamo.utils import counters

from helpers import ConvModule, loader, trainer
from lightning_mk import MajorityKernelCallback, apply_majority_kernels, collapse, collapsed_state_dict

LAYERS = {
    "conv1d": (lambda: nn.Conv1d(3, 4, 3, padding=1), (2, 3, 7)),
    "conv2d_grouped_rectangular": (lambda: nn.Conv2d(4, 6, (3, 2), groups=2), (2, 4, 5, 5)),
    "conv3d": (lambda: nn.Conv3d(2, 3, 2), (2, 2, 4, 4, 4)),
    "conv_transpose2d": (lambda: nn.ConvTranspose2d(3, 4, 3), (2, 3, 4, 4)),
}
EXPAND_ONLY = {  # kernels DO-Conv leaves plain
    "linear_narrowing": (lambda: nn.Linear(7, 3), (2, 7)),
    "linear_widening": (lambda: nn.Linear(3, 7), (2, 3)),
    "conv2d_1x1": (lambda: nn.Conv2d(3, 5, 1), (2, 3, 4, 4)),
}
CASES = [(form, name) for form in ("doconv", "expand") for name in sorted(LAYERS)] + [("expand", name) for name in sorted(EXPAND_ONLY)]


def _stored(layer: nn.Module) -> torch.Tensor:
    return layer.parametrizations.weight.original


def _layout(form: str, weight: torch.Tensor, k: int) -> tuple:
    out, n_in, *taps = weight.shape
    if form == "doconv":  # W, then D
        return (1, out + weight[0, 0].numel(), n_in, *taps)
    extra = -(-(out * out + n_in * n_in) // (out * math.prod(taps)))  # C's and A's blocks j, flattened
    return (k, out, k * n_in + extra, *taps)  # expand


@pytest.mark.parametrize("form, name", CASES)
def test_starts_as_the_model_and_folds_exactly_into_it(form, name):
    build, shape = (LAYERS | EXPAND_ONLY)[name]
    torch.manual_seed(0)
    layer, x = build(), torch.randn(shape)
    plain = copy.deepcopy(layer)
    apply_majority_kernels(layer, form=form, k=3)
    assert _stored(layer).shape == _layout(form, plain.weight, 3)
    if form == "doconv":
        torch.testing.assert_close(layer(x), plain(x), rtol=0, atol=0)  # D starts at zero: the user's model
    else:  # the factors' product is the kernel, to float rounding
        torch.testing.assert_close(layer(x), plain(x), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        _stored(layer).normal_()  # as if trained: every factor arbitrary (expand's padding too: it has no effect)
    layer.train()
    trained = layer(x)
    layer.eval()
    torch.testing.assert_close(layer(x), trained, rtol=0, atol=0)  # deterministic: training uses the fold too
    fresh = copy.deepcopy(plain)
    fresh.load_state_dict(collapsed_state_dict(layer), strict=True)
    torch.testing.assert_close(fresh(x), trained, rtol=1e-5, atol=1e-5)
    collapse(layer)
    assert type(layer.weight) is nn.Parameter and layer.weight.shape == plain.weight.shape
    torch.testing.assert_close(layer(x), trained, rtol=1e-5, atol=1e-5)


def test_the_fold_is_the_depthwise_product():
    """W'[:, i] = W[:, i] (I + D_i) per input channel i, written independently with a loop."""
    torch.manual_seed(1)
    layer = nn.Conv2d(3, 5, 3)
    apply_majority_kernels(layer, form="doconv")
    with torch.no_grad():
        _stored(layer).normal_()
    stored = _stored(layer)[0].detach()
    w, d = stored[:5].flatten(2), stored[5:].flatten(2)  # [out, in, 9], [9, in, 9]
    expected = torch.stack([w[:, i] @ (torch.eye(9) + d[:, i]) for i in range(3)], 1).view(5, 3, 3, 3)
    torch.testing.assert_close(collapsed_state_dict(layer)["weight"], expected, rtol=1e-5, atol=1e-6)


def test_only_kernels_with_several_taps_and_a_clear_error_without_any():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 1), nn.Flatten(), nn.Linear(4, 2))
    handle = apply_majority_kernels(net, form="doconv")
    assert handle.coverage.kernels == 1
    assert [name for name, p in net.named_parameters() if "original" in name] == ["0.parametrizations.weight.original"]
    with pytest.raises(ValueError, match=r"form='doconv' takes none of the chosen kernels \(0.weight, 1.weight\); it takes convolution kernels with more than one tap"):
        apply_majority_kernels(nn.Sequential(nn.Linear(3, 4), nn.Conv1d(4, 4, 1)), form="doconv")


def test_the_expanded_fold_is_the_product_of_three_layers():
    """A Linear 3 -> 5 at k = 2 is in -> 6 -> 10 -> out: C B A, with the factors read from the layout independently."""
    torch.manual_seed(4)
    layer, x = nn.Linear(3, 5, bias=False), torch.randn(6, 3)
    apply_majority_kernels(layer, form="expand", k=2)
    with torch.no_grad():
        _stored(layer).normal_()
    s = _stored(layer).detach()  # [2, 5, 6 + 7]: B's row blocks, then C's (25) and A's (9) blocks flattened
    assert s.shape == (2, 5, 13)
    extra = s[:, :, 6:].reshape(2, 35)
    b = torch.cat([s[j, :, :6] for j in range(2)])  # [10, 6]
    c = torch.cat([extra[j, :25].view(5, 5).T for j in range(2)], 1)  # [5, 10]
    a = torch.cat([extra[j, 25:34].view(3, 3) for j in range(2)])  # [6, 3]
    expanded = nn.Sequential(nn.Linear(3, 6, bias=False), nn.Linear(6, 10, bias=False), nn.Linear(10, 5, bias=False))
    for linear, factor in zip(expanded, (a, b, c)):
        linear.weight.data.copy_(factor)
    torch.testing.assert_close(layer(x), expanded(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(collapsed_state_dict(layer)["weight"], c @ b @ a, rtol=1e-5, atol=1e-5)
    layer(x).square().sum().backward()
    grad = _stored(layer).grad.reshape(2, -1)  # per slice: B (30), then C (25), A (9), padding (1)
    blocks = torch.ones_like(grad, dtype=torch.bool)
    blocks[:, -1] = False
    assert (grad[blocks] != 0).all() and (grad[~blocks] == 0).all(), "every factor trains, the padding never"


def test_expand_starts_from_pretrained_weights_with_random_full_rank_factors():
    """Loading a plain (pretrained) state refactorises it exactly; A and C differ between kernels and seeds (so
    the expanded units are not symmetric) and are the same for the same seed (every process the same)."""
    torch.manual_seed(5)
    pretrained = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    made = []
    for seed in (0, 0, 1):
        net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
        apply_majority_kernels(net, form="expand", k=2, seed=seed)
        net.load_state_dict(pretrained.state_dict())
        x = torch.randn(3, 4)
        torch.testing.assert_close(net(x), pretrained(x), rtol=1e-5, atol=1e-5)
        made.append([_stored(layer).detach().clone() for layer in net])
    (first, second), again, other = made[0], made[1], made[2]
    assert torch.equal(first, again[0]) and torch.equal(second, again[1])
    a_of = lambda s: s[:, :, 8:].reshape(2, -1)[:, 16:32].reshape(8, 4)  # noqa: E731  (after B's 8 columns and C)
    assert not torch.allclose(a_of(first), a_of(second)) and not torch.allclose(a_of(first), a_of(other[0]))
    assert torch.linalg.matrix_rank(a_of(first)) == 4 and torch.allclose(a_of(first).T @ a_of(first), torch.eye(4), atol=1e-5)


def test_expand_leaves_embeddings_plain_and_says_so_without_any_kernel():
    net = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
    handle = apply_majority_kernels(net, form="expand")
    assert [name for name, p in net.named_parameters() if "original" in name] == ["1.parametrizations.weight.original"]
    assert handle.coverage.kernels == 1
    with pytest.raises(ValueError, match=r"form='expand' takes none of the chosen kernels \(0.weight\); it takes kernels of Linear"):
        apply_majority_kernels(nn.Sequential(nn.Embedding(10, 4)), form="expand")


def test_both_factors_train_and_w_starts_with_the_plain_gradient():
    torch.manual_seed(2)
    layer, x = nn.Conv1d(2, 3, 3), torch.randn(4, 2, 9)
    plain = copy.deepcopy(layer)
    apply_majority_kernels(layer, form="doconv")
    layer(x).square().sum().backward()
    plain(x).square().sum().backward()
    grad = _stored(layer).grad[0]
    torch.testing.assert_close(grad[:3], plain.weight.grad)  # at D = 0, dL/dW = dL/dW'
    assert grad[3:].abs().sum() > 0, "D gets a gradient"


def _fit(form, root, epochs, ckpt_path=None, init_seed=0):
    os.makedirs(root, exist_ok=True)
    pl.seed_everything(init_seed)
    model = ConvModule()
    callback = MajorityKernelCallback(form=form, seed=7, save_path=os.path.join(root, "small.pt"))
    ckpt = ModelCheckpoint(dirpath=root, filename="last")
    trainer(root, max_epochs=epochs, callbacks=[callback, ckpt], enable_checkpointing=True).fit(model, loader(), loader(seed=1), ckpt_path=ckpt_path)
    return model, callback


@pytest.mark.parametrize("form", ["doconv", "expand"])
def test_callback_saves_the_users_model_and_resumes_exactly(tmp_path, form):
    straight, callback = _fit(form, str(tmp_path / "a"), 2)
    assert callback.control is None and callback.kernels.draws.noise == 0.3  # nothing drawn, nothing controlled
    _fit(form, str(tmp_path / "b"), 1)
    resumed, _ = _fit(form, str(tmp_path / "b"), 2, ckpt_path=str(tmp_path / "b" / "last.ckpt"), init_seed=1)
    state = straight.state_dict()
    for key, value in resumed.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, state[key]), key
    if form == "doconv":
        assert _stored(straight.net[0])[0, 4:].abs().sum() > 0, "D trained"
    else:
        assert _stored(straight.net[3]).shape == (4, 3, 4 * 32 + 345), "the Linear layer is expanded too (9 + 1024 in 345 columns)"
    small = torch.load(tmp_path / "a" / "small.pt", weights_only=True)
    user = ConvModule()
    user.load_state_dict(small, strict=True)
    x = torch.randn(5, 8)
    straight.eval()
    torch.testing.assert_close(user(x), straight(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form", ["doconv", "expand"])
def test_compiles_with_fullgraph_without_recompiling(form):
    torch.manual_seed(3)
    base = nn.Sequential(nn.Conv1d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv1d(4, 4, 3), nn.Flatten(), nn.Linear(24, 3))
    losses = []
    for compiled in (False, True):
        net = copy.deepcopy(base)
        apply_majority_kernels(net, form=form, step_on_forward=False)  # nothing to draw (as the callback applies it)
        torch._dynamo.reset()
        counters.clear()
        forward = torch.compile(net, fullgraph=True, backend="aot_eager") if compiled else net
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(0)
        run, graphs = [], []
        for _ in range(5):
            x, y = torch.randn(8, 1, 8, generator=g), torch.randint(0, 3, (8,), generator=g)
            loss = F.cross_entropy(forward(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            run.append(loss.item())
            graphs.append(counters["stats"]["unique_graphs"])
        assert not counters["graph_break"], dict(counters["graph_break"])
        if compiled:
            assert graphs[0] > 0 and graphs[-1] == graphs[0], f"recompiled: {graphs}"
        losses.append(run)
    assert losses[1] == pytest.approx(losses[0], abs=1e-5)
