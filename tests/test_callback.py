"""MajorityKernelCallback in a real Trainer: save, load, eval metrics, resume, setup-time errors."""

import os
import types

import fsspec
import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch import strategies
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint
from torch import nn

from helpers import TinyModule, loader, trainer
import lightning_mk.callback as callback_module
from lightning_mk import MajorityKernelCallback, apply_majority_kernels, collapsed_state_dict, kernel_copies
from lightning_mk.atomic import write_atomically


def test_fit_saves_the_small_model_and_it_loads_into_the_users_class(tmp_path):
    pl.seed_everything(0)
    model = TinyModule()
    n_params = sum(p.numel() for p in model.parameters())
    path = tmp_path / "small.pt"
    cb = MajorityKernelCallback.published(k=4, save_path=path)
    t = trainer(tmp_path, max_epochs=2, callbacks=[cb])
    t.fit(model, loader(), loader(seed=1))
    assert kernel_copies(model)["net.0.weight"].shape == (4, 16, 8)
    logged_val_loss = t.callback_metrics["val_loss"]

    small = TinyModule()
    small.load_state_dict(torch.load(path, weights_only=True), strict=True)
    assert sum(p.numel() for p in small.parameters()) == n_params
    model.eval()
    x = torch.randn(32, 8)
    with torch.no_grad():
        assert (small(x) - model(x)).abs().max() <= 1e-5
    # validation during fit ran in eval mode, on the mean: it is the small model's metric
    (result,) = trainer(tmp_path).validate(small, loader(seed=1), verbose=False)
    assert result["val_loss"] == pytest.approx(logged_val_loss.item(), abs=1e-6)
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_default_save_path_is_in_each_fits_log_dir(tmp_path):
    cb = MajorityKernelCallback.published(k=2)
    for run in ("a", "b"):  # one callback, two trainers: each fit writes into its own log dir
        trainer(tmp_path / run, limit_train_batches=2, callbacks=[cb]).fit(TinyModule(), loader())
        assert cb.save_path is None and cb.small_model_path == os.path.join(str(tmp_path / run), "small_model.pt")
        TinyModule().load_state_dict(torch.load(cb.small_model_path, weights_only=True), strict=True)


def test_collapse_module_leaves_the_plain_model_for_test_and_checkpoint(tmp_path):
    model = TinyModule()
    cb = MajorityKernelCallback.published(k=3, save_path=tmp_path / "small.pt", collapse_module=True)
    t = trainer(tmp_path, limit_train_batches=2, limit_val_batches=1, callbacks=[cb])
    t.fit(model, loader(), loader(seed=1))
    assert not kernel_copies(model)
    assert type(model.net[0]) is nn.Linear
    t.validate(model, loader(seed=1), verbose=False)  # the same trainer keeps working on the plain model
    assert not kernel_copies(model), "a later stage must not re-apply the kernels"
    t.save_checkpoint(tmp_path / "plain.ckpt", weights_only=True)
    state = torch.load(tmp_path / "plain.ckpt", weights_only=True)["state_dict"]
    TinyModule().load_state_dict(state, strict=True)


def test_preloaded_weights_are_kept_with_replicate(tmp_path):
    pretrained = TinyModule()
    model = TinyModule(lr=0.0)
    model.load_state_dict(pretrained.state_dict())
    cb = MajorityKernelCallback.published(k=3, init_noise=0.05, save_path=tmp_path / "small.pt")
    trainer(tmp_path, limit_train_batches=2, callbacks=[cb]).fit(model, loader())
    small = torch.load(tmp_path / "small.pt", weights_only=True)
    for key, value in pretrained.state_dict().items():
        torch.testing.assert_close(small[key], value, rtol=0, atol=1e-6)


class BuiltInConfigureModel(TinyModule):
    def __init__(self):
        super().__init__()
        del self.net
        self.net = None

    def configure_model(self):
        if self.net is None:
            self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def test_layers_built_in_configure_model_get_copies(tmp_path):
    model = BuiltInConfigureModel()
    cb = MajorityKernelCallback.published(k=2, save_path=tmp_path / "small.pt")
    trainer(tmp_path, limit_train_batches=2, callbacks=[cb]).fit(model, loader())
    assert sorted(kernel_copies(model)) == ["net.0.weight", "net.2.weight"]
    assert "configure_model" not in model.__dict__, "the callback calls the user's hook, it does not replace it"
    fresh = BuiltInConfigureModel()
    fresh.configure_model()
    fresh.load_state_dict(torch.load(tmp_path / "small.pt", weights_only=True), strict=True)


