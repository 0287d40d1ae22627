"""The Hydra app: every config group composes, every method x model runs (built-in models and a user's own
LightningModule), results carry the config that defines them, bad configs fail early, the console stays quiet."""

import itertools
import csv
import json
import os
import sys

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

import lightning_mk.experiments.run as app
from helpers import run_ranks
from lightning_mk import MajorityKernelCallback, copy_spread
from lightning_mk.experiments.models import Classifier
from lightning_mk.experiments.run import ConfigError, check_config, method_of, run, run_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONF = os.path.join(ROOT, "conf")
EXAMPLES = os.path.join(ROOT, "examples")
GROUPS = {group: sorted(f[:-5] for f in os.listdir(os.path.join(CONF, group)) if f.endswith(".yaml")) for group in ("data", "model", "method", "trainer", "optimizer", "scheduler", "logger", "experiment")}
TINY = ["trainer.max_epochs=1", "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1", "logger=none"]
USER_MODEL = [f"hydra.searchpath=[file://{EXAMPLES}/conf]", "model=tiny", "data=blobs"]


def config(tmp_path, *overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=[f"output_dir={tmp_path}", *overrides])


def test_the_method_group_is_the_list_of_methods(tmp_path):
    """Each conf/method/<name>.yaml names its function, which the app runs; no list of methods elsewhere."""
    chosen = {option: method_of(config(tmp_path, f"method={option}")) for option in GROUPS["method"]}
    variants = {"mk_published": "mk", "mk_ema": "mk", "doconv": "mk", "expand": "mk", "ema": "averaged", "swa": "averaged"}  # a config of another method's function
    assert {option: m.train.__name__ for option, m in chosen.items()} == {option: variants.get(option, option) for option in GROUPS["method"]}
    assert {option for option, m in chosen.items() if not m.uses_k} == {"baseline", "baseline_reg", "ema", "swa"}
    with pytest.raises(ConfigError, match="config key 'method.train' must name a function decorated with"):
        method_of(config(tmp_path, "method=mk", "method.train=lightning_mk.experiments.run.Runner"))


def test_method_mk_published_is_the_callbacks_published(tmp_path):
    from hydra.utils import instantiate

    made = instantiate(config(tmp_path, "method=mk_published").method.callback)
    published = MajorityKernelCallback.published(k=made.settings.k, seed=made.settings.seed)
    assert made.settings == published.settings
    assert (made.monitor, made.norm_batches) == (published.monitor, published.norm_batches)


@pytest.mark.parametrize("data, model, method", list(itertools.product(GROUPS["data"], GROUPS["model"], GROUPS["method"])))
def test_every_group_composes(tmp_path, data, model, method):
    cfg = config(tmp_path, f"data={data}", f"model={model}", f"method={method}")
    assert cfg.task == f"{data}/{model}"
    assert cfg.method.name == method and cfg.method.label


@pytest.mark.parametrize("group", ["trainer", "optimizer", "scheduler", "logger", "experiment"])
def test_every_option_of_the_other_groups_composes(tmp_path, group):
    for option in GROUPS[group]:
        cfg = config(tmp_path, f"{group}={option}")
        assert cfg.task


def small_params(cfg, data_shape=(40,), classes=10):
    from hydra.utils import instantiate

    return sum(p.numel() for p in instantiate(cfg.model.net, in_shape=data_shape, num_classes=classes).parameters())


