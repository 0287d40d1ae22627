"""Tables and a plot of finished runs: ``python -m lightning_mk.experiments.report DIR_OR_FILE... [--out DIR] [--metric test_acc]``.

Reads every ``results.jsonl`` (one JSON object per run) under the given folders, e.g. a Hydra multirun, and
compares each row of a task with its baseline through a 95% CI, so that a gain is not read off a single seed.
A row is one run config (every setting but the seed, the results' ``config``), so that runs with different
settings are never pooled and a run trained twice is not counted as two seeds.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy import stats

if TYPE_CHECKING:
    from matplotlib.figure import Figure

REQUIRED = ("task", "method", "label", "k", "seed", "test_acc", "params", "deployable", "train_time_s", "config")
NUMERIC = ("test_acc", "params", "train_time_s")
#: Config keys that define the problem (what is learnt, by which model, for how long): a row's Δ is taken against
#: the baseline row that has the same ones, since a gain over a baseline trained on another problem means nothing.
PROBLEM = ("data.", "model.", "trainer.")
CI_NOTE = (
    "Δ: difference of means to the task's baseline row with the same data.*, model.* and trainer.* settings{unit}; "
    "none where no baseline row or several have them (a note under the table says which). 95% CI: paired "
    "t-interval on the per-seed differences when both rows have the same seeds, otherwise Welch's t-interval "
    "(marked); quantiles from scipy.stats.t; – where not computable (fewer than 2 seeds). Rows: one per run config "
    "(all settings but the seed); rows sharing a label show the settings in which they differ. Train time: mean "
    "over seeds."
)


def is_number(value) -> bool:
    """An int or float, not a bool (JSON true is not a measurement)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _find(paths: list[Path]) -> list[Path]:
    """Files to read; a file reached through two arguments is read once, so its runs are not counted twice."""
    files: dict[Path, Path] = {}
    for path in paths:
        if path.is_file():
            found = [path]
        elif path.is_dir():
            found = sorted(path.rglob("results.jsonl"))
        else:
            raise FileNotFoundError(f"no such file or folder: {path}")
        for file in found:
            files.setdefault(file.resolve(), file)
    return list(files.values())


def load_results(paths, metric: str = "test_acc") -> list[dict]:
    """All runs in the ``results.jsonl`` files under ``paths`` (folders are searched recursively, files read as is),
    each with ``source`` ("FILE, line N") added, to name a run that has no ``output_dir``.

    Raises ValueError with file and line for a bad line, so a broken run is found rather than silently dropped.
    """
    paths = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    required = REQUIRED + (metric,) * (metric not in REQUIRED)
    runs = []
    for file in _find(paths):
        with open(file, encoding="utf-8") as lines:
            for n, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                where = f"{file}, line {n}"
                try:
                    run = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{where}: not valid JSON ({err.msg})") from None
                if not isinstance(run, dict):
                    raise ValueError(f"{where}: expected a JSON object, got {type(run).__name__}")
                if "config" not in run:
                    raise ValueError(
                        f"{where}: missing field 'config' (the run's settings, which tell runs apart): the line was "
                        "written by an older lightning_mk; rerun that run with this version, or leave its file out"
                    )
                missing = [field for field in required if field not in run]
                if missing:
                    raise ValueError(f"{where}: missing field {', '.join(map(repr, missing))}")
                bad = [f for f in (*NUMERIC, metric) if not is_number(run[f])]
                if bad:
                    raise ValueError(f"{where}: field {bad[0]!r} is not a number: {run[bad[0]]!r}")
                if not isinstance(run["config"], dict):
                    raise ValueError(f"{where}: field 'config' must be a JSON object of settings: {run['config']!r}")
                runs.append({**run, "source": where})
    if not runs:
        raise FileNotFoundError(f"no results found: no runs in a results.jsonl under {', '.join(map(str, paths))}")
    return runs