def _fit_epochs(root, epochs, scheme, ckpt_path=None, init_seed=0, form="copies"):
    os.makedirs(root, exist_ok=True)
    pl.seed_everything(init_seed)
    model = TinyModule()
    cb = MajorityKernelCallback.published(k=3, scheme=scheme, form=form, seed=7, save_path=os.path.join(root, "small.pt"))
    ckpt = ModelCheckpoint(dirpath=root, filename="last")
    t = trainer(root, max_epochs=epochs, callbacks=[cb, ckpt], enable_checkpointing=True)
    t.fit(model, loader(), ckpt_path=ckpt_path)
    return model


@pytest.mark.parametrize(
    "scheme, form",
    [(scheme, "copies") for scheme in ("select", "convex", "layer", "majority")] + [("select", "decoupled"), ("select", "relative")],
)
def test_resume_is_exact(tmp_path, scheme, form):
    straight = _fit_epochs(str(tmp_path / "a"), 2, scheme, form=form)
    _fit_epochs(str(tmp_path / "b"), 1, scheme, form=form)
    resumed = _fit_epochs(str(tmp_path / "b"), 2, scheme, ckpt_path=str(tmp_path / "b" / "last.ckpt"), init_seed=1, form=form)
    state = straight.state_dict()
    for key, value in resumed.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, state[key]), key
    small_a = torch.load(tmp_path / "a" / "small.pt", weights_only=True)
    small_b = torch.load(tmp_path / "b" / "small.pt", weights_only=True)
    assert all(torch.equal(small_a[k], small_b[k]) for k in small_a)


@pytest.mark.parametrize("change", [dict(k=2), dict(scheme="convex")])
def test_resume_with_another_k_or_scheme_names_both(tmp_path, change):
    root = str(tmp_path)
    _fit_epochs(root, 1, "select")
    options = dict(k=3, scheme="select", seed=7, save_path=tmp_path / "small.pt") | change
    model = TinyModule()
    t = trainer(root, max_epochs=2, callbacks=[MajorityKernelCallback.published(**options)])
    expected = "has k=3, but .* has k=2" if "k" in change else "has scheme='select', but .* has scheme='convex'"
    with pytest.raises(ValueError, match=expected):
        t.fit(model, loader(), ckpt_path=tmp_path / "last.ckpt")


@pytest.mark.parametrize(
    "change, expected",
    [
        (dict(seed=8), "the checkpoint being resumed has seed=7, but this MajorityKernelCallback has seed=8"),
        (dict(init="independent"), "has init='replicate', but this MajorityKernelCallback has init='independent'"),
        (dict(form="decoupled"), "form='copies', but this (model|MajorityKernelCallback) has .*form='decoupled'"),
    ],
)
def test_resume_with_another_seed_init_or_form_names_both(tmp_path, change, expected):
    root = str(tmp_path)
    _fit_epochs(root, 1, "select")
    options = dict(k=3, scheme="select", seed=7, save_path=tmp_path / "small.pt") | change
    model = TinyModule()
    t = trainer(root, max_epochs=2, callbacks=[MajorityKernelCallback.published(**options)])
    with pytest.raises(ValueError, match=expected):
        t.fit(model, loader(), ckpt_path=tmp_path / "last.ckpt")
    assert model.training_steps == 0


class FailsAtStep3(TinyModule):
    def training_step(self, batch, batch_idx):
        if self.training_steps == 3:
            raise RuntimeError("boom")
        return super().training_step(batch, batch_idx)


def test_with_ema_after_it_the_average_is_saved(tmp_path):
    pl.seed_everything(0)
    cb = MajorityKernelCallback(k=3, monitor=None, noise=0.5, save_path=tmp_path / "small.pt")
    ema = EMAWeightAveraging(decay=0.9)
    trainer(tmp_path, max_epochs=2, callbacks=[cb, ema]).fit(TinyModule(), loader(), loader(seed=1))
    average = collapsed_state_dict(ema._average_model.module.state_dict())
    small = torch.load(tmp_path / "small.pt", weights_only=True)
    assert small.keys() == TinyModule().state_dict().keys()
    for key, value in small.items():
        torch.testing.assert_close(value, average[key], rtol=0, atol=0)


