"""The noise level that sets itself from the generalisation gap (NoiseOnGap, MajorityKernelCallback(monitor=...))."""

import math
import os

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_mk import MajorityKernelCallback, NoiseOnGap
from helpers import Generalising, GeneralisingWithNorms, TinyModule, loader, trainer


def test_the_level_rises_while_the_model_overfits_and_falls_while_it_does_not():
    control = NoiseOnGap(ceiling=0.5, step=0.25, ratio=0.5)
    # (train loss, validation loss): a gap (train below half of val) raises the level by 0.125, none lowers it
    steps = [(1.0, 1.0), (0.2, 1.0), (0.2, 1.0), (0.1, 1.0), (0.1, 1.0), (0.1, 1.0), (0.6, 1.0), (float("nan"), 1.0)]
    assert [control.update(*losses) for losses in steps] == [0, 0.125, 0.25, 0.375, 0.5, 0.5, 0.375, 0.25]
    again = NoiseOnGap(ceiling=0.5, step=0.25)
    again.load_state_dict(control.state_dict())
    assert again.state_dict() == control.state_dict() == {"level": 0.25, "updates": 8}


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(ceiling=0), "ceiling must be a number > 0"),
        (dict(ceiling=math.inf), "ceiling must be a number > 0"),
        (dict(step=0), r"step must be a number in \(0, 1\]"),
        (dict(ratio=1.5), r"ratio must be a number in \(0, 1\]"),
    ],
)
def test_bad_controller_options_say_what_is_allowed(options, message):
    with pytest.raises(ValueError, match=message):
        NoiseOnGap(**options)


def test_bad_monitor_is_refused_when_the_callback_is_made():
    with pytest.raises(ValueError, match="monitor names the logged validation loss"):
        MajorityKernelCallback(monitor="")


def _weights(model):
    return {key: value for key, value in model.state_dict().items() if isinstance(value, torch.Tensor)}


@pytest.mark.parametrize("form, module", [("decoupled", Generalising), ("relative", GeneralisingWithNorms)])
def test_while_the_metric_improves_training_is_plain_training(tmp_path, form, module):
    """Batch-norm statistics included: at zero noise they are not recomputed."""
    pl.seed_everything(0)
    plain = module()
    trainer(tmp_path, max_epochs=3).fit(plain, loader(), loader(seed=1))
    pl.seed_everything(0)
    model = module()
    cb = MajorityKernelCallback(k=4, form=form, monitor="score", save_path=tmp_path / "small.pt")
    trainer(tmp_path, max_epochs=3, callbacks=[cb]).fit(model, loader(), loader(seed=1))
    assert cb.control.level == 0 and cb.control.updates == 3
    small = torch.load(tmp_path / "small.pt", weights_only=True)
    for key, value in _weights(plain).items():
        torch.testing.assert_close(small[key], value, rtol=0, atol=1e-6)


def _fit(root, epochs, ckpt_path=None, init_seed=0):
    os.makedirs(root, exist_ok=True)
    pl.seed_everything(init_seed)
    model = TinyModule()
    cb = MajorityKernelCallback(k=3, form="relative", monitor="val_loss", seed=7, save_path=os.path.join(root, "small.pt"))
    cb.control = NoiseOnGap(step=0.5)  # moves fast, so the few epochs here see several levels
    ckpt = ModelCheckpoint(dirpath=root, filename="last")
    t = trainer(root, max_epochs=epochs, callbacks=[cb, ckpt], enable_checkpointing=True, limit_val_batches=1)
    # a validation loss far above the training loss: every validation raises the level
    model.validation_step = lambda batch, batch_idx: model.log("val_loss", 100.0)
    t.fit(model, loader(), loader(seed=1), ckpt_path=ckpt_path)
    return model, cb