def mean_interval(x: np.ndarray) -> tuple[float, float] | None:
    """95% t-interval of the mean of ``x`` (scipy's one-sample t-test); None below 2 values."""
    if len(x) < 2:
        return None
    if np.ptp(x) == 0:  # no spread: the interval is the value (scipy would warn of lost precision)
        return float(x[0]), float(x[0])
    ci = stats.ttest_1samp(x, 0.0).confidence_interval(0.95)
    return float(ci.low), float(ci.high)


def _welch(a: np.ndarray, b: np.ndarray) -> tuple[float, float] | None:
    """95% Welch interval of mean(a) - mean(b) (scipy's unequal-variance t-test); None when a side has fewer
    than 2 values."""
    if len(a) < 2 or len(b) < 2:
        return None
    if np.ptp(a) == 0 and np.ptp(b) == 0:
        return float(a[0] - b[0]), float(a[0] - b[0])
    ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    return float(ci.low), float(ci.high)


def _one(values: list):
    """The value shared by all seeds, or the distinct values joined by '/' when seeds disagree."""
    distinct = sorted(set(values), key=str)
    return distinct[0] if len(distinct) == 1 else "/".join(map(str, distinct))


_ABSENT = object()  # a config key that one run has and another lacks
#: Config keys that name another run's saved model: usually the same seed's (an ensemble teacher: the other seeds'),
#: so they differ from seed to seed like the seed itself. A row tells only whether one was loaded.
CHECKPOINTS = ("method.teacher_ckpt", "method.wide_ckpt")


def _settings(run: dict) -> dict:
    """Everything that defines the run but its seed: its config, with the line's method and k should it lack them,
    and :data:`CHECKPOINTS` as ``"loaded"`` where given."""
    config = run["config"]
    loaded = {key: "loaded" for key in CHECKPOINTS if config.get(key) is not None}
    return {"method.name": run["method"], "k": run["k"], **config, **loaded}


def _key(run: dict) -> tuple:
    """Runs with the same key are seeds of one row."""
    return run["task"], run["label"], json.dumps(_settings(run), sort_keys=True)


def _where(run: dict, other: dict) -> str:
    """The run's folder; its file and line when it names none, or the same folder as ``other``."""
    folder = run.get("output_dir")
    return str(folder) if folder and folder != other.get("output_dir") else run.get("source", "(no output_dir)")


def deduplicate(results: list[dict], drop: bool = False) -> list[dict]:
    """The runs, checked for duplicates (same task, config and seed), since a run trained twice would count as two
    seeds. Raises ValueError naming both; with ``drop``, keeps the first and warns on stderr about the other."""
    first: dict[tuple, dict] = {}
    kept = []
    for run in results:
        seen = first.setdefault((*_key(run), json.dumps(run["seed"])), run)
        if seen is run:
            kept.append(run)
            continue
        what = (f"duplicate runs of task {run['task']!r}, {run['label']!r}, seed {run['seed']!r} with the same config: "
                f"{_where(seen, run)} and {_where(run, seen)}")  # fmt: skip
        if not drop:
            raise ValueError(f"{what}; move one out of the folders reported, or pass --dedup to keep the first")
        print(f"warning: {what}; dropped {_where(run, seen)}", file=sys.stderr)
    return kept


def _row(runs: list[dict], metric: str, scale: float) -> dict:
    runs = sorted(runs, key=lambda r: r["seed"])
    values = np.array([r[metric] for r in runs], dtype=float) * scale
    return {
        "label": runs[0]["label"],
        "name": runs[0]["label"],  # with the settings that tell it apart from rows of the same label, see _name
        "key": _key(runs[0]),
        "settings": _settings(runs[0]),
        "method": runs[0]["method"],
        "metric": metric,
        "unit": "%" if scale == 100 else "",
        "bounds": (0.0, 100.0) if scale == 100 else None,  # the range of its values: an accuracy's, in %
        "k": _one([r["k"] for r in runs]),
        "seeds": [r["seed"] for r in runs],
        "values": values.tolist(),
        "n": len(values),
        "mean": float(values.mean()),
        "std": float(values.std(ddof=1)) if len(values) > 1 else None,
        "mean_ci": mean_interval(values),
        "params": _one([r["params"] for r in runs]),
        "deployable": all(r["deployable"] for r in runs),
        "train_time_s": float(np.mean([r["train_time_s"] for r in runs])),
        "reading": _one([r.get("config", {}).get("reading") for r in runs]),
        "output_dirs": [r.get("output_dir") for r in runs],
    }


