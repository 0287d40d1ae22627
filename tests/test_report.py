"""The results report: parsing of a Hydra multirun layout, the statistics against hand computations, the outputs."""

import json
import math
import statistics

import pytest
from scipy import stats

from lightning_mk.experiments.report import load_results, log_to_wandb, main, plot, summarize, to_markdown

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


def _runs():
    for task, labels in RUNS.items():
        for label, (method, k, params, deployable, accs) in labels.items():
            for seed, acc in accs.items():
                yield {"task": task, "method": method, "label": label, "k": k, "seed": seed, "test_acc": acc,
                       "params": params, "deployable": deployable, "train_time_s": 10.0 + seed,
                       "latency_ms": 0.5 + seed / 10, "lr": 0.01}  # fmt: skip


@pytest.fixture
def multirun(tmp_path):
    """One job folder per run, as Hydra's multirun writes them, plus a stray non-result file."""
    root = tmp_path / "multirun"
    jobs = root / "2026-01-01" / "10-00-00"
    for i, run in enumerate(_runs()):
        (jobs / str(i)).mkdir(parents=True)
        (jobs / str(i) / "results.jsonl").write_text(json.dumps(run) + "\n")
    (jobs / "multirun.yaml").write_text("hydra: {}\n")
    return root


def _row(summary, task, label):
    return next(r for r in summary[task] if r["label"] == label)


def test_load_finds_every_job_once(multirun):
    runs = load_results([multirun, multirun / "2026-01-01"])  # overlapping arguments: files are read once
    assert len(runs) == sum(len(v[4]) for labels in RUNS.values() for v in labels.values()) == 17
    assert {r["task"] for r in runs} == set(RUNS)


def test_summary_counts_means_and_order(multirun):
    summary = summarize(load_results(multirun))
    assert list(summary) == ["mnist1d/cnn", "mnist1d/mlp"]
    assert [r["label"] for r in summary["mnist1d/mlp"]] == ["baseline", "mk (select, k=4)", "wide (k=4)"]
    mk = _row(summary, "mnist1d/mlp", "mk (select, k=4)")
    assert mk["n"] == 3
    assert mk["mean"] == pytest.approx(statistics.mean([81, 84, 84]))
    assert mk["std"] == pytest.approx(statistics.stdev([81, 84, 84]))
    assert mk["train_time_s"] == pytest.approx(11.0)
    assert mk["latency_ms"] == pytest.approx(0.6)
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
    assert "| baseline | – | 3 | 81.00 ± 1.00 | – | 23,050 | 11.0 | 0.600 |" in md
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
    lines = (multirun / "runs.csv").read_text().splitlines()
    assert len(lines) == 18 and lines[0].split(",")[-1] == "lr"  # extra fields are kept


def test_cli_reads_a_single_file_and_other_metric(multirun, tmp_path):
    file = next(multirun.rglob("results.jsonl"))
    assert main([str(file), "--metric", "latency_ms", "--out", str(tmp_path / "out")]) == 0
    assert "latency ms (mean ± std)" in (tmp_path / "out" / "report.md").read_text()


def test_bad_json_line_names_file_and_line(tmp_path):
    file = tmp_path / "results.jsonl"
    file.write_text(json.dumps(next(_runs())) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"results\.jsonl, line 2: not valid JSON"):
        load_results(tmp_path)


def test_missing_field_names_file_line_and_field(tmp_path):
    run = next(_runs())
    del run["latency_ms"]
    (tmp_path / "results.jsonl").write_text(json.dumps(run) + "\n")
    with pytest.raises(ValueError, match=r"results\.jsonl, line 1: missing field 'latency_ms'"):
        load_results(tmp_path)


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
