"""The default against plain training on every task and both protocols, from the raw runs of ``blind.sh``:

    python benchmarks/quality/blind_table.py runs/quality/blind > benchmarks/results/quality/blind/summary.md

One table per protocol: per task, each method's mean test accuracy over seeds and its difference to plain
training with the paired 95 % t-interval over seeds; the converge protocol adds the mean epochs to the best
validation epoch (SWA, without early stopping, deploys its final average). Then the default rule, checked for MK's default and MK + EMA: (a) no task more than 0.5 points below plain under either
protocol, (b) an interval above zero on the overfitting tasks of at least two of the three families.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from lightning_mk.experiments.report import load_results, mean_interval

METHODS = {
    "baseline": "plain",
    "mk": "MK default",
    "mk_published": "MK as published",
    "ema": "EMA",
    "mk_ema": "MK + EMA",
    "swa": "SWA",
    "baseline_reg": "dropout + wd",
    "distill": "distillation (tuned, wide teacher)",
    "wide": "wide (4x, not deployable)",
}
CANDIDATES = ("mk", "mk_ema")  # checked against the rule (MK + EMA with EMA's decay tuned per task)
FAMILY = {"mnist1d_mlp": "MLP", "mnist1d_cnn_overfit": "CNN", "mnist1d_transformer_overfit": "Transformer"}  # overfitting tasks


def paired_cell(runs: dict[int, dict], plain: dict[int, dict] | None) -> tuple[str, float | None, tuple | None]:
    """Mean test accuracy (%) of ``runs`` (seed -> run) and, against ``plain``, the mean difference paired by seed
    with its 95 % interval: the table's cell, the difference and the interval (None without two pairs)."""
    seeds = sorted(runs)
    cell = f"{np.mean([100 * runs[s]['test_acc'] for s in seeds]):.2f}"
    paired = [s for s in seeds if plain and s in plain]
    if len(paired) < 2:
        return cell, None, None
    diff = np.array([100 * (runs[s]["test_acc"] - plain[s]["test_acc"]) for s in paired])
    interval = mean_interval(diff)
    return cell + f" ({diff.mean():+.2f} [{interval[0]:+.2f}, {interval[1]:+.2f}])", float(diff.mean()), interval


def main(root: Path) -> None:
    runs: dict[tuple[str, str], dict[str, dict[int, dict]]] = defaultdict(lambda: defaultdict(dict))
    for task_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for protocol in ("equal", "converge"):
            if any((task_dir / protocol).glob("**/results.jsonl")):  # a task still running may have none yet
                for run in load_results([task_dir / protocol]):
                    runs[task_dir.name, protocol][run["method"]][run["seed"]] = run
    verdict = defaultdict(lambda: defaultdict(dict))
    for protocol in ("equal", "converge"):
        tasks = [task for (task, p) in runs if p == protocol]
        methods = [m for m in METHODS if any(m in runs[t, protocol] for t in tasks)]
        print(f"\n## Protocol: {protocol}\n")
        print("Test accuracy (%), mean over seeds; in brackets the difference to plain, paired by seed, with its 95 % interval."
              + (" Epochs: mean epoch of the deployed (best validation) model; SWA trains all 3x epochs without early stopping and deploys its average." if protocol == "converge" else ""))
        print()
        print("| task | seeds | " + " | ".join(METHODS[m] for m in methods) + (" | epochs (plain / MK default) |" if protocol == "converge" else " |"))
        print("| --- | --: |" + " --: |" * len(methods) + (" --: |" if protocol == "converge" else ""))
        for task in tasks:
            by = runs[task, protocol]
            plain = by.get("baseline", {})
            cells = []
            for m in methods:
                seeds = sorted(by.get(m, {}))
                if not seeds:
                    cells.append("–")
                    continue
                cell, diff, interval = paired_cell(by[m], None if m == "baseline" else plain)
                if m in CANDIDATES and diff is not None:
                    verdict[m][task][protocol] = (diff, interval)
                cells.append(cell)
            n = len(plain)
            extra = ""
            if protocol == "converge":
                epochs = [np.mean([r.get("best_epoch", np.nan) for r in by.get(m, {}).values()]) for m in ("baseline", "mk")]
                extra = f" {epochs[0]:.0f} / {epochs[1]:.0f} |"
            print(f"| {task} | {n} | " + " | ".join(cells) + " |" + extra)
    print("\n## The rule for the default, checked\n")
    for m, by_task in verdict.items():
        worst = min((d, t, p) for t, ps in by_task.items() for p, (d, _) in ps.items())
        print(f"{METHODS[m]}: (a) no worse than plain - 0.5 points on every task under both protocols: "
              f"{'met' if worst[0] >= -0.5 else 'NOT met'} (lowest: {worst[0]:+.2f} on {worst[1]}, {worst[2]}).")
        above = sorted({FAMILY[t] for t, ps in by_task.items() if t in FAMILY for p, (d, i) in ps.items() if i and i[0] > 0})
        print(f"(b) an interval above zero on the overfitting tasks of at least two of the three families: "
              f"{'met' if len(above) >= 2 else 'NOT met'} (families with one: {', '.join(above) or 'none'}).\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
