"""Print the Hydra overrides of the best setting of one method in a tuning sweep, by mean validation accuracy.

    python benchmarks/quality/best_setting.py SWEEP_DIR METHOD [--keys optimizer.lr ...]

A setting is a run's overrides (``.hydra/overrides.yaml``) restricted to ``--keys``; its score is the mean
``val_acc`` over the seeds it ran with. Test accuracy is never looked at, so the final runs' test accuracy is
an unbiased estimate for the setting chosen here.
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from pathlib import Path

import yaml

from lightning_mk.experiments.report import load_results


def best_setting(sweep: Path, method: str, keys: list[str]) -> list[str]:
    scores = defaultdict(list)
    for run in load_results(sweep, metric="val_acc"):
        if run["method"] != method:
            continue
        overrides = yaml.safe_load((Path(run["output_dir"]) / ".hydra" / "overrides.yaml").read_text())
        setting = tuple(o for o in overrides if o.split("=", 1)[0] in keys)
        scores[setting].append(run["val_acc"])
    if not scores:
        raise SystemExit(f"no runs of method {method!r} under {sweep}")
    return list(max(scores, key=lambda s: statistics.fmean(scores[s])))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path)
    parser.add_argument("method")
    parser.add_argument("--keys", nargs="+", default=["optimizer.lr", "method.dropout", "method.weight_decay"])
    args = parser.parse_args()
    print(" ".join(best_setting(args.sweep, args.method, args.keys)))