@pytest.mark.parametrize("model", GROUPS["model"])
@pytest.mark.parametrize("method", GROUPS["method"])
def test_every_method_and_model_gives_a_deployable_small_model(tmp_path, monkeypatch, method, model):
    cfg = config(tmp_path, f"method={method}", f"model={model}", "k=2", "data.module.num_samples=600", *TINY)
    if method == "doconv" and model in ("mlp", "transformer"):  # no convolution with more than one tap
        with pytest.raises(ValueError, match="form='doconv' takes none of the chosen kernels"):
            run(cfg)
        return
    made = []  # the callbacks made: the config check's, then the one mk trains with
    monkeypatch.setattr(app, "_callback", lambda *args, make=app._callback, **kw: made.append(make(*args, **kw)) or made[-1])
    result = run(cfg)
    if method in ("mk", "mk_published", "mk_ema"):  # its model has the small size however it trained: check that it trained with copies
        mk = made[-1]
        assert mk.settings.k == 2 and mk.kernels.coverage.kernels > 0
        assert max(copy_spread(mk.kernels.module).values()) > 0, "the copies were drawn and trained apart"
    line = json.loads((tmp_path / "results.jsonl").read_text())
    assert line == json.loads(json.dumps(result))
    assert sorted(os.listdir(tmp_path)) == ["model.pt", "results.jsonl"], "one model file, whatever the method"
    assert "latency_ms" not in result and 0 <= result["val_acc"] <= 1
    assert result["config"] == run_config(cfg, method_of(cfg).uses_k) and result["config"]["model.net.n"] == cfg.model.net.n
    assert (result["k"] is None) == ("k" not in result["config"]) == (method in ("baseline", "baseline_reg", "ema", "swa"))
    baseline_params = small_params(cfg)
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    if method == "wide":
        assert not result["deployable"] and result["params"] > baseline_params
        return
    assert result["deployable"] and result["params"] == baseline_params
    from hydra.utils import instantiate

    fresh = Classifier(instantiate(cfg.model.net, in_shape=(40,), num_classes=10), 10)
    fresh.load_state_dict(state, strict=True)
    assert 0 <= result["test_acc"] <= 1 and result["train_time_s"] > 0


@pytest.mark.parametrize("method", ["mk", "expand"])
def test_a_diverged_run_is_recorded_not_lost(tmp_path, method):
    """The callback keeps no file of a model with non-finite weights; the app still records the run (at the
    accuracy of what it trained, as for plain training), so one diverged seed does not stop a sweep."""
    cfg = config(tmp_path, f"method={method}", "k=2", "optimizer.lr=1e30", "data.module.num_samples=600", *TINY)
    with pytest.warns(UserWarning, match="non-finite values"):
        result = run(cfg)
    assert json.loads((tmp_path / "results.jsonl").read_text())["test_acc"] == result["test_acc"] < 0.5


@pytest.mark.parametrize("method", ["baseline", "mk", "distill", "submodular"])
def test_the_cnn_experiment_runs_and_its_saved_model_loads(tmp_path, method):
    """experiment=mnist1d_cnn (a CNN without normalisation, SGD, cosine schedule), tiny: the scheduler reaches
    every fit (distill's student, submodular's wide model and fine-tuning). Every method runs with model=cnn in
    test_every_method_and_model_gives_a_deployable_small_model."""
    import lightning.pytorch as pl
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from lightning_mk.experiments.run import load_model

    cfg = config(tmp_path, "experiment=mnist1d_cnn", f"method={method}", "k=2", "data.module.num_samples=600", *TINY)
    assert cfg.task == "mnist1d/cnn" and cfg.model.net.n == 32 and cfg.scheduler.T_max == 1
    assert (cfg.optimizer.lr, cfg.optimizer.momentum, cfg.optimizer.weight_decay) == (0.05, 0.9, 5e-4)
    result = run(cfg)
    assert result["deployable"] and 0 <= result["test_acc"] <= 1
    assert result["config"]["scheduler._target_"] == "torch.optim.lr_scheduler.CosineAnnealingLR"
    (tmp_path / ".hydra").mkdir()
    OmegaConf.save(cfg, tmp_path / ".hydra" / "config.yaml")  # what the app's Hydra writes, for load_model
    model = load_model(tmp_path)
    assert sum(p.numel() for p in model.parameters()) == result["params"] == small_params(cfg)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    (tested,) = trainer.test(model, instantiate(cfg.data.module), verbose=False)
    assert tested["test/acc"] == pytest.approx(result["test_acc"], abs=1e-6)