def test_ema_before_it_is_refused_at_setup(tmp_path):
    t = trainer(tmp_path, callbacks=[EMAWeightAveraging(), MajorityKernelCallback(k=3)])
    with pytest.raises(ValueError, match="EMAWeightAveraging comes before MajorityKernelCallback"):
        t.fit(TinyModule(), loader())


def test_a_run_that_fails_midway_writes_nothing(tmp_path):
    path = tmp_path / "small.pt"
    with pytest.raises(RuntimeError, match="boom"):
        trainer(tmp_path, max_epochs=3, callbacks=[MajorityKernelCallback.published(k=2, save_path=path)]).fit(FailsAtStep3(), loader())
    assert os.listdir(tmp_path) == []


def test_a_failed_write_leaves_no_partial_file_and_keeps_the_old_one(tmp_path):
    path = tmp_path / "small.pt"
    path.write_bytes(b"previous model")
    with pytest.raises(Exception):
        write_atomically(path, lambda f: torch.save({"x": lambda: None}, f))  # a lambda cannot be pickled: fails mid-way
    assert os.listdir(tmp_path) == ["small.pt"]
    assert path.read_bytes() == b"previous model"


def test_save_path_can_be_an_fsspec_url(tmp_path):
    fs = fsspec.filesystem("memory")
    fs.makedirs("/mk-run", exist_ok=True)
    try:
        with pytest.raises(ValueError, match="save_path='memory://mk-run' is a directory; give a file path"):
            _fit_until_error(tmp_path, save_path="memory://mk-run")
        model = TinyModule()
        _fit_until_error(tmp_path, model, save_path="memory://mk-run/small.pt")
        with fsspec.open("memory://mk-run/small.pt", "rb") as f:
            small = torch.load(f, weights_only=True)
        plain = TinyModule()
        plain.load_state_dict(small, strict=True)
        model.eval()
        x = torch.randn(8, 8)
        with torch.no_grad():
            torch.testing.assert_close(plain(x), model(x))
        assert fs.ls("/mk-run", detail=False) == ["/mk-run/small.pt"], "one file, no temporary left behind"
        assert os.listdir(tmp_path) == []
    finally:
        fs.rm("/mk-run", recursive=True)


def test_a_failed_write_to_a_url_keeps_the_old_file():
    fs = fsspec.filesystem("memory")
    fs.pipe_file("/mk-atomic/small.pt", b"previous model")
    try:
        with pytest.raises(Exception):
            write_atomically("memory://mk-atomic/small.pt", lambda f: torch.save({"x": lambda: None}, f))
        assert fs.cat_file("/mk-atomic/small.pt") == b"previous model"
        assert fs.ls("/mk-atomic", detail=False) == ["/mk-atomic/small.pt"]
    finally:
        fs.rm("/mk-atomic", recursive=True)


def test_a_configure_model_that_rebuilds_its_layers_is_refused_before_training(tmp_path):
    class Rebuilds(BuiltInConfigureModel):
        def configure_model(self):  # not idempotent: Lightning calls it once per stage, the callback once more
            self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))

    model = Rebuilds()
    with pytest.raises(RuntimeError, match="configure_model built new layers.*make it idempotent"):
        trainer(tmp_path, callbacks=[MajorityKernelCallback.published(k=2, save_path=tmp_path / "small.pt")]).fit(model, loader())
    assert model.training_steps == 0


