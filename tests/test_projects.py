"""The callback in users' projects as they are written: the lightning-hydra-template's pattern, checkpoints read
without the callback, spawned workers, gradient accumulation, diverged runs, the coverage in the logger."""

import functools
import json
import os
import sys

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from helpers import TinyModule, loader, run_ranks, trainer
from lightning_mk import MajorityKernelCallback

HERE = os.path.dirname(__file__)
TEMPLATE = os.path.join(HERE, "template")
sys.path.insert(0, TEMPLATE)  # the template's own modules, as its scripts import them

from lit import DenseNet, LitModule, RandomData  # noqa: E402


def _hydra(script, *overrides, cwd=TEMPLATE):
    done = run_ranks([sys.executable, script, *overrides], timeout=300, cwd=cwd,
                     env=dict(os.environ, PYTHONPATH=os.pathsep.join([TEMPLATE, os.environ.get("PYTHONPATH", "")])))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_the_templates_train_multirun_and_eval_work_unchanged(tmp_path):
    """A callbacks YAML adds MK; the LightningModule receives ``net`` and calls ``save_hyperparameters()``; every
    checkpoint is written, the best one is tested with the callback and then by eval.py with no callback."""
    _hydra("train.py", "-m", "callbacks.majority_kernel.k=2,4", f"hydra.sweep.dir={tmp_path}")
    for job, k in (("0", 2), ("1", 4)):
        with open(tmp_path / job / "result.json") as f:
            trained = json.load(f)
        checkpoint = torch.load(trained["best"], weights_only=False)
        assert checkpoint["callbacks"]["MajorityKernelCallback"]["k"] == k
        assert isinstance(checkpoint["hyper_parameters"]["net"], DenseNet), "the plain network, pickled"
    _hydra("eval.py", f"ckpt_path={trained['best']}", f"hydra.run.dir={tmp_path / 'eval'}")  # the k=4 job's
    with open(tmp_path / "eval" / "result.json") as f:
        assert json.load(f)["test_acc"] == trained["test_acc"], "the deployed model, with or without the callback"


def _fit_template_module(root, max_epochs, form, ckpt_path=None):
    os.makedirs(root, exist_ok=True)
    torch.manual_seed(0)
    model = LitModule(DenseNet(), optimizer=functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9))
    checkpoints = ModelCheckpoint(dirpath=root, save_last=True)
    cb = MajorityKernelCallback.published(k=3, form=form, init_noise=0.1, save_path=os.path.join(root, "small.pt"))
    t = trainer(root, max_epochs=max_epochs, callbacks=[cb, checkpoints], enable_checkpointing=True)
    t.fit(model, RandomData(shuffle=False), ckpt_path=ckpt_path, weights_only=False)  # resumable batch order
    return model


@pytest.mark.parametrize("form", ["copies", "decoupled"])
def test_a_checkpoint_is_the_deployed_model_for_plain_code_and_resumes_exactly(tmp_path, form):
    root = str(tmp_path)
    straight = _fit_template_module(os.path.join(root, "a"), 2, form)
    trained = _fit_template_module(os.path.join(root, "b"), 1, form)
    last = os.path.join(root, "b", "last.ckpt")
    x = RandomData().splits[2][:][0]
    trained.eval()
    with torch.no_grad():
        expected = trained(x)

    plain = LitModule.load_from_checkpoint(last, weights_only=False)  # the user's class, no callback
    assert set(plain.state_dict()) == set(LitModule(DenseNet(), None).state_dict())
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(x), expected, rtol=0, atol=1e-5)

    resumed = _fit_template_module(os.path.join(root, "b"), 2, form, ckpt_path=last)
    state = straight.state_dict()
    for key, value in resumed.state_dict().items():
        assert torch.equal(value, state[key]), key


