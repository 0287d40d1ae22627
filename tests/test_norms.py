"""Batch-norm statistics of the deployed model (NormStatistics, MajorityKernelCallback(norm_batches=...))."""

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from torch import nn

from lightning_mk import MajorityKernelCallback, Settings, apply_majority_kernels, collapsed_state_dict
from lightning_mk.norms import NormStatistics
from helpers import GeneralisingWithNorms, NormModule, loader, norm_net, trainer


def _statistics(model):
    return {key: value.clone() for key, value in model.state_dict().items() if "running" in key or "batches_tracked" in key}


def _expected(weights, inputs):
    """The statistics of the plain model with ``weights`` over ``inputs``: reset, then averaged in eval mode but
    for the batch norms (as ``torch.optim.swa_utils.update_bn``, without dropout)."""
    model = norm_net()
    model.load_state_dict(weights)
    model.eval()
    for norm in (model[1], model[5]):
        norm.reset_running_stats()
        norm.momentum = None
        norm.train()
    with torch.no_grad():
        for x in inputs:
            model(x)
    return _statistics(model)


def test_the_deployed_model_gets_the_statistics_of_its_own_kernels():
    torch.manual_seed(0)
    model = norm_net()
    kernels = apply_majority_kernels(model, Settings(k=4))  # draws at full noise: far from the deployed kernels
    norms = NormStatistics(model, batches=3)
    inputs = [torch.randn(16, 8) for _ in range(5)]
    model.train()
    for x in inputs:
        model(x).sum().backward()
    model.eval()
    model(inputs[0])  # evaluation is not recorded
    assert [module for module, _, _ in norms.inputs] == [model] * 3  # the outermost call only, the last three
    sampled = _statistics(model)

    assert norms.recalibrate()
    expected = _expected(kernels.collapsed_state_dict(), inputs[2:])
    got = _statistics(model)
    for key in ("1.running_mean", "1.running_var", "5.running_mean", "5.running_var"):
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(got[key], sampled[key], rtol=1e-3)  # the sampled kernels' were far off
    assert got["1.num_batches_tracked"] == 5 and model[1].momentum == 0.1  # the layers' own count and momentum
    assert not model.training and not model[1].training  # modes as they were
    model.train()
    norms.remove()
    model(inputs[0])
    assert not norms.inputs


def test_a_model_without_batch_norm_is_not_hooked():
    norms = NormStatistics(nn.Sequential(nn.Linear(8, 4), nn.LayerNorm(4)), batches=8)
    assert not norms.hooked and not norms.recalibrate()


def test_the_saved_model_has_the_statistics_of_its_last_training_batches(tmp_path):
    pl.seed_everything(0)
    model = NormModule()
    cb = MajorityKernelCallback(k=4, monitor=None, noise=0.3, norm_batches=3, save_path=tmp_path / "small.pt")
    trainer(tmp_path, max_epochs=2, callbacks=[cb]).fit(model, loader(), loader(seed=1))
    small = torch.load(tmp_path / "small.pt", weights_only=True)
    weights = {key.removeprefix("net."): value for key, value in small.items()}
    last = [x for x, _ in loader()][-3:]  # 4 batches an epoch, not shuffled
    expected = _expected(weights, last)
    for key in ("1.running_mean", "1.running_var", "5.running_mean", "5.running_var"):
        torch.testing.assert_close(weights[key], expected[key], rtol=1e-5, atol=1e-6)
    assert weights["1.num_batches_tracked"] == 8
    assert cb._norms is None  # hooks and kept inputs released with the fit


def test_with_ema_after_it_the_average_gets_its_own_statistics(tmp_path):
    """Even at zero noise: the averaging callback's statistics are an average of statistics."""
    pl.seed_everything(0)
    cb = MajorityKernelCallback(k=4, monitor="score", norm_batches=3, save_path=tmp_path / "small.pt")
    ema = EMAWeightAveraging(decay=0.5)
    trainer(tmp_path, max_epochs=2, callbacks=[cb, ema]).fit(GeneralisingWithNorms(), loader(), loader(seed=1))
    assert cb.control.level == 0
    small = {key.removeprefix("net."): value for key, value in torch.load(tmp_path / "small.pt", weights_only=True).items()}
    average = {key.removeprefix("net."): value for key, value in collapsed_state_dict(ema._average_model.module.state_dict()).items()}
    expected = _expected(average, [x for x, _ in loader()][-3:])
    for key, value in small.items():
        if "batches_tracked" not in key:  # the count of training batches, as without averaging
            torch.testing.assert_close(value, expected[key] if "running" in key else average[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("value", [-1, 2.5, True, "8"])
def test_bad_norm_batches_say_what_is_allowed(value):
    with pytest.raises(ValueError, match="norm_batches is the number of training forwards"):
        MajorityKernelCallback(norm_batches=value)


def test_published_keeps_the_statistics_training_left():
    assert MajorityKernelCallback.published().norm_batches == 0