def _fit_until_error(tmp_path, model=None, **options):
    model = model or TinyModule()
    cb = MajorityKernelCallback.published(**({"k": 2, "save_path": tmp_path / "small.pt"} | options))
    trainer(tmp_path, max_epochs=1, callbacks=[cb]).fit(model, loader())
    return model


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(include=["encoder.*"]), r"include pattern 'encoder.\*' matches no eligible layer; eligible layers: \['net.0', 'net.2'\]"),
        (dict(exclude=["head"]), r"exclude pattern 'head' matches no eligible layer; eligible layers: \['net.0', 'net.2'\]"),
        (dict(save_path="/nonexistent-dir/small.pt"), "does not exist"),
        (dict(save_path="/proc/small.pt"), "cannot write to the directory"),
        (dict(save_path="memory://no-such-dir/small.pt"), "the directory of save_path='memory://no-such-dir/small.pt' does not exist"),
    ],
)
def test_bad_setup_fails_before_any_training_step(tmp_path, options, message):
    model = TinyModule()
    with pytest.raises(ValueError, match=message):
        _fit_until_error(tmp_path, model, **options)
    assert model.training_steps == 0


class NoKernels(TinyModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(8), nn.Flatten())
        self.bias = nn.Parameter(torch.zeros(8))

    def forward(self, x):
        return self.net(x + self.bias)[:, :3]


def test_a_model_without_eligible_layers_fails_at_setup(tmp_path):
    with pytest.raises(ValueError, match="NoKernels has no layer with a trainable kernel"):
        _fit_until_error(tmp_path, NoKernels())


def test_applying_twice_fails_at_setup(tmp_path):
    callbacks = [MajorityKernelCallback.published(k=2), MajorityKernelCallback.published(k=3)]
    with pytest.raises(RuntimeError, match="more than one stateful callback of type `MajorityKernelCallback`"):
        trainer(tmp_path, callbacks=callbacks)  # Lightning refuses it: one state_key per callback type
    model = apply_majority_kernels(TinyModule(), k=2).module
    with pytest.raises(ValueError, match="already has majority kernels"):
        _fit_until_error(tmp_path, model)
    assert model.training_steps == 0


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(k=1), "k must be an integer >= 2"),
        (dict(k=3.0), "k must be an integer >= 2"),
        (dict(scheme="nope"), r"valid schemes: \['convex', 'layer', 'majority', 'select'\]"),
        (dict(init="nope"), r"valid inits: \['replicate', 'independent'\]"),
        (dict(form="nope"), r"unknown form 'nope'; valid forms: \['copies', 'decoupled', 'relative', 'doconv', 'expand'\]"),
        (dict(grad_scale="nope"), "valid: \\['none', 'k', 'matched'\\]"),
    ],
)
def test_bad_arguments_fail_in_init(options, message):
    with pytest.raises(ValueError, match=message):
        MajorityKernelCallback.published(**options)


def test_anneal_noise_goes_linearly_from_full_noise_to_the_mean(tmp_path):
    class Probe(pl.Callback):
        def __init__(self, cb):
            self.cb, self.noise = cb, []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.noise.append(self.cb.kernels.draws.noise)

    cb = MajorityKernelCallback.published(k=2, anneal_noise=True, save_path=tmp_path / "small.pt")
    probe = Probe(cb)  # after the MK callback, so it sees this step's level
    trainer(tmp_path, max_epochs=2, callbacks=[cb, probe]).fit(TinyModule(), loader(n=64, batch_size=16))
    assert probe.noise == pytest.approx([1 - step / 8 for step in range(8)])  # 2 epochs x 4 batches