def test_the_cosine_scheduler_steps_per_epoch_and_no_scheduler_is_the_default(tmp_path):
    import lightning.pytorch as pl
    from hydra.utils import instantiate

    from lightning_mk.experiments.run import Runner

    class EpochLRs(pl.Callback):
        def __init__(self):
            self.lrs = []

        def on_train_epoch_start(self, trainer, pl_module):
            self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    for overrides, expected in [((), [0.05, 0.05, 0.05]), (("scheduler=cosine",), [0.05, 0.0375, 0.0125])]:
        cfg = config(tmp_path, "optimizer=sgd", *overrides, "data.module.num_samples=600", *TINY, "trainer.max_epochs=3")
        data = instantiate(cfg.data.module)
        data.setup("fit")
        runner, lrs = Runner(cfg, data), EpochLRs()
        trainer = runner.fit(runner.module(), callbacks=[lrs])
        assert lrs.lrs == pytest.approx(expected), "cosine annealing over trainer.max_epochs, stepped per epoch"
        if not overrides:
            assert "scheduler" not in cfg and trainer.lr_scheduler_configs == [], "the default adds nothing"
            continue
        (scheduler,) = trainer.lr_scheduler_configs
        assert type(scheduler.scheduler).__name__ == "CosineAnnealingLR" and scheduler.interval == "epoch"
        assert scheduler.scheduler.T_max == 3
    with pytest.raises(ValueError, match="a scheduler needs an optimizer"):  # a LightningModule net keeps its own
        Classifier(Classifier(torch.nn.Linear(2, 2), 2), 2, scheduler=torch.optim.lr_scheduler.ConstantLR)


def test_an_experiment_overrides_the_primary_config(tmp_path):
    """``_self_`` comes first in config.yaml's defaults: an experiment's own ``task`` wins over the default one."""
    assert config(tmp_path).task == "mnist1d/mlp"
    assert config(tmp_path, "experiment=mnist1d_mlp_large").task == "mnist1d/mlp-50k"
    assert config(tmp_path, "experiment=mnist1d_mlp_large", "task=mine").task == "mine"


def test_the_config_of_a_run_is_every_setting_but_the_seed(tmp_path):
    baseline = run_config(config(tmp_path, "method=baseline", "seed=0", "k=2"), uses_k=False)
    assert baseline == run_config(config(tmp_path / "other", "method=baseline", "seed=1", "k=4", "logger=csv", "trainer.enable_progress_bar=true"), uses_k=False)
    assert not {"seed", "k", "output_dir"} & set(baseline) and not any(key.startswith("logger") for key in baseline)
    assert baseline["trainer.max_epochs"] == 20 and baseline["data.module.seed"] == "${seed}", "dotted keys, unresolved"
    assert baseline != run_config(config(tmp_path, "method=baseline", "trainer.max_epochs=5"), uses_k=False)
    mk = [run_config(config(tmp_path, "method=mk", f"k={k}"), uses_k=True) for k in (2, 4)]
    assert mk[0]["k"] == 2 and mk[0] != mk[1]
    labels = [config(tmp_path, "method=mk", f"method.callback.form={form}").method.label for form in ("copies", "decoupled")]
    assert labels == [
        "mk (k=4, copies, select, noise 0.3, decay 0.0005, monitor auto)",
        "mk (k=4, decoupled, select, noise 0.3, decay 0.0005, monitor auto)",
    ]
    assert json.loads(json.dumps(baseline)) == baseline


def _jobs(*sweep):
    """The runs of a basic sweep: the product of comma-separated choices, one list of overrides per job."""
    choices = [[f"{key}={value}" for value in values.split(",")] for key, values in (o.split("=", 1) for o in sweep)]
    return [list(job) for job in itertools.product(*choices)]


def _duplicates(tmp_path, fixed, jobs):
    """The jobs that repeat an earlier job's run: the same task, config and seed."""
    seen, duplicates = set(), []
    for job in jobs:
        cfg = config(tmp_path, *fixed, *job)
        key = (cfg.task, json.dumps(run_config(cfg, method_of(cfg).uses_k), sort_keys=True), cfg.seed)
        if key in seen:
            duplicates.append(job)
        seen.add(key)
    return duplicates


@pytest.mark.parametrize("experiment", GROUPS["experiment"])
def test_no_experiment_sweep_repeats_a_run(tmp_path, experiment):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        params = compose("config", overrides=[f"experiment={experiment}"], return_hydra_config=True).hydra.sweeper.params
    jobs = _jobs(*(f"{key}={value}" for key, value in (params or {}).items()))
    assert not _duplicates(tmp_path, [f"experiment={experiment}"], jobs)


def test_a_sweep_over_k_repeats_the_baseline_unless_split(tmp_path):
    assert _duplicates(tmp_path, [], _jobs("method=baseline,mk", "k=2,4", "seed=0,1")) == [
        ["method=baseline", "k=4", "seed=0"], ["method=baseline", "k=4", "seed=1"]
    ]
    assert not _duplicates(tmp_path, [], _jobs("method=mk", "k=2,4", "seed=0,1") + _jobs("method=baseline", "seed=0,1"))


