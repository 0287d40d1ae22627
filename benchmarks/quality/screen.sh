#!/usr/bin/env bash
# Screening of candidate settings for the callback's default, before the full table (blind.sh): 2 seeds (100, 101),
# scored on validation accuracy, at plain training's tuned learning rate of each task.
#
#   bash benchmarks/quality/screen.sh            # raw runs: runs/quality/screen/<task>/<setting>/s<seed>/
#   python benchmarks/quality/screen_table.py runs/quality/screen > benchmarks/results/quality/blind/screening.md
set -euo pipefail
cd "$(dirname "$0")/../.."
D=runs/quality/screen
run() { python -m lightning_mk.experiments.run -m logger=csv seed=100,101 hydra/launcher=joblib hydra.launcher.n_jobs=2 "$@"; }
declare -A TASK=(
  [mlp]="experiment=mnist1d_mlp trainer.max_epochs=100 optimizer=sgd optimizer.lr=0.1"
  [cnn]="experiment=mnist1d_cnn optimizer.lr=0.1"
  [tr]="experiment=mnist1d_transformer optimizer.lr=3e-3"
  [cnnof]="experiment=mnist1d_cnn_overfit optimizer.lr=0.1"
  [trof]="experiment=mnist1d_transformer_overfit optimizer.lr=3e-3"
)
mk="method=mk_published method.callback"
SETTINGS=(  # name|tasks|overrides
  "plain|mlp cnn tr cnnof trof|method=baseline"
  "copies|mlp cnnof|method=mk_published"
  "plain_wd|mlp|method=baseline optimizer.weight_decay=5e-4"
  "dec_sel_0.3|mlp cnn tr|$mk.form=decoupled $mk.noise=0.3"
  "dec_gap_1_wd|mlp|$mk.form=decoupled $mk.noise=1.0 $mk.monitor=val/loss optimizer.weight_decay=5e-4"
  "rel_0.05|mlp cnn tr|$mk.form=relative $mk.noise=0.05"
  "rel_0.1|mlp cnn tr|$mk.form=relative $mk.noise=0.1"
  "rel_0.2|mlp cnn tr|$mk.form=relative $mk.noise=0.2"
  "relz_0.3|mlp|$mk.form=relative $mk.init_noise=1e-3 $mk.noise=0.3"
  "gap_0.2|mlp cnn tr|$mk.form=relative $mk.noise=0.2 $mk.monitor=val/loss"
  "gap_0.3|mlp cnn tr cnnof|$mk.form=relative $mk.noise=0.3 $mk.monitor=val/loss"
  "gap_0.3_wd|mlp|$mk.form=relative $mk.noise=0.3 $mk.monitor=val/loss optimizer.weight_decay=5e-4"
  "gapd5e-3|mlp cnn tr|$mk.form=relative $mk.noise=0.3 $mk.monitor=val/loss $mk.decay=5e-3"
  "gapd5e-4|mlp cnn tr cnnof trof|method=mk"
)
for entry in "${SETTINGS[@]}"; do
  IFS='|' read -r name tasks overrides <<< "$entry"
  for t in $tasks; do
    run ${TASK[$t]} $overrides hydra.sweep.dir=$D/$t/$name 'hydra.sweep.subdir=s${seed}'
  done
done