def test_anneal_noise_starts_from_the_noise_option(tmp_path):
    levels = []

    class Probe(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            levels.append(cb.kernels.draws.noise)

    cb = MajorityKernelCallback.published(k=2, noise=0.5, anneal_noise=True, save_path=tmp_path / "small.pt")
    trainer(tmp_path, max_epochs=1, callbacks=[cb, Probe()]).fit(TinyModule(), loader(n=64, batch_size=16))
    assert levels == pytest.approx([0.5 * (1 - step / 4) for step in range(4)])


def test_anneal_noise_needs_a_finite_run(tmp_path):
    model = TinyModule()
    with pytest.raises(ValueError, match="anneal_noise=True needs a finite training length"):
        trainer(tmp_path, max_epochs=-1, callbacks=[MajorityKernelCallback.published(k=2, anneal_noise=True)]).fit(model, loader())
    assert model.training_steps == 0


@pytest.mark.parametrize("name", ["biases", "anneal_noise", "per_rank_noise", "collapse_module", "log_spread"])
def test_flags_must_be_booleans(name):
    with pytest.raises(TypeError, match=f"{name} must be True or False, got 'yes'"):
        MajorityKernelCallback.published(**{name: "yes"})


def test_include_must_be_a_list():
    with pytest.raises(TypeError, match="list of glob patterns"):
        MajorityKernelCallback.published(exclude="head")


def test_unsupported_strategies_are_refused_at_setup():
    from lightning.pytorch.strategies import ModelParallelStrategy

    cb = MajorityKernelCallback.published(k=2)
    fake_trainer = types.SimpleNamespace(callbacks=[cb], strategy=ModelParallelStrategy())
    with pytest.raises(ValueError, match="single-device, DDP, FSDP and DeepSpeed strategies, not ModelParallelStrategy"):
        cb.setup(fake_trainer, TinyModule(), "fit")


@pytest.mark.parametrize("name", ["FSDPStrategy", "DeepSpeedStrategy"])
def test_collapse_module_is_refused_with_sharded_strategies(name):
    if name == "DeepSpeedStrategy":
        pytest.importorskip("deepspeed")  # DeepSpeedStrategy() refuses to be built without it
    strategy = getattr(strategies, name)()
    cb = MajorityKernelCallback.published(k=2, collapse_module=True)
    with pytest.raises(ValueError, match=f"collapse_module=True rewrites the module in place, which {name}"):
        cb.setup(types.SimpleNamespace(callbacks=[cb], strategy=strategy), TinyModule(), "fit")


def test_layers_wrapped_in_fsdp_by_configure_model_are_refused(tmp_path, monkeypatch):
    class Wrapped(nn.Module):  # stands in for FSDP, which needs a process group and a GPU to build
        pass

    class WrapsItself(TinyModule):
        def configure_model(self):
            self.net[0] = Wrapped()

    monkeypatch.setattr(callback_module, "FullyShardedDataParallel", Wrapped)
    with pytest.raises(ValueError, match="configure_model wrapped layers in FSDP itself.*auto_wrap_policy"):
        trainer(tmp_path, callbacks=[MajorityKernelCallback.published(k=2)]).fit(WrapsItself(), loader())


def test_spread_is_logged(tmp_path):
    model = TinyModule()
    cb = MajorityKernelCallback.published(k=2, init="independent", save_path=tmp_path / "small.pt")
    t = trainer(tmp_path, limit_train_batches=2, callbacks=[cb])
    t.fit(model, loader())
    assert {"mk/spread", "mk/spread/net.0.weight", "mk/spread/net.2.weight"} <= set(t.callback_metrics)
    assert t.callback_metrics["mk/spread"] > 0


def test_callback_state_holds_the_settings(tmp_path):
    cb = MajorityKernelCallback.published(k=2, scheme="layer", save_path=tmp_path / "small.pt")
    trainer(tmp_path, limit_train_batches=3, callbacks=[cb]).fit(TinyModule(), loader())
    assert cb.state_dict() == {"k": 2, "scheme": "layer", "init": "replicate", "form": "copies", "seed": 0}
    assert cb.kernels.step == 3, "one draw per optimizer step, the position from trainer.global_step"


def test_an_mk_checkpoint_can_be_validated_in_a_new_process(tmp_path):
    root = str(tmp_path)
    trained = _fit_epochs(root, 1, "select")
    trained.eval()
    expected = trainer(root).validate(trained, loader(seed=1), verbose=False)
    fresh = TinyModule()
    cb = MajorityKernelCallback.published(k=3, scheme="select")
    result = trainer(root, callbacks=[cb]).validate(fresh, loader(seed=1), ckpt_path=tmp_path / "last.ckpt", verbose=False)
    assert result == expected


def test_one_callback_serves_a_second_model_but_not_a_collapsed_one(tmp_path):
    cb = MajorityKernelCallback.published(k=2, save_path=tmp_path / "small.pt", collapse_module=True)
    first, second = TinyModule(), TinyModule()
    trainer(tmp_path, limit_train_batches=2, callbacks=[cb]).fit(first, loader())
    with pytest.raises(ValueError, match="collapsed by this MajorityKernelCallback"):
        trainer(tmp_path, limit_train_batches=2, callbacks=[cb]).fit(first, loader())
    trainer(tmp_path, limit_train_batches=2, callbacks=[cb]).fit(second, loader())
    assert second.training_steps == 2 and not kernel_copies(second)