@pytest.fixture
def user_model(monkeypatch):
    """examples/custom_model.py importable, as PYTHONPATH=examples makes it on the command line."""
    monkeypatch.syspath_prepend(EXAMPLES)
    from custom_model import TinyClassifier

    return TinyClassifier


@pytest.mark.parametrize("method", ["baseline", "mk", "distill", "wide", "submodular"])
def test_a_users_own_lightning_module_runs_every_method(tmp_path, user_model, method):
    cfg = config(tmp_path, *USER_MODEL, f"method={method}", "k=2", *TINY)
    result = run(cfg)
    assert result["task"] == "blobs/tiny" and result["config"]["model.module._target_"] == "custom_model.TinyClassifier"
    assert 0 <= result["val_acc"] <= 1 and 0 <= result["test_acc"] <= 1 and result["test_loss"] > 0
    small = user_model(16, 4, hidden=32)
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    if method == "wide":
        assert not result["deployable"] and state["fc1.weight"].shape == (64, 16)
        return
    small.load_state_dict(state, strict=True)
    assert result["deployable"] and result["params"] == sum(p.numel() for p in small.parameters())


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["method=mk", "k=1"], "config key 'k' must be an integer >= 2 for method=mk, got 1"),
        (["method=wide", "k=0"], "config key 'k' must be an integer >= 2 for method=wide, got 0"),
        (["model.net.n=0"], r"config key 'model.net.n' \(the model width\) must be a positive integer, got 0"),
        (["data=cifar10", "data.module.root=/no/such/dir"], "config key 'data.module.root' is '/no/such/dir', which does not exist"),
        (["method=distill", "method.teacher=giant"], r"config key 'method.teacher' is 'giant'; allowed: \['ensemble', 'wide'\]"),
        (["method=distill", "method.teacher=wide", "method.teacher_ckpt=/no/model.pt"], "names '/no/model.pt', which does not exist"),
        (["method=submodular", "method.wide_ckpt=/no/model.pt"], "'method.wide_ckpt' names '/no/model.pt', which does not exist"),
        (["method=submodular", "method.objective=random"], r"allowed: \['reconstruction', 'facility_location'\]"),
        (["method=mk", "method.callback.form=tied"], r"'method.callback': unknown form 'tied'; valid forms: \['copies', 'decoupled', 'relative', 'doconv', 'expand'\]"),
        (["method=mk", "method.callback.scheme=nope"], r"config key 'method.callback': unknown scheme 'nope'; valid schemes: \["),
        (["method=mk", "method.callback.noise=-1"], "config key 'method.callback': noise must be a number >= 0"),
        (["method=mk", "+method.callback.copies=2"], "unexpected keyword argument 'copies'"),
        (["method=mk_ema", "method.average.decay=1.5"], r"config key 'method.average': Invalid decay value 1.5"),
        (["method=mk_ema", "method.average._target_=lightning.pytorch.callbacks.StochasticWeightAveraging", "~method.average.decay",
          "+method.average.swa_lrs=0.1"], "'method.average' must make one of Lightning's WeightAveraging callbacks"),
    ],
)
def test_bad_config_fails_before_anything_is_made(tmp_path, overrides, message):
    cfg = config(tmp_path / "out", *overrides, *TINY)
    with pytest.raises(ConfigError, match=message):
        run(cfg)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["method=baseline_reg"], "method=baseline_reg sets the dropout of a built-in model.net"),
        (["method=wide", "~model.width_arg"], "method=wide builds the model k times wider: set config key 'model.width_arg'"),
        (["model.width_arg=depth"], "config key 'model.width_arg' is 'depth', which is not a key of model.module"),
        (["model.module.hidden=-1"], r"config key 'model.module.hidden' \(the model width\) must be a positive integer"),
        (["model.module._target_=custom_model.Missing"], "config key 'model.module._target_' is 'custom_model.Missing', which cannot be imported"),
        (["model.module._target_=custom_model.Blobs"], "config key 'model.module._target_' must name a LightningModule"),
        (["+model.net._target_=torch.nn.Linear"], "config key 'model' must have exactly one of 'net'"),
        (["scheduler=cosine"], "config key 'scheduler' sets the learning-rate schedule of the built-in model.net"),
    ],
)
def test_bad_user_model_config_fails_before_anything_is_made(tmp_path, user_model, overrides, message):
    cfg = config(tmp_path / "out", *USER_MODEL, *overrides, *TINY)
    with pytest.raises(ConfigError, match=message):
        run(cfg)
    assert not (tmp_path / "out").exists()


