"""The Hydra app: every config group composes, every method x model runs, bad configs fail early."""

import itertools
import json
import os

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from lightning_mk.experiments.models import Classifier
from lightning_mk.experiments.run import ConfigError, run

CONF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
GROUPS = {group: sorted(f[:-5] for f in os.listdir(os.path.join(CONF, group)) if f.endswith(".yaml")) for group in ("data", "model", "method", "trainer", "optimizer", "logger", "experiment")}
TINY = ["trainer.max_epochs=1", "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1", "+trainer.enable_progress_bar=false", "logger=none"]


def config(tmp_path, *overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=[f"output_dir={tmp_path}", *overrides])


@pytest.mark.parametrize("data, model, method", list(itertools.product(GROUPS["data"], GROUPS["model"], GROUPS["method"])))
def test_every_group_composes(tmp_path, data, model, method):
    cfg = config(tmp_path, f"data={data}", f"model={model}", f"method={method}")
    assert cfg.task == f"{data}/{model}"
    assert cfg.method.name == method and cfg.method.label


@pytest.mark.parametrize("group", ["trainer", "optimizer", "logger", "experiment"])
def test_every_option_of_the_other_groups_composes(tmp_path, group):
    for option in GROUPS[group]:
        cfg = config(tmp_path, f"{group}={option}")
        assert cfg.task


def small_params(cfg, data_shape=(40,), classes=10):
    from hydra.utils import instantiate

    return sum(p.numel() for p in instantiate(cfg.model.net, in_shape=data_shape, num_classes=classes).parameters())


@pytest.mark.parametrize("model", GROUPS["model"])
@pytest.mark.parametrize("method", GROUPS["method"])
def test_every_method_and_model_gives_a_deployable_small_model(tmp_path, method, model):
    cfg = config(tmp_path, f"method={method}", f"model={model}", "k=2", "data.module.num_samples=600", *TINY)
    result = run(cfg)
    line = json.loads((tmp_path / "results.jsonl").read_text())
    assert line == json.loads(json.dumps(result))
    baseline_params = small_params(cfg)
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    if method == "wide":
        assert not result["deployable"] and result["params"] > baseline_params
        return
    assert result["deployable"] and result["params"] == baseline_params
    from hydra.utils import instantiate

    fresh = Classifier(instantiate(cfg.model.net, in_shape=(40,), num_classes=10), 10)
    fresh.load_state_dict(state, strict=True)
    assert 0 <= result["test_acc"] <= 1 and result["train_time_s"] > 0 and result["latency_ms"] > 0


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
    ],
)
def test_bad_config_fails_before_anything_is_made(tmp_path, overrides, message):
    cfg = config(tmp_path / "out", *overrides, *TINY)
    with pytest.raises(ConfigError, match=message):
        run(cfg)
    assert not (tmp_path / "out").exists()


def test_unknown_method_names_the_allowed_ones(tmp_path):
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match="method/magic"):
        config(tmp_path, "method=magic")
    cfg = config(tmp_path)
    with open_dict(cfg):
        cfg.method.name = "magic"
    with pytest.raises(ConfigError, match=r"config key 'method' is 'magic'; allowed: \['baseline', 'baseline_reg', 'mk'"):
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
    assert "| baseline | – | 2 |" in table and "| mk (select, k=2, replicate, grad_scale=none) | 2 | 2 |" in table
    assert (tmp_path / "report" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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


def test_submodular_from_a_saved_wide_model(tmp_path):
    """wide_ckpt selects from a wide run's model instead of training one: the same selection as in-run."""
    common = ["seed=0", "k=2", "data.module.num_samples=600", *TINY]
    run(config(tmp_path / "wide", "method=wide", *common))
    in_run = run(config(tmp_path / "in_run", "method=submodular", *common))
    loaded = run(config(tmp_path / "loaded", "method=submodular", f"method.wide_ckpt={tmp_path / 'wide' / 'model.pt'}", "method.finetune_epochs=0", *common))
    assert loaded["test_acc"] == in_run["test_acc_before_finetune"]
    assert loaded["train_time_s"] < in_run["train_time_s"], "selection alone costs less than training the wide model"
