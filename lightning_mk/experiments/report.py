"""Tables and a plot of finished runs: ``python -m lightning_mk.experiments.report DIR_OR_FILE... [--out DIR] [--metric test_acc]``.

Reads every ``results.jsonl`` (one JSON object per run) under the given folders, e.g. a Hydra multirun, and
compares each label of a task with its baseline through a 95% CI, so that a gain is not read off a single seed.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

import numpy as np
from scipy import stats

REQUIRED = ("task", "method", "label", "k", "seed", "test_acc", "params", "deployable", "train_time_s", "latency_ms")
NUMERIC = ("test_acc", "params", "train_time_s", "latency_ms")
CI_NOTE = (
    "Δ: difference of means to the baseline row{unit}. 95% CI: paired t-interval on the per-seed differences when "
    "both rows have the same seeds, otherwise Welch's t-interval (marked); quantiles from scipy.stats.t; "
    "– where not computable (fewer than 2 seeds). Train time: mean over seeds; latency: median over seeds."
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
    """All runs in the ``results.jsonl`` files under ``paths`` (folders are searched recursively, files read as is).

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
                missing = [field for field in required if field not in run]
                if missing:
                    raise ValueError(f"{where}: missing field {', '.join(map(repr, missing))}")
                bad = [f for f in (*NUMERIC, metric) if not is_number(run[f])]
                if bad:
                    raise ValueError(f"{where}: field {bad[0]!r} is not a number: {run[bad[0]]!r}")
                runs.append(run)
    if not runs:
        raise FileNotFoundError(f"no results found: no runs in a results.jsonl under {', '.join(map(str, paths))}")
    return runs


def _t_interval(x: np.ndarray) -> tuple[float, float] | None:
    """95% t-interval of the mean of ``x``; None below 2 values."""
    if len(x) < 2:
        return None
    half = stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return float(x.mean() - half), float(x.mean() + half)


def _welch(a: np.ndarray, b: np.ndarray) -> tuple[float, float] | None:
    """95% Welch interval of mean(a) - mean(b); None when a side has fewer than 2 values."""
    if len(a) < 2 or len(b) < 2:
        return None
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    d = a.mean() - b.mean()
    if va + vb == 0:
        return float(d), float(d)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = stats.t.ppf(0.975, df) * math.sqrt(va + vb)
    return float(d - half), float(d + half)


def _one(values: list):
    """The value shared by all seeds, or the distinct values joined by '/' when seeds disagree."""
    distinct = sorted(set(values), key=str)
    return distinct[0] if len(distinct) == 1 else "/".join(map(str, distinct))


def _row(label: str, runs: list[dict], metric: str, scale: float) -> dict:
    runs = sorted(runs, key=lambda r: r["seed"])
    values = np.array([r[metric] for r in runs], dtype=float) * scale
    return {
        "label": label,
        "method": runs[0]["method"],
        "metric": metric,
        "unit": "%" if scale == 100 else "",
        "k": _one([r["k"] for r in runs]),
        "seeds": [r["seed"] for r in runs],
        "values": values.tolist(),
        "n": len(values),
        "mean": float(values.mean()),
        "std": float(values.std(ddof=1)) if len(values) > 1 else None,
        "mean_ci": _t_interval(values),
        "params": _one([r["params"] for r in runs]),
        "deployable": all(r["deployable"] for r in runs),
        "train_time_s": float(np.mean([r["train_time_s"] for r in runs])),
        "latency_ms": float(np.median([r["latency_ms"] for r in runs])),
    }


def _compare(row: dict, ref: dict | None) -> dict:
    """Δ to the baseline; paired only when the seeds match one to one, since pairing removes the seed's noise."""
    if ref is None or row is ref:
        return {"delta": None, "ci": None, "ci_kind": None}
    a, b = np.array(row["values"]), np.array(ref["values"])
    paired = row["seeds"] == ref["seeds"] and len(set(row["seeds"])) == len(row["seeds"])
    ci = _t_interval(a - b) if paired else _welch(a, b)
    return {"delta": row["mean"] - ref["mean"], "ci": ci, "ci_kind": "paired" if paired else "welch"}