def test_distill_checks_batches_and_logits_before_training(tmp_path, user_model, monkeypatch):
    monkeypatch.setattr(user_model, "forward", lambda self, x: self.fc1(x).unsqueeze(1))
    with pytest.raises(ConfigError, match=r"forward to return logits \[batch, classes\], got \(64, 1, 32\)"):
        run(config(tmp_path / "out", *USER_MODEL, "method=distill", "k=2", *TINY))
    assert not (tmp_path / "out").exists()


def test_unknown_method_names_the_allowed_ones(tmp_path):
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match="method/magic"):
        config(tmp_path, "method=magic")
    cfg = config(tmp_path)
    with open_dict(cfg):
        cfg.method.train = "lightning_mk.experiments.run.magic"
    with pytest.raises(ConfigError, match=r"config key 'method.train' is 'lightning_mk.experiments.run.magic', which cannot be imported"):
        run(cfg)


def test_wandb_runs_offline_into_the_output_dir_and_the_report_reads_real_runs(tmp_path, monkeypatch, capsys):
    from lightning_mk.experiments import report

    monkeypatch.setenv("WANDB_SILENT", "true")
    for method, seed in [("baseline", 0), ("baseline", 1), ("mk", 0), ("mk", 1)]:
        out = tmp_path / f"{method}-{seed}"
        cfg = config(out, f"method={method}", f"seed={seed}", "k=2", "data.module.num_samples=600", *TINY[:-1], "logger=wandb")
        run(cfg)
        assert list((out / "wandb").glob("offline-run-*/run-*.wandb")), "no offline W&B run was written"
        assert list((out / "csv").glob("version_*/metrics.csv")), "CSV metrics are always written"
    capsys.readouterr()
    assert report.main([str(tmp_path), "--out", str(tmp_path / "report")]) == 0
    table = capsys.readouterr().out
    assert "## mnist1d/mlp" in table
    assert "| baseline | – | 2 |" in table and "| mk (k=2, relative, select, noise 0.3, decay 0.0005, monitor auto) | 2 | 2 |" in table
    assert (tmp_path / "report" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "report" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", "learning curves from the CSV metrics"
    metrics = next((tmp_path / "mk-0" / "csv").glob("version_*/metrics.csv")).read_text()
    assert "time/train_s" in metrics.splitlines()[0]


@pytest.mark.parametrize("method", ["baseline", "mk", "ema", "mk_ema"])
def test_early_stopping_deploys_the_best_validation_epoch(tmp_path, method):
    cfg = config(tmp_path, f"method={method}", "k=2", "data.module.num_samples=600", "early_stopping=1",
                 "trainer.max_epochs=4", "+trainer.limit_train_batches=2", "logger=csv")
    result = run(cfg)
    assert 0 <= result["best_epoch"] <= result["epochs"] <= 3
    assert sorted(os.listdir(tmp_path)) == ["csv", "model.pt", "results.jsonl"], "the best epoch's checkpoint is not kept"
    with open(next((tmp_path / "csv").glob("version_*/metrics.csv"))) as fh:
        logged = [float(r["val/acc"]) for r in csv.DictReader(fh) if r.get("val/acc")]
    assert result["val_acc"] == pytest.approx(max(logged), abs=1e-6), "the model deployed is the best validation epoch's"
    from hydra.utils import instantiate

    fresh = Classifier(instantiate(cfg.model.net, in_shape=(40,), num_classes=10), 10)  # plain keys at the small size
    fresh.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True), strict=True)


def test_swa_with_early_stopping_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="method=swa averages from swa_epoch_start to the end"):
        check_config(config(tmp_path, "method=swa", "early_stopping=5"))