@pytest.mark.distributed
@pytest.mark.parametrize("collapse_module", [False, True])
def test_ddp_spawn_hands_the_trained_model_back_to_the_main_process(tmp_path, collapse_module):
    code = f"""
import torch
from helpers import TearDownTogether, TinyModule, loader, trainer
from lightning_mk import MajorityKernelCallback

if __name__ == "__main__":
    model = TinyModule()
    initial = {{key: value.clone() for key, value in model.state_dict().items()}}
    cb = MajorityKernelCallback.published(k=3, save_path={str(tmp_path / "small.pt")!r}, collapse_module={collapse_module})
    trainer({str(tmp_path)!r}, max_epochs=2, devices=2, strategy="ddp_spawn", callbacks=[cb, TearDownTogether()]).fit(model, loader())
    torch.save({{"initial": initial, "after": model.state_dict()}}, {str(tmp_path / "main.pt")!r})
"""
    script = tmp_path / "spawn.py"
    script.write_text(code)
    _hydra(str(script), cwd=HERE)  # a plain script; spawn re-imports its __main__
    main = torch.load(tmp_path / "main.pt", weights_only=True)
    worker = torch.load(tmp_path / "small.pt", weights_only=True)  # what the worker trained, collapsed
    assert set(main["after"]) == set(worker)
    for key, value in worker.items():
        assert torch.equal(main["after"][key], value), key
    assert not torch.equal(main["after"]["net.0.weight"], main["initial"]["net.0.weight"]), "trained"


def test_one_draw_per_optimizer_step_with_gradient_accumulation(tmp_path):
    class Recording(TinyModule):
        def training_step(self, batch, batch_idx):
            self.drawn.append(self.net[0].weight.detach().clone())
            return super().training_step(batch, batch_idx)

    runs = {}
    for accumulate, batch_size in ((2, 8), (1, 16)):
        torch.manual_seed(0)
        model = Recording()
        model.drawn = []
        cb = MajorityKernelCallback.published(k=4, init_noise=0.5, save_path=tmp_path / f"small{accumulate}.pt")
        options = dict(max_epochs=2, accumulate_grad_batches=accumulate, callbacks=[cb])
        trainer(tmp_path, **options).fit(model, loader(batch_size=batch_size))
        runs[accumulate] = model
    drawn = runs[2].drawn
    assert all(torch.equal(drawn[i], drawn[i + 1]) for i in range(0, len(drawn), 2)), "micro-batches share the draw"
    assert not any(torch.equal(drawn[i], drawn[i + 1]) for i in range(1, len(drawn) - 1, 2)), "each step draws anew"
    big = runs[1]
    for (key, value), other in zip(runs[2].state_dict().items(), big.state_dict().values()):
        torch.testing.assert_close(value, other, rtol=0, atol=1e-5, msg=f"{key}: accumulating equals the larger batch")


def test_a_diverged_run_keeps_the_previous_small_model(tmp_path):
    path = tmp_path / "small.pt"
    good = TinyModule().state_dict()
    torch.save(good, path)
    cb = MajorityKernelCallback.published(k=2, save_path=path)
    with pytest.warns(UserWarning, match=r"non-finite values in .*net\.0\.weight.*NOT saved.*small\.pt is left"):
        trainer(tmp_path, limit_train_batches=2, callbacks=[cb]).fit(TinyModule(lr=float("nan")), loader())
    kept = torch.load(path, weights_only=True)
    assert all(torch.equal(kept[key], value) for key, value in good.items())


def test_the_coverage_is_logged_with_the_runs_hyperparameters(tmp_path):
    logger = CSVLogger(tmp_path, name="run")
    cb = MajorityKernelCallback.published(k=2, save_path=tmp_path / "small.pt")
    trainer(tmp_path, limit_train_batches=2, logger=logger, callbacks=[cb]).fit(TinyModule(), loader())
    with open(os.path.join(logger.log_dir, "hparams.yaml")) as f:
        logged = yaml.safe_load(f)
    total = sum(p.numel() for p in TinyModule().parameters())
    weights = sum(p.numel() for name, p in TinyModule().named_parameters() if name.endswith("weight"))
    assert logged["mk/kernels"] == 2 and logged["mk/deployed_parameters"] == total
    assert logged["mk/coverage"] == pytest.approx(weights / total)


@pytest.mark.parametrize("name", ["FSDPStrategy", "DeepSpeedStrategy"])
def test_a_network_among_the_hyperparameters_is_refused_at_setup_when_sharded(name):
    """Sharded strategies write the checkpoint themselves and would fail to pickle the network at the first save."""
    if name == "DeepSpeedStrategy":
        pytest.importorskip("deepspeed")
    from types import SimpleNamespace

    from lightning.pytorch import strategies

    model = LitModule(DenseNet(), optimizer=None)
    model._trainer = SimpleNamespace(strategy=getattr(strategies, name)(), loggers=[])
    with pytest.raises(ValueError, match=r"hyperparameters hold the module\(s\) \['net'\].*save_hyperparameters\(ignore=\['net'\]\)"):
        MajorityKernelCallback.published(k=2)._apply(model)
