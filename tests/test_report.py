"""The results report: parsing of a Hydra multirun layout, the statistics against hand computations, the outputs."""

import csv
import json
import math
import statistics

import pytest
from scipy import stats

from lightning_mk.experiments.report import deduplicate, load_results, log_to_wandb, main, plot, summarize, to_markdown

T_975_2 = 4.302652729911275  # t_{0.975} with 2 degrees of freedom

# task -> label -> (method, k, params, deployable, {seed: test_acc})
RUNS = {
    "mnist1d/mlp": {
        "baseline": ("baseline", None, 23_050, True, {0: 0.80, 1: 0.82, 2: 0.81}),
        "mk (select, k=4)": ("mk", 4, 23_050, True, {0: 0.81, 1: 0.84, 2: 0.84}),  # diffs 1, 2, 3 points
        "wide (k=4)": ("wide", 4, 92_170, False, {0: 0.86, 1: 0.85, 2: 0.87}),
    },
    "mnist1d/cnn": {
        "baseline": ("baseline", None, 5_000, True, {0: 0.70, 1: 0.74, 2: 0.72}),
        "mk (select, k=4)": ("mk", 4, 5_000, True, {0: 0.75, 1: 0.73, 2: 0.77, 3: 0.76}),  # extra seed: Welch
        "wide (k=4)": ("wide", 4, 20_000, False, {0: 0.78}),  # one seed: no std, no CI
    },
}


def _run(task, label, method, k, seed, acc, params=1_000, deployable=True, **settings):
    """A results line as the app writes it: ``config`` holds every setting but the seed, k only where used."""
    config = {"data.name": task.split("/")[0], "model.name": task.split("/")[1], "trainer.max_epochs": 20,
              "optimizer.lr": 0.01, "method.name": method, "method.label": label, **({} if k is None else {"k": k})}
    return {"task": task, "method": method, "label": label, "k": k, "seed": seed, "test_acc": acc, "params": params,
            "deployable": deployable, "train_time_s": 10.0 + seed, "lr": 0.01, "config": {**config, **settings}}


def _runs():
    for task, labels in RUNS.items():
        for label, (method, k, params, deployable, accs) in labels.items():
            for seed, acc in accs.items():
                yield _run(task, label, method, k, seed, acc, params, deployable)


def _write_jobs(root, runs):
    """One job folder per run, as Hydra's multirun writes them, each run naming its folder as ``output_dir``."""
    jobs = root / "2026-01-01" / "10-00-00"
    for i, run in enumerate(runs):
        (jobs / str(i)).mkdir(parents=True)
        (jobs / str(i) / "results.jsonl").write_text(json.dumps({**run, "output_dir": str(jobs / str(i))}) + "\n")
    return jobs


@pytest.fixture
def multirun(tmp_path):
    """The runs of RUNS in a multirun's layout, plus a stray non-result file."""
    root = tmp_path / "multirun"
    (_write_jobs(root, _runs()) / "multirun.yaml").write_text("hydra: {}\n")
    return root


def _row(summary, task, name):
    return next(r for r in summary[task] if r["name"] == name)


def test_load_finds_every_job_once(multirun):
    runs = load_results([multirun, multirun / "2026-01-01"])  # overlapping arguments: files are read once
    assert len(runs) == sum(len(v[4]) for labels in RUNS.values() for v in labels.values()) == 17
    assert {r["task"] for r in runs} == set(RUNS)


def test_summary_counts_means_and_order(multirun):
    summary = summarize(load_results(multirun))
    assert list(summary) == ["mnist1d/cnn", "mnist1d/mlp"]
    assert [r["name"] for r in summary["mnist1d/mlp"]] == ["baseline", "mk (select, k=4)", "wide (k=4)"]
    mk = _row(summary, "mnist1d/mlp", "mk (select, k=4)")
    assert mk["n"] == 3
    assert mk["mean"] == pytest.approx(statistics.mean([81, 84, 84]))
    assert mk["std"] == pytest.approx(statistics.stdev([81, 84, 84]))
    assert mk["train_time_s"] == pytest.approx(11.0)
    wide = _row(summary, "mnist1d/cnn", "wide (k=4)")
    assert wide["n"] == 1 and wide["std"] is None and wide["ci"] is None
    assert not wide["deployable"]


def test_paired_ci_matches_hand_computation(multirun):
    mk = _row(summarize(load_results(multirun)), "mnist1d/mlp", "mk (select, k=4)")
    half = T_975_2 * statistics.stdev([1, 2, 3]) / math.sqrt(3)
    assert mk["ci_kind"] == "paired"
    assert mk["delta"] == pytest.approx(2.0)
    assert mk["ci"] == pytest.approx((2.0 - half, 2.0 + half))


