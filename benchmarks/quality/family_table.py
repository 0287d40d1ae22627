"""The re-parametrisation family (DO-Conv, ExpandNets) head to head with plain training, MK's default, the tuned
regulariser and EMA, from the raw runs of ``family.sh`` and the committed runs of ``blind.sh``:

    python benchmarks/quality/family_table.py runs/quality/family benchmarks/results/quality/blind \
        --out benchmarks/results/quality/family

writes ``summary.md`` (one table per protocol: each method's mean test accuracy over seeds and its difference to
plain training, paired by seed, with the 95 % t-interval; then, per family member, the tasks where that interval
lies above zero) and ``runs.csv`` (every family run, its config and output folder).
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

from blind_table import paired_cell

from lightning_mk.experiments.report import load_results, write_runs_csv

BLIND = {"baseline": "plain", "mk": "MK default", "baseline_reg": "dropout + wd", "ema": "EMA"}
FAMILY = {"doconv": "DO-Conv", "expand": "ExpandNets (k=4)"}
CONVOLUTIONAL = ("mnist1d_cnn", "mnist1d_cnn_overfit", "mnist1d_resnet", "digits_resnet")


def _add(by_seed: dict[int, dict], seed: int, run: dict, where: Path) -> None:
    """One run per method, seed and protocol: a second (another setting, a rerun left beside the first) would be
    pooled or silently replace the first."""
    if seed in by_seed:
        raise SystemExit(f"{where}: two runs of one method for seed {seed}; keep one")
    by_seed[seed] = run


def _blind_runs(root: Path) -> dict[tuple[str, str], dict[str, dict[int, dict]]]:
    """(task, protocol) -> method -> seed -> run, from blind.sh's committed ``<task>/runs.csv``."""
    runs: dict = defaultdict(lambda: defaultdict(dict))
    for path in sorted(root.glob("*/runs.csv")):
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                if row["method"] in BLIND:
                    protocol = "converge" if row["task"].endswith(", converge") else "equal"
                    _add(runs[path.parent.name, protocol][row["method"]], int(row["seed"]), {"test_acc": float(row["test_acc"])}, path)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("family", type=Path, help="family.sh's runs: <task>/<protocol>/<method>/<seed>/results.jsonl")
    parser.add_argument("blind", type=Path, help="blind.sh's committed tables: <task>/runs.csv")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    runs = _blind_runs(args.blind)
    everything = []
    for task_dir in sorted(p for p in args.family.iterdir() if p.is_dir()):
        for protocol in ("equal", "converge"):
            if any((task_dir / protocol).glob("**/results.jsonl")):
                for run in load_results([task_dir / protocol]):
                    _add(runs[task_dir.name, protocol][run["method"]], run["seed"], run, task_dir / protocol)
                    everything.append(run)
    lines, above = [], defaultdict(list)
    for protocol in ("equal", "converge"):
        tasks = sorted(task for (task, p) in runs if p == protocol)
        lines += [f"## Protocol: {protocol}", "",
                  "Test accuracy (%), mean over seeds; in brackets the difference to plain, paired by seed, with its 95 % "
                  "interval; – where the method does not apply (DO-Conv needs convolutions with several taps).", "",
                  "| task | seeds | " + " | ".join([*BLIND.values(), *FAMILY.values()]) + " |",
                  "| --- | --: |" + " --: |" * (len(BLIND) + len(FAMILY))]
        for task in tasks:
            by = runs[task, protocol]
            plain = by["baseline"]
            cells = []
            for method in [*BLIND, *FAMILY]:
                if not by.get(method):
                    cells.append("–")
                    continue
                cell, _, interval = paired_cell(by[method], None if method == "baseline" else plain)
                if method in FAMILY and interval and interval[0] > 0:
                    above[method].append(f"{task} ({protocol})")
                cells.append(cell)
            lines.append(f"| {task} | {len(plain)} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Where a member of the family beats plain training (95 % interval above zero)", ""]
    for method, name in FAMILY.items():
        won = above.get(method, [])
        conv = [w for w in won if w.split(" (")[0] in CONVOLUTIONAL]
        lines.append(f"- {name}: {', '.join(won) or 'nowhere'}" + ("" if conv or not won else " (no convolutional task)"))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    write_runs_csv(everything, args.out / "runs.csv")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