def _differ(a: dict, b: dict) -> list[str]:
    return sorted(key for key in a.keys() | b.keys() if a.get(key, _ABSENT) != b.get(key, _ABSENT))


def _show(value) -> str:
    return "–" if value is _ABSENT else value if isinstance(value, str) else json.dumps(value)


def _order(value) -> tuple:
    """Numbers by value (5 before 20), then text, then absent."""
    if is_number(value):
        return 0, value, ""
    return (2, 0, "") if value is _ABSENT else (1, 0, str(value))


def _name(rows: list[dict]) -> None:
    """Rows that share a label get the settings in which they differ, as ``distinct`` and in ``name``:
    'label [key=value]'; ``order`` sorts them by those values."""
    by_label: dict[str, list[dict]] = {}
    for row in rows:
        by_label.setdefault(row["label"], []).append(row)
    for same in by_label.values():
        keys = sorted({key for row in same[1:] for key in _differ(row["settings"], same[0]["settings"])})
        for row in same:
            values = [row["settings"].get(key, _ABSENT) for key in keys]
            row["distinct"] = "[" + ", ".join(f"{k}={_show(v)}" for k, v in zip(keys, values)) + "]" if keys else ""
            row["name"] = f"{row['label']} {row['distinct']}" if keys else row["label"]
            row["order"] = tuple(map(_order, values))


def _problem(row: dict) -> dict:
    return {key: value for key, value in row["settings"].items() if key.startswith(PROBLEM)}


def _reference(row: dict, rows: list[dict]) -> tuple[dict | None, str | None]:
    """The baseline row that ``row`` is compared with (see PROBLEM), or None and, where that needs saying, why."""
    baselines = [r for r in rows if r["method"] == "baseline"]
    if row["method"] == "baseline" or not baselines:
        return None, None
    same = [b for b in baselines if _problem(b) == _problem(row)]
    if len(same) == 1:
        return same[0], None
    if not same:
        why = "; ".join(f"{b['name']} differs in {', '.join(_differ(_problem(b), _problem(row)))}" for b in baselines)
        return None, f"no baseline row has its data.*, model.* and trainer.* settings ({why})"
    apart = ", ".join(sorted({key for b in same[1:] for key in _differ(b["settings"], same[0]["settings"])}))
    names = ", ".join(b["name"] for b in same)
    return None, (f"{len(same)} baseline rows have its data.*, model.* and trainer.* settings "
                  f"({names}; they differ in {apart})")


def _compare(row: dict, rows: list[dict]) -> dict:
    """Δ to the row's baseline; paired only when the seeds match one to one, since pairing removes the seed's noise."""
    ref, note = _reference(row, rows)
    if ref is None:
        return {"delta": None, "ci": None, "ci_kind": None, "reference": None, "note": note}
    a, b = np.array(row["values"]), np.array(ref["values"])
    paired = row["seeds"] == ref["seeds"] and len(set(row["seeds"])) == len(row["seeds"])
    ci = mean_interval(a - b) if paired else _welch(a, b)
    return {"delta": row["mean"] - ref["mean"], "ci": ci, "ci_kind": "paired" if paired else "welch",
            "reference": ref["name"], "note": None}  # fmt: skip


