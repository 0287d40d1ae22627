"""New runs of a study part against the committed rows of the same tasks, paired by seed.

    python benchmarks/quality/paired.py RUNS_DIR [--runs final] --against METHOD [--also METHOD ...] [--committed CSV ...] --out DIR

``RUNS_DIR/<experiment>[/<runs>]`` holds new runs of one task (``<experiment>`` names its committed results,
``benchmarks/results/quality/<experiment>/runs.csv``; ``--committed``: the rows of these files instead, matched by task). For every task and every label among the new runs:
mean test and train-mode accuracy over seeds, and new - committed METHOD with its paired 95 % t-interval
over the seeds both have; ``--also`` adds the committed mean test accuracy of other methods for context.
Writes ``report.md`` and the new runs' ``runs.csv`` to DIR.
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

import numpy as np

from lightning_mk.experiments.report import mean_interval, load_results, write_runs_csv

RESULTS = Path(__file__).resolve().parents[1] / "results" / "quality"


def committed(task: str, methods: list[str], files: list[Path], name: str) -> dict[str, dict[int, dict]]:
    """method -> seed -> its committed row, for ``methods``: from the task's ``runs.csv``, or from ``files`` the rows
    of the task called ``name``; an error where a method has several rows for one seed (several settings, e.g.
    submodular with and without fine-tuning): they must not be pooled."""
    rows: dict[str, dict[int, dict]] = {method: {} for method in methods}
    for path in files or [RESULTS / task / "runs.csv"]:
        with open(path) as f:
            found = [r for r in csv.DictReader(f) if not files or r["task"] == name]
        for r in found:
            if r["method"] in rows:
                if int(r["seed"]) in rows[r["method"]]:
                    raise SystemExit(f"{task}: method {r['method']!r} has several committed rows for seed {r['seed']}")
                rows[r["method"]][int(r["seed"])] = r
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--runs", default="", help="sub-folder of each task holding the runs to compare")
    parser.add_argument("--against", required=True)
    parser.add_argument("--also", nargs="*", default=[])
    parser.add_argument("--committed", nargs="*", type=Path, default=[], help="runs.csv files holding the rows to compare with")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    also = "".join(f" {m}, committed |" for m in args.also)
    lines = [
        f"# `{args.root.name}`: new runs against the committed `{args.against}` rows",
        "",
        f"Accuracy in %, mean over seeds; new - {args.against} with its paired 95 % t-interval over the seeds both have.",
        "",
        f"| task | new runs | seeds | test | train (train mode) | {args.against}, committed | new - {args.against} [95 % CI] |{also}",
        "|---|---|--:|--:|--:|--:|--:|" + "--:|" * len(args.also),
    ]
    everything = []
    for task_dir in sorted(p for p in args.root.iterdir() if p.is_dir()):
        runs = load_results([task_dir / args.runs])
        old = committed(task_dir.name, [args.against, *args.also], args.committed, runs[0]["task"])
        everything += runs
        by_label = defaultdict(dict)
        for r in runs:
            same = by_label[r["label"]]
            if int(r["seed"]) in same or any(other["config"] != r["config"] for other in same.values()):
                raise SystemExit(f"{task_dir}: runs labelled {r['label']!r} differ by more than the seed")
            same[int(r["seed"])] = r
        for label, new in sorted(by_label.items()):
            seeds = sorted(set(new) & set(old[args.against]))
            test = np.array([new[s]["test_acc"] for s in sorted(new)]) * 100
            train = np.array([new[s]["train_acc"] for s in sorted(new)]) * 100
            base = np.array([float(old[args.against][s]["test_acc"]) for s in seeds]) * 100
            diff = np.array([new[s]["test_acc"] for s in seeds]) * 100 - base
            ci = mean_interval(diff)
            shown = f"{diff.mean():+.2f} [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else "–"
            context = "".join(
                f" {np.mean([float(r['test_acc']) for r in old[m].values()]) * 100:.2f} |" for m in args.also
            )
            lines.append(
                f"| {runs[0]['task']} | {label} | {len(new)} | {test.mean():.2f} ± {test.std(ddof=1):.2f} | {train.mean():.2f} "
                f"| {base.mean():.2f} | {shown} |{context}"
            )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.md").write_text("\n".join(lines) + "\n")
    write_runs_csv(everything, args.out / "runs.csv")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