def test_welch_ci_when_seeds_differ(multirun):
    mk = _row(summarize(load_results(multirun)), "mnist1d/cnn", "mk (select, k=4)")
    a, b = [75, 73, 77, 76], [70, 74, 72]
    va, vb = statistics.variance(a) / 4, statistics.variance(b) / 3
    df = (va + vb) ** 2 / (va**2 / 3 + vb**2 / 2)
    d = statistics.mean(a) - statistics.mean(b)
    half = stats.t.ppf(0.975, df) * math.sqrt(va + vb)
    assert mk["ci_kind"] == "welch"
    assert mk["ci"] == pytest.approx((d - half, d + half))


def test_markdown_rows(multirun):
    md = to_markdown(summarize(load_results(multirun)))
    assert "## mnist1d/mlp" in md and "## mnist1d/cnn" in md
    assert "| method | k | n seeds | test acc (mean ± std) | Δ vs baseline [95% CI] |" in md
    assert "| baseline | – | 3 | 81.00 ± 1.00 | – | 23,050 | 11.0 |" in md
    assert "latency" not in md and "Note:" not in md  # one baseline row per task, every row compared with it
    half = T_975_2 * 1 / math.sqrt(3)
    assert f"| mk (select, k=4) | 4 | 3 | 83.00 ± 1.73 | +2.00 [{2 - half:+.2f}, {2 + half:+.2f}] | 23,050 |" in md
    assert "| wide (k=4) | 4 | 1 | 78.00 ± – | +6.00 [–] | 20,000 (not deployable) |" in md
    assert "(Welch)" in md and "paired t-interval" in md.splitlines()[-1]