def test_resume_restores_the_controller_and_is_exact(tmp_path):
    straight, cb = _fit(str(tmp_path / "a"), 4)
    assert cb.control.level == 0.3 and cb.control.updates == 4
    _fit(str(tmp_path / "b"), 2)
    resumed, cb_b = _fit(str(tmp_path / "b"), 4, ckpt_path=str(tmp_path / "b" / "last.ckpt"), init_seed=1)
    assert cb_b.control.state_dict() == cb.control.state_dict()
    state = _weights(straight)
    for key, value in _weights(resumed).items():
        assert torch.equal(value, state[key]), key


def test_a_monitor_that_is_never_logged_fails_naming_what_was(tmp_path):
    cb = MajorityKernelCallback(k=2, form="decoupled", monitor="val/loss", save_path=tmp_path / "small.pt")
    with pytest.raises(KeyError, match=r"monitor='val/loss'.*logged: \['train_loss', 'val_loss'\]"):
        trainer(tmp_path, max_epochs=1, callbacks=[cb]).fit(TinyModule(), loader(), loader(seed=1))


def test_the_default_finds_the_validation_loss_by_its_usual_names(tmp_path):
    cb = MajorityKernelCallback(k=2, save_path=tmp_path / "small.pt")
    assert (cb.monitor, cb.settings.form, cb.settings.noise, cb.settings.decay) == ("auto", "relative", 0.3, 5e-4)
    model = TinyModule()
    model.validation_step = lambda batch, batch_idx: model.log("val/loss", 100.0)  # overfits: the level rises
    trainer(tmp_path, max_epochs=2, callbacks=[cb], limit_val_batches=1).fit(model, loader(), loader(seed=1))
    assert cb.control.updates == 2 and cb.control.level == pytest.approx(0.06)


def test_without_a_validation_loss_the_default_trains_plain_and_says_so(tmp_path):
    cb = MajorityKernelCallback(k=2, save_path=tmp_path / "small.pt")
    model = TinyModule()
    model.validation_step = lambda batch, batch_idx: model.log("val_acc", 0.5)
    with pytest.warns(UserWarning, match=r"validation loss, which was not logged \(logged: .*'val_acc'.*noise level stays at 0"):
        trainer(tmp_path, max_epochs=2, callbacks=[cb]).fit(model, loader(), loader(seed=1))
    assert cb.control.level == 0 and cb.control.updates == 0


def test_published_is_the_method_as_published():
    cb = MajorityKernelCallback.published(k=3, scheme="layer")
    assert cb.control is None and cb.monitor is None
    assert (cb.settings.k, cb.settings.scheme, cb.settings.form, cb.settings.noise, cb.settings.decay) == (3, "layer", "copies", 1.0, 0.0)


@pytest.mark.parametrize("level", [0.0, 0.15, 0.3])
def test_decay_adds_to_mus_gradient_in_proportion_to_the_level(level):
    from torch import nn

    from lightning_mk import apply_majority_kernels

    grads = {}
    for decay in (0.0, 0.5):
        torch.manual_seed(0)
        layer = nn.Linear(5, 3)
        kernels = apply_majority_kernels(layer, k=4, form="relative", noise=0.3, decay=decay, step_on_forward=False)
        kernels.draws.noise = level
        kernels.step = 2
        layer(torch.randn(7, 5, generator=torch.Generator().manual_seed(1))).sum().backward()
        stored = layer.parametrizations.weight.original
        grads[decay] = stored.grad.clone()
    mu = stored.detach()[0]
    torch.testing.assert_close(grads[0.5][0] - grads[0.0][0], 0.5 * level / 0.3 * mu)
    assert torch.equal(grads[0.5][1:], grads[0.0][1:]), "the deviations are not decayed"
    if level == 0:
        assert torch.equal(grads[0.5], grads[0.0])


def test_decay_needs_a_noise_level_to_scale_with():
    from lightning_mk import Settings

    with pytest.raises(ValueError, match="decay must be a number >= 0"):
        Settings(decay=-1)
    with pytest.raises(ValueError, match="decay is scaled by the noise level relative to noise, which is 0"):
        Settings(decay=1e-4, noise=0)