def test_distill_from_saved_teachers(tmp_path):
    """teacher_ckpt takes a wide run's model.pt, or k baseline runs' model.pt for an ensemble."""
    paths = {}
    for name, method, seed in [("wide", "wide", 0), ("b0", "baseline", 0), ("b1", "baseline", 1)]:
        run(config(tmp_path / name, f"method={method}", f"seed={seed}", "k=2", "data.module.num_samples=600", *TINY))
        paths[name] = str(tmp_path / name / "model.pt")
    wide = run(config(tmp_path / "dw", "method=distill", "method.teacher=wide", f"method.teacher_ckpt={paths['wide']}", "k=2", "data.module.num_samples=600", *TINY))
    ensemble = run(config(tmp_path / "de", "method=distill", f"method.teacher_ckpt=[{paths['b0']},{paths['b1']}]", "k=2", "data.module.num_samples=600", *TINY))
    for result in (wide, ensemble):
        assert result["deployable"] and result["teacher_time_s"] == 0, "a loaded teacher costs no training time"
    with pytest.raises(ConfigError, match=r"must name 2 file\(s\) for teacher=ensemble"):
        run(config(tmp_path / "bad", "method=distill", f"method.teacher_ckpt=[{paths['b0']}]", "k=2", *TINY))


def test_submodular_from_a_saved_wide_model(tmp_path, monkeypatch):
    """wide_ckpt selects from a wide run's model instead of training one: the same selection as in-run, and no fit."""
    from lightning_mk.experiments.run import Runner

    common = ["seed=0", "k=2", "data.module.num_samples=600", *TINY]
    run(config(tmp_path / "wide", "method=wide", *common))
    in_run = run(config(tmp_path / "in_run", "method=submodular", *common))

    def no_fit(*args, **kwargs):
        raise AssertionError("the run trained a model: the wide model was not loaded from wide_ckpt")

    monkeypatch.setattr(Runner, "fit", no_fit)
    loaded = run(config(tmp_path / "loaded", "method=submodular", f"method.wide_ckpt={tmp_path / 'wide' / 'model.pt'}", "method.finetune_epochs=0", *common))
    assert loaded["test_acc"] == in_run["test_acc_before_finetune"]


def _app(*args, cwd, env=None):
    return run_ranks([sys.executable, "-m", "lightning_mk.experiments.run", *args], timeout=300, cwd=cwd,
                     env={**os.environ, "PYTHONPATH": EXAMPLES, **(env or {})})


def test_the_command_line_is_quiet_and_run_log_holds_the_run(tmp_path):
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    done = _app("--config-dir", f"{EXAMPLES}/conf", "model=tiny", "data=blobs", "method=mk", "k=2", "trainer.max_epochs=2",
                "logger=wandb", f"hydra.run.dir={out}", cwd=tmp_path, env={"PATH": env["PATH"]})
    assert done.returncode == 0, done.stderr
    console = (done.stdout + done.stderr).splitlines()
    # the app's line, and W&B's one deprecation notice per process (Lightning's WandbLogger always sets `anonymous`)
    (line,) = [line for line in console if "anonymous setting" not in line]
    assert "[blobs/tiny] mk" in line and "val acc" in line
    assert sorted(p.name for p in out.iterdir()) == [".hydra", "csv", "model.pt", "results.jsonl", "run.log", "wandb"]
    log = (out / "run.log").read_text()
    assert "Seed set to 0" in log and "`Trainer.fit` stopped" in log and "MajorityKernelCallback: saved" in log
    assert line.split(" - ", 1)[1] in log and "Tip" not in log


@pytest.mark.distributed
def test_a_ddp_job_is_written_once_and_exits_cleanly(tmp_path):
    """Lightning's ``ddp`` relaunches the job for rank 1: both ranks train and evaluate, rank 0 alone writes the
    model, the results line and the app's line; the process group is destroyed before the interpreter exits."""
    out = tmp_path / "run"
    done = _app("--config-dir", f"{EXAMPLES}/conf", "model=tiny", "data=blobs", "method=mk", "k=2", "trainer.max_epochs=1",
                "trainer.devices=2", "+trainer.strategy=ddp", "logger=csv", f"hydra.run.dir={out}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [line for line in (done.stdout + done.stderr).splitlines() if "[blobs/tiny] mk" in line and "val acc" in line]
    assert len((out / "results.jsonl").read_text().splitlines()) == 1
    assert (out / "run.log").read_text().count("[blobs/tiny] mk") == 1


def test_a_config_error_leaves_no_run_folder(tmp_path):
    done = _app(f"hydra.run.dir={tmp_path / 'run'}", "method=mk", "k=1", cwd=tmp_path)
    assert done.returncode != 0 and "config key 'k' must be an integer >= 2 for method=mk, got 1" in done.stderr
    assert not (tmp_path / "run").exists()
    done = _app("-m", f"hydra.sweep.dir={tmp_path / 'sweep'}", "method=mk", "k=0,1", cwd=tmp_path)
    assert done.returncode != 0 and "got 0" in done.stderr
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir()) == ["multirun.yaml"], "the sweep's record only"


