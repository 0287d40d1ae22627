"""The screening's table: ``python benchmarks/quality/screen_table.py runs/quality/screen``, one row per task and setting
(``<task>/<setting>/s<seed>/results.jsonl``): validation and test accuracy (%) per seed and their mean, train-mode accuracy."""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

runs: dict[tuple[str, str], dict[str, dict]] = defaultdict(dict)
for path in sorted(Path(sys.argv[1]).glob("*/*/s*/results.jsonl")):
    task, setting, seed = path.parts[-4:-1]
    runs[task, setting][seed] = json.loads(path.read_text().splitlines()[0])
print("| task | setting | val (mean) | val per seed | test (mean) | train-mode acc |")
print("| --- | --- | --: | --- | --: | --: |")
for (task, setting), seeds in sorted(runs.items()):
    rows = [seeds[s] for s in sorted(seeds)]
    val = [100 * r["val_acc"] for r in rows]
    test = [100 * r["test_acc"] for r in rows]
    train = [100 * (r.get("train_acc") or 0) for r in rows]
    print(f"| {task} | {setting} | {statistics.fmean(val):.2f} | {', '.join(f'{v:.1f}' for v in val)} "
          f"| {statistics.fmean(test):.2f} | {statistics.fmean(train):.1f} |")