def summarize(results: list[dict], metric: str = "test_acc") -> dict[str, list[dict]]:
    """One row per task and run config (all settings but the seed), baseline rows first, each compared with its
    baseline; metrics named like '*acc*' are fractions shown in %. Raises ValueError on duplicates (see deduplicate)."""
    scale = 100.0 if "acc" in metric else 1.0
    tasks: dict[str, dict[tuple, list[dict]]] = {}
    for run in deduplicate(results):
        tasks.setdefault(run["task"], {}).setdefault(_key(run), []).append(run)
    summary = {}
    for task in sorted(tasks):
        rows = [_row(runs, metric, scale) for runs in tasks[task].values()]
        _name(rows)
        rows.sort(key=lambda r: (r["method"] != "baseline", r["label"], r["order"]))
        summary[task] = [{**row, **_compare(row, rows)} for row in rows]
    return summary


def _header(rows: list[dict]) -> list[str]:
    name = rows[0]["metric"].replace("_", " ")
    return ["method", "k", "n seeds", f"{name} (mean ± std)", "Δ vs baseline [95% CI]", "params", "train time (s)"]


def _cells(row: dict) -> list[str]:
    mean = f"{row['mean']:.2f} ± " + ("–" if row["std"] is None else f"{row['std']:.2f}")
    if row["delta"] is None:
        delta = "–"
    else:
        ci = "[–]" if row["ci"] is None else f"[{row['ci'][0]:+.2f}, {row['ci'][1]:+.2f}]"
        delta = f"{row['delta']:+.2f} {ci}" + (" (Welch)" if row["ci"] and row["ci_kind"] == "welch" else "")
    params = f"{row['params']:,}" if is_number(row["params"]) else str(row["params"])
    return [
        row["name"].replace("|", "\\|"),
        "–" if row["k"] is None else str(row["k"]),
        str(row["n"]),
        mean,
        delta,
        params + ("" if row["deployable"] else " (not deployable)"),
        f"{row['train_time_s']:.1f}",
    ]


def _notes(rows: list[dict]) -> list[str]:
    """Why a row has no Δ, and which baseline each Δ is against when the task has several."""
    baselines = [r["name"] for r in rows if r["method"] == "baseline"]
    if not baselines:
        return ["Note: no baseline row for this task, so no Δ."]
    notes = [f"Note: no Δ for {r['name']}: {r['note']}." for r in rows if r["note"]]
    if len(baselines) > 1:
        for base in baselines:
            against = [r["name"] for r in rows if r["reference"] == base]
            if against:
                notes.append(f"Note: Δ against {base} for: {'; '.join(against)}.")
    return notes


def to_markdown(summary: dict[str, list[dict]]) -> str:
    """A markdown table per task with its notes (see _notes), and one paragraph on how rows and CIs are made."""
    out = []
    for task, rows in summary.items():
        out += [f"## {task}", "", "| " + " | ".join(_header(rows)) + " |", "|---|" + "--:|" * 6]
        out += ["| " + " | ".join(_cells(row)) + " |" for row in rows]
        notes = _notes(rows)
        readings = sorted({row["reading"] for row in rows if isinstance(row["reading"], str)})
        notes += [f"Reading: {reading}" for reading in readings]  # an experiment's own summary (config key `reading`)
        out += ["", *notes, ""] if notes else [""]
    unit = next(iter(summary.values()))[0]["unit"] if summary else ""
    return "\n".join(out + [CI_NOTE.format(unit=", in percentage points" if unit == "%" else "")])