def summarize(results: list[dict], metric: str = "test_acc") -> dict[str, list[dict]]:
    """One row per label and task, the baseline first; metrics named like '*acc*' are fractions shown in %."""
    scale = 100.0 if "acc" in metric else 1.0
    tasks: dict[str, dict[str, list[dict]]] = {}
    for run in results:
        tasks.setdefault(run["task"], {}).setdefault(run["label"], []).append(run)
    summary = {}
    for task in sorted(tasks):
        rows = sorted((_row(label, runs, metric, scale) for label, runs in tasks[task].items()), key=lambda r: r["label"])
        ref = next((r for r in rows if r["method"] == "baseline"), None)
        rows.sort(key=lambda r: r is not ref)
        summary[task] = [{**row, **_compare(row, ref)} for row in rows]
    return summary


def _reference(rows: list[dict]) -> dict | None:
    return rows[0] if rows and rows[0]["method"] == "baseline" else None


def _header(rows: list[dict]) -> list[str]:
    name = rows[0]["metric"].replace("_", " ")
    return ["method", "k", "n seeds", f"{name} (mean ± std)", "Δ vs baseline [95% CI]", "params", "train time (s)",
            "latency (ms)"]  # fmt: skip


def _cells(row: dict) -> list[str]:
    mean = f"{row['mean']:.2f} ± " + ("–" if row["std"] is None else f"{row['std']:.2f}")
    if row["delta"] is None:
        delta = "–"
    else:
        ci = "[–]" if row["ci"] is None else f"[{row['ci'][0]:+.2f}, {row['ci'][1]:+.2f}]"
        delta = f"{row['delta']:+.2f} {ci}" + (" (Welch)" if row["ci"] and row["ci_kind"] == "welch" else "")
    params = f"{row['params']:,}" if is_number(row["params"]) else str(row["params"])
    return [
        row["label"].replace("|", "\\|"),
        "–" if row["k"] is None else str(row["k"]),
        str(row["n"]),
        mean,
        delta,
        params + ("" if row["deployable"] else " (not deployable)"),
        f"{row['train_time_s']:.1f}",
        f"{row['latency_ms']:.3f}",
    ]


def to_markdown(summary: dict[str, list[dict]]) -> str:
    """A markdown table per task and one line on how the CIs are computed."""
    out = []
    for task, rows in summary.items():
        out += [f"## {task}", "", "| " + " | ".join(_header(rows)) + " |", "|---|" + "--:|" * 7]
        out += ["| " + " | ".join(_cells(row)) + " |" for row in rows]
        out.append("")
    unit = next(iter(summary.values()))[0]["unit"] if summary else ""
    return "\n".join(out + [CI_NOTE.format(unit=", in percentage points" if unit == "%" else "")])


def plot(summary: dict[str, list[dict]], path) -> None:
    """Per task, every seed as a dot, the mean with its 95% CI, and the baseline mean as a dashed line."""
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
            ax.errorbar(row["mean"], y, xerr=[[row["mean"] - lo], [hi - row["mean"]]], fmt="o", color=c, ms=6,
                        capsize=4, elinewidth=1.5)  # fmt: skip
        if ref := _reference(rows):
            ax.axvline(ref["mean"], ls="--", color="0.4", lw=1)
        labels = [row["label"] + ("" if row["deployable"] else "\n(not deployable)") for row in rows]
        ax.set_yticks(range(len(rows)), labels)
        ax.set_ylim(len(rows) - 0.5, -0.5)
        unit = f" ({rows[0]['unit']})" if rows[0]["unit"] else ""
        ax.set_xlabel(rows[0]["metric"].replace("_", " ") + unit)
        ax.set_title(task)
        ax.grid(axis="x", alpha=0.3)
    for ax in axes[len(summary) :]:
        ax.set_visible(False)
    handles = [
        Line2D([], [], ls="", marker="o", ms=4, color="0.3", alpha=0.6, label="one seed"),
        Line2D([], [], ls="-", marker="o", ms=6, color="0.3", label="mean ± 95% CI"),
        Line2D([], [], ls="--", color="0.4", label="baseline mean"),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=3, frameon=False)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def write_runs_csv(results: list[dict], path) -> None:
    """One row per run with every field any run has; nested values as JSON."""
    fields = list(dict.fromkeys(key for run in results for key in run))
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for run in results:
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
    args = parser.parse_args(argv)
    try:
        results = load_results(args.paths, metric=args.metric)
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
    write_runs_csv(results, out / "runs.csv")
    if args.wandb:
        log_to_wandb(summary, out / "report.png")
    print(f"wrote {out / 'report.md'}, {out / 'report.png'}, {out / 'runs.csv'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