@pytest.mark.parametrize("option, message", [("scheme=nope", "unknown scheme 'nope'; valid schemes: [")])  # others: in-process
def test_a_bad_callback_option_fails_before_any_logger(tmp_path, option, message):
    """The config check makes the callback, so what it refuses fails before W&B (the default logger) starts."""
    done = _app(f"hydra.run.dir={tmp_path / 'run'}", "method=mk", f"method.callback.{option}", cwd=tmp_path)
    assert done.returncode != 0 and f"config key 'method.callback': {message}" in done.stderr
    assert not list(tmp_path.iterdir()), "no run folder (hydra.run.dir), and no W&B or CSV logs anywhere"


@pytest.mark.parametrize("method", ["mk", "wide"])
def test_load_model_rebuilds_a_saved_run(tmp_path, method):
    """A run's model.pt loads into the model its .hydra/config.yaml describes, and tests as the run reported."""
    import lightning.pytorch as pl
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from lightning_mk.experiments.run import load_model

    out = tmp_path / "run"
    done = _app(f"method={method}", "k=2", "data.module.num_samples=600", "trainer.max_epochs=1", "logger=none",
                f"hydra.run.dir={out}", cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads((out / "results.jsonl").read_text())
    model = load_model(out)
    assert not model.training and sum(p.numel() for p in model.parameters()) == result["params"]
    data = instantiate(OmegaConf.load(out / ".hydra" / "config.yaml").data.module)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    (tested,) = trainer.test(model, data, verbose=False)
    assert tested["test/acc"] == pytest.approx(result["test_acc"], abs=1e-6)


@pytest.mark.parametrize("experiment, lrs, regularised", [
    ("findings_mlp", {"baseline": 0.1, "baseline_reg": 0.1, "mk": 0.1, "mk_published": 0.2, "wide": 0.1, "submodular": 0.1}, (0.1, 1e-4)),
    ("findings_cnn", {"baseline": 0.1, "baseline_reg": 0.1, "mk": 0.1, "mk_published": 0.03, "wide": 0.1, "submodular": 0.1}, (0.3, 1e-3)),
])
def test_the_main_jobs_experiments_give_each_method_its_tuned_setting(tmp_path, experiment, lrs, regularised):
    for method, lr in lrs.items():
        cfg = config(tmp_path, f"experiment={experiment}", f"method={method}")
        assert cfg.optimizer.lr == lr and cfg.reading, method
    cfg = config(tmp_path, f"experiment={experiment}", "method=baseline_reg")
    assert (cfg.method.dropout, cfg.method.weight_decay) == regularised
    assert (config(tmp_path, "method=baseline_reg").method.dropout) == 0.1, "without a tuned map: the defaults"


def test_hparams_search_tunes_on_the_returned_validation_accuracy(tmp_path):
    """hparams_search=lr drives Optuna with what main() returns (val_acc), one job per trial."""
    sweep = tmp_path / "search"
    done = _app("-m", "--config-dir", f"{EXAMPLES}/conf", "model=tiny", "data=blobs", "method=mk", "k=2", "trainer.max_epochs=1",
                "logger=none", "hparams_search=lr", "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads((job / "results.jsonl").read_text()) for job in sorted(sweep.iterdir()) if (job / "results.jsonl").exists()]
    assert len(results) == 2 and len({r["config"]["optimizer.lr"] for r in results}) == 2, "two trials, two learning rates"
    with open(sweep / "optimization_results.yaml") as f:
        best = yaml.safe_load(f)
    assert best["best_value"] == max(r["val_acc"] for r in results)
    assert best["best_params"]["optimizer.lr"] in {r["config"]["optimizer.lr"] for r in results}


def test_the_slurm_launcher_config_composes(tmp_path):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.timeout_min, launcher.tasks_per_node, launcher.gpus_per_node) == (120, 1, 0)