def plot(summary: dict[str, list[dict]], path) -> Figure:
    """Per task, every seed as a dot, the mean with its 95% CI, and each baseline row's mean as a dashed line.
    A CI and the axis stop at the ends of the metric's range (an accuracy's 0 and 100 %): a t-interval of few
    seeds near 100 % reaches far beyond it. Returns the figure written to ``path``."""
    from matplotlib.figure import Figure  # no pyplot: draws with Agg and leaves the caller's backend alone
    from matplotlib.lines import Line2D

    ncols = min(len(summary), 3)
    nrows = math.ceil(len(summary) / ncols)
    most = max(len(rows) for rows in summary.values())
    fig = Figure(figsize=(5.5 * ncols, (0.45 * most + 1.3) * nrows + 0.4), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    methods = sorted({row["method"] for rows in summary.values() for row in rows})
    color = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    for ax, (task, rows) in zip(axes, summary.items()):
        for y, row in enumerate(rows):
            c = color[row["method"]]
            spread = np.linspace(0.12, 0.32, row["n"]) if row["n"] > 1 else [0.22]  # seeds just below their mean
            ax.scatter(row["values"], y + np.asarray(spread), s=16, color=c, alpha=0.6, linewidths=0)
            lo, hi = row["mean_ci"] or (row["mean"], row["mean"])
            if row["bounds"] is not None:
                lo, hi = np.clip([lo, hi], *row["bounds"])
            ax.errorbar(row["mean"], y, xerr=[[row["mean"] - lo], [hi - row["mean"]]], fmt="o", color=c, ms=6,
                        capsize=4, elinewidth=1.5)  # fmt: skip
        for base in (row for row in rows if row["method"] == "baseline"):
            ax.axvline(base["mean"], ls="--", color="0.4", lw=1)
        labels = [row["label"] + (row["distinct"] and "\n" + row["distinct"])
                  + ("" if row["deployable"] else "\n(not deployable)") for row in rows]  # fmt: skip
        ax.set_yticks(range(len(rows)), labels)
        ax.set_ylim(len(rows) - 0.5, -0.5)
        unit = f" ({rows[0]['unit']})" if rows[0]["unit"] else ""
        ax.set_xlabel(rows[0]["metric"].replace("_", " ") + unit)
        ax.set_title(task)
        ax.grid(axis="x", alpha=0.3)
        if rows[0]["bounds"] is not None:
            left, right = ax.get_xlim()
            ax.set_xlim(max(left, rows[0]["bounds"][0]), min(right, rows[0]["bounds"][1]))
    for ax in axes[len(summary) :]:
        ax.set_visible(False)
    handles = [
        Line2D([], [], ls="", marker="o", ms=4, color="0.3", alpha=0.6, label="one seed"),
        Line2D([], [], ls="-", marker="o", ms=6, color="0.3", label="mean ± 95% CI"),
        Line2D([], [], ls="--", color="0.4", label="baseline mean"),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=3, frameon=False)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig


def _curve(output_dir: str | None) -> list[tuple[int, float, float]]:
    """(epoch, seconds, val/acc) of each validation of a run, from its CSV metrics (``logger=csv``, or ``wandb``, which
    writes them too); empty when it has none. Seconds: ``time/train_s``, NaN where it was not logged."""
    rows = []
    for path in sorted(Path(output_dir).glob("csv/version_*/metrics.csv"))[-1:] if output_dir else []:
        with open(path, encoding="utf-8") as fh:
            for r in csv.DictReader(fh):
                if r.get("val/acc"):
                    rows.append((int(r["epoch"]), float(r.get("time/train_s") or "nan"), float(r["val/acc"])))
    return rows


def plot_curves(summary: dict[str, list[dict]], path) -> Figure | None:
    """Per task, each row's validation accuracy against epoch and against training seconds, the mean over its seeds
    (over the seeds that reached an epoch, under early stopping); None (and no file) when no run logged CSV metrics."""
    from matplotlib.figure import Figure

    curves = {task: [(row, [_curve(folder) for folder in row["output_dirs"]]) for row in rows] for task, rows in summary.items()}
    curves = {task: [(row, [c for c in cs if c]) for row, cs in rows] for task, rows in curves.items()}
    curves = {task: [(row, cs) for row, cs in rows if cs] for task, rows in curves.items()}
    curves = {task: rows for task, rows in curves.items() if rows}
    if not curves:
        return None
    fig = Figure(figsize=(11, 3.6 * len(curves)), layout="constrained")
    axes = fig.subplots(len(curves), 2, squeeze=False)
    for (ax_epoch, ax_time), (task, rows) in zip(axes, curves.items()):
        for i, (row, runs) in enumerate(rows):
            by_epoch: dict[int, list[tuple[float, float]]] = {}
            for run in runs:
                for epoch, seconds, acc in run:
                    by_epoch.setdefault(epoch, []).append((seconds, acc))
            epochs = sorted(by_epoch)
            acc = [100 * np.mean([a for _, a in by_epoch[e]]) for e in epochs]
            seconds = [np.mean([t for t, _ in by_epoch[e]]) for e in epochs]
            label = row["label"] + (row["distinct"] and f" ({row['distinct']})")
            ax_epoch.plot(epochs, acc, color=f"C{i % 10}", lw=1.2, label=label)
            ax_time.plot(seconds, acc, color=f"C{i % 10}", lw=1.2)
        ax_epoch.set(title=task, xlabel="epoch", ylabel="validation accuracy (%)")
        ax_time.set(title=task, xlabel="training seconds (validation included)")
        ax_epoch.legend(fontsize=7, frameon=False)
        for ax in (ax_epoch, ax_time):
            ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return fig


def write_runs_csv(results: list[dict], path, summary: dict[str, list[dict]] | None = None) -> None:
    """One row per run with every field any run has; nested values as JSON. Given the summary, a first column
    ``row`` names the table row each run is a seed of, to select a row's runs."""
    names = {row["key"]: row["name"] for rows in (summary or {}).values() for row in rows}
    runs = [{"row": names.get(_key(run), ""), **run} if summary else run for run in results]
    fields = list(dict.fromkeys(key for run in runs for key in run))
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for run in runs:
            writer.writerow({k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in run.items()})


def log_to_wandb(summary: dict[str, list[dict]], png_path, run=None) -> None:
    """Log each task's table (``report/<task>``) and the plot (``report/plot``) to ``run``, or to a new offline run
    next to the PNG. wandb is imported here so that importing the package stays light."""
    import wandb

    own = run is None
    if own:
        run = wandb.init(mode="offline", dir=str(Path(png_path).parent), project="lightning_mk", job_type="report")
    try:
        data = {f"report/{task}": wandb.Table(columns=_header(rows), data=[_cells(r) for r in rows])
                for task, rows in summary.items()}  # fmt: skip
        run.log({**data, "report/plot": wandb.Image(str(png_path))})
    finally:
        if own:
            wandb.finish()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_mk.experiments.report",
        description="Markdown tables, a plot and a CSV of the runs in results.jsonl files (single runs or multiruns).",
    )
    parser.add_argument("paths", nargs="+", type=Path, metavar="DIR_OR_FILE",
                        help="folders searched recursively for results.jsonl, or .jsonl files")  # fmt: skip
    parser.add_argument("--out", type=Path, help="output folder (default: the first DIR, or the file's folder)")
    parser.add_argument("--metric", default="test_acc", help="numeric field to compare (default: test_acc)")
    parser.add_argument("--wandb", action="store_true", help="also log tables and plot to an offline W&B run in OUT")
    parser.add_argument("--dedup", action="store_true",
                        help="keep the first of runs with the same task, config and seed, with a warning naming the "
                             "dropped one (default: stop with an error)")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        results = deduplicate(load_results(args.paths, metric=args.metric), drop=args.dedup)
    except (OSError, ValueError) as err:
        parser.exit(1, f"error: {err}\n")
    first = args.paths[0]
    out = args.out or (first if first.is_dir() else first.parent)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(results, args.metric)
    markdown = to_markdown(summary)
    print(markdown)
    (out / "report.md").write_text(markdown + "\n", encoding="utf-8")
    plot(summary, out / "report.png")
    curves = plot_curves(summary, out / "curves.png") is not None
    write_runs_csv(results, out / "runs.csv", summary)
    if args.wandb:
        log_to_wandb(summary, out / "report.png")
    wrote = [out / "report.md", out / "report.png", *([out / "curves.png"] if curves else []), out / "runs.csv"]
    print(f"wrote {', '.join(map(str, wrote))}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