def test_cli_writes_report_plot_and_csv(multirun, capsys):
    assert main([str(multirun)]) == 0
    assert "## mnist1d/mlp" in capsys.readouterr().out
    assert "## mnist1d/cnn" in (multirun / "report.md").read_text()
    png = (multirun / "report.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
    with open(multirun / "runs.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 17 and all(r["lr"] == "0.01" for r in rows)  # extra fields are kept
    assert sorted(r["row"] for r in rows if r["task"] == "mnist1d/cnn").count("mk (select, k=4)") == 4
    assert json.loads(rows[0]["config"])["trainer.max_epochs"] == 20


def test_cli_reads_a_single_file_and_other_metric(multirun, tmp_path):
    file = next(multirun.rglob("results.jsonl"))
    assert main([str(file), "--metric", "train_time_s", "--out", str(tmp_path / "out")]) == 0
    assert "train time s (mean ± std)" in (tmp_path / "out" / "report.md").read_text()


def test_bad_json_line_names_file_and_line(tmp_path):
    file = tmp_path / "results.jsonl"
    file.write_text(json.dumps(next(_runs())) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"results\.jsonl, line 2: not valid JSON"):
        load_results(tmp_path)


def test_missing_field_names_file_line_and_field(tmp_path):
    run = next(_runs())
    del run["params"]
    (tmp_path / "results.jsonl").write_text(json.dumps(run) + "\n")
    with pytest.raises(ValueError, match=r"results\.jsonl, line 1: missing field 'params'"):
        load_results(tmp_path)


def test_line_without_config_is_from_an_older_version(tmp_path):
    run = next(_runs())
    (tmp_path / "results.jsonl").write_text(json.dumps(run) + "\n" + json.dumps({**run, "config": None}) + "\n")
    with pytest.raises(ValueError, match=r"line 2: field 'config' must be a JSON object"):
        load_results(tmp_path)
    del run["config"]
    (tmp_path / "results.jsonl").write_text(json.dumps(run) + "\n")
    with pytest.raises(ValueError, match=r"results\.jsonl, line 1: missing field 'config'.*older.*rerun"):
        load_results(tmp_path)


def test_old_latency_field_still_loads(tmp_path):
    (tmp_path / "results.jsonl").write_text(json.dumps({**next(_runs()), "latency_ms": 0.5}) + "\n")
    assert load_results(tmp_path)[0]["latency_ms"] == 0.5


def test_no_results_names_the_paths(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="no results found.*" + tmp_path.name):
        load_results(tmp_path)
    with pytest.raises(SystemExit):
        main([str(tmp_path)])
    assert "no results found" in capsys.readouterr().err


def test_log_to_wandb_offline(multirun, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    summary = summarize(load_results(multirun))
    png = tmp_path / "report.png"
    plot(summary, png)

    class Run:
        logged = {}

        def log(self, data):
            self.logged.update(data)

    log_to_wandb(summary, png, run=Run())  # a given run is used as is
    assert set(Run.logged) == {"report/mnist1d/mlp", "report/mnist1d/cnn", "report/plot"}

    log_to_wandb(summary, png)
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_duplicate_runs_are_an_error_naming_both_folders(tmp_path, capsys):
    """``method=baseline,mk k=2,4``: the baseline (no k in its config) runs twice per seed, a duplicate, not a seed."""
    runs = [_run("t/m", "baseline", "baseline", None, seed, 0.8 + seed / 100) for _k in (2, 4) for seed in (0, 1)]
    runs += [_run("t/m", f"mk (k={k})", "mk", k, seed, 0.85) for k in (2, 4) for seed in (0, 1)]
    jobs = _write_jobs(tmp_path, runs)
    with pytest.raises(ValueError, match="duplicate runs of task 't/m', 'baseline', seed 0") as err:
        summarize(load_results(tmp_path))
    assert f"{jobs / '0'} and {jobs / '2'}" in str(err.value) and "--dedup" in str(err.value)

    with pytest.raises(SystemExit, match="1"):
        main([str(tmp_path)])
    assert f"{jobs / '0'} and {jobs / '2'}" in capsys.readouterr().err
    assert not (tmp_path / "report.md").exists()

    assert main([str(tmp_path), "--dedup"]) == 0
    out, err = capsys.readouterr()
    assert f"dropped {jobs / '2'}" in err and f"dropped {jobs / '3'}" in err
    assert "| baseline | – | 2 | 80.50 ± 0.71 | – |" in out  # two seeds, paired with each mk row below
    assert out.count("| 2 | 85.00 ± 0.00 | +4.50 [") == 2 and "(Welch)" not in out


def test_duplicates_without_output_dir_are_named_by_file_and_line(tmp_path):
    run = next(_runs())
    (tmp_path / "results.jsonl").write_text(json.dumps(run) + "\n" + json.dumps({**run, "test_acc": 0.5}) + "\n")
    runs = load_results(tmp_path)
    with pytest.raises(ValueError, match=r"results\.jsonl, line 1 and .*results\.jsonl, line 2"):
        deduplicate(runs)
    assert deduplicate(runs, drop=True) == runs[:1]


def test_runs_of_different_settings_are_separate_rows_each_against_its_baseline(tmp_path):
    """A 20-epoch and a 5-epoch folder reported together: four rows, none pooled, each mk row against the baseline
    trained as long."""
    accs = {  # epochs -> method -> per-seed accuracy
        20: {"baseline": [0.80, 0.82, 0.81], "mk": [0.83, 0.83, 0.85]},
        5: {"baseline": [0.60, 0.64, 0.62], "mk": [0.61, 0.66, 0.62]},
    }
    for epochs, methods in accs.items():
        runs = [_run("t/m", method, method, 4 if method == "mk" else None, seed, acc, **{"trainer.max_epochs": epochs})
                for method, values in methods.items() for seed, acc in enumerate(values)]  # fmt: skip
        _write_jobs(tmp_path / f"{epochs}ep", runs)
    rows = summarize(load_results([tmp_path / "20ep", tmp_path / "5ep"]))["t/m"]
    assert [r["name"] for r in rows] == [
        "baseline [trainer.max_epochs=5]",
        "baseline [trainer.max_epochs=20]",
        "mk [trainer.max_epochs=5]",
        "mk [trainer.max_epochs=20]",
    ]
    assert all(r["n"] == 3 for r in rows)
    for epochs in (5, 20):
        mk = next(r for r in rows if r["name"] == f"mk [trainer.max_epochs={epochs}]")
        diffs = [100 * (m - b) for m, b in zip(accs[epochs]["mk"], accs[epochs]["baseline"])]
        half = T_975_2 * statistics.stdev(diffs) / math.sqrt(3)
        assert mk["mean"] == pytest.approx(100 * statistics.mean(accs[epochs]["mk"]))
        assert mk["reference"] == f"baseline [trainer.max_epochs={epochs}]" and mk["ci_kind"] == "paired"
        assert mk["delta"] == pytest.approx(statistics.mean(diffs))
        assert mk["ci"] == pytest.approx((statistics.mean(diffs) - half, statistics.mean(diffs) + half))
    md = to_markdown({"t/m": rows})
    assert "| baseline [trainer.max_epochs=5] | – | 3 | 62.00 ± 2.00 | – |" in md
    assert "Note: Δ against baseline [trainer.max_epochs=20] for: mk [trainer.max_epochs=20]." in md
    assert "same data.*, model.* and trainer.* settings" in md.splitlines()[-1]
    plot({"t/m": rows}, tmp_path / "report.png")
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_runs_that_load_another_seeds_model_are_one_row(tmp_path):
    """Distillation from the other seeds' models: the checkpoint paths differ per seed, the setting does not."""
    runs = [_run("t/m", "baseline", "baseline", None, seed, 0.80) for seed in range(3)]
    runs += [_run("t/m", "distill", "distill", 4, seed, 0.82, **{"method.teacher_ckpt": [f"s{o}/model.pt" for o in range(3) if o != seed]})
             for seed in range(3)]  # fmt: skip
    runs += [_run("t/m", "distill", "distill", 4, seed, 0.70, **{"method.teacher_ckpt": None}) for seed in range(3)]
    _write_jobs(tmp_path, runs)
    rows = summarize(load_results(tmp_path))["t/m"]
    assert [(r["name"], r["n"]) for r in rows] == [("baseline", 3), ("distill [method.teacher_ckpt=null]", 3),
                                                   ("distill [method.teacher_ckpt=loaded]", 3)]  # fmt: skip
    with pytest.raises(ValueError, match="duplicate runs of task 't/m', 'distill', seed 0"):  # another teacher, same seed
        summarize(load_results(tmp_path) + [_run("t/m", "distill", "distill", 4, 0, 0.9, **{"method.teacher_ckpt": ["x.pt"]})])


def test_no_delta_without_exactly_one_baseline_of_the_same_problem(tmp_path):
    runs = [_run("t/m", "baseline", "baseline", None, s, 0.8, **{"trainer.max_epochs": 20, "optimizer.lr": lr})
            for lr in (0.01, 0.1) for s in (0, 1)]  # fmt: skip
    runs += [_run("t/m", "mk", "mk", 4, s, 0.8, **{"trainer.max_epochs": e}) for e in (20, 10) for s in (0, 1)]
    _write_jobs(tmp_path, runs)
    summary = summarize(load_results(tmp_path))
    assert [r["name"] for r in summary["t/m"]] == [
        "baseline [optimizer.lr=0.01]",
        "baseline [optimizer.lr=0.1]",
        "mk [trainer.max_epochs=10]",
        "mk [trainer.max_epochs=20]",
    ]
    assert all(r["delta"] is None for r in summary["t/m"])
    md = to_markdown(summary)
    assert ("Note: no Δ for mk [trainer.max_epochs=10]: no baseline row has its data.*, model.* and trainer.* "
            "settings (baseline [optimizer.lr=0.01] differs in trainer.max_epochs; ") in md  # fmt: skip
    assert ("Note: no Δ for mk [trainer.max_epochs=20]: 2 baseline rows have its data.*, model.* and trainer.* "
            "settings (baseline [optimizer.lr=0.01], baseline [optimizer.lr=0.1]; they differ in optimizer.lr).") in md


def test_an_experiments_reading_is_printed_under_its_table():
    runs = [_run("mnist1d/mlp", label, method, None, seed, 0.8 + seed / 100, reading="MK helps here.")
            for label, method in (("baseline", "baseline"), ("mk", "mk")) for seed in range(2)]
    runs += [_run("mnist1d/cnn", "baseline", "baseline", None, seed, 0.9) for seed in range(2)]
    markdown = to_markdown(summarize(runs))
    mlp, cnn = markdown.split("## mnist1d/mlp")[1], markdown.split("## mnist1d/cnn")[1].split("## ")[0]
    assert mlp.count("Reading: MK helps here.") == 1
    assert "Reading" not in cnn


def test_the_plot_keeps_an_accuracy_within_0_and_100_percent(tmp_path):
    """Two seeds far apart near 100 %: their t-interval reaches past 150 %, the plot stops at 100 %."""
    from matplotlib.collections import LineCollection

    runs = [_run("t/m", "baseline", "baseline", None, seed, acc) for seed, acc in enumerate((0.999, 0.90))]
    rows = summarize(runs)["t/m"]
    assert rows[0]["mean_ci"][1] > 150 and rows[0]["mean_ci"][0] < 100
    (ax, *_) = plot({"t/m": rows}, tmp_path / "report.png").axes
    left, right = ax.get_xlim()
    assert 0 <= left and right <= 100
    (bar,) = [c for c in ax.collections if isinstance(c, LineCollection)]  # the CI's bar
    assert max(x for segment in bar.get_segments() for x, _ in segment) == pytest.approx(100)
