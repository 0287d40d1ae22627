#!/usr/bin/env bash
# The callback's default against plain training and the reviewer's baselines, on the six study tasks and the two
# overfitting variants, under two protocols:
#   equal:    the task's epochs, seeds 0-4;
#   converge: 3x the epochs with early stopping on validation accuracy (patience 10), deploying the best
#             validation epoch (its test accuracy, and the epochs taken, in each run's results), seeds 0-2.
# Every method runs at plain training's tuned learning rate of the task (benchmarks/results/quality/<task>/tuning;
# an overfitting variant takes its parent task's), except MK as published, at its own tuned rate. The tuned
# regulariser takes the committed tuning's dropout and weight decay; EMA's decay (0.99 or 0.999) is tuned here on
# validation accuracy (seeds 100, 101). The default MK runs with no option set (`method=mk`: the callback's
# defaults); MK as published is `method=mk_published` (MajorityKernelCallback.published()).
#
# MK + EMA takes EMA's tuned decay; the k-times-wider model plain training's learning rate; SWA (Lightning's
# StochasticWeightAveraging, from 75 % of the epochs, equal protocol only: early stopping would deploy a checkpoint
# from before the average) its annealing rate, half or a tenth of plain's, tuned like EMA's decay.
#
#   bash benchmarks/quality/blind.sh [TASK...]        # raw runs: runs/quality/blind/<task>/; tables: benchmarks/results/quality/blind/
#   METHODS="mk_ema wide" bash benchmarks/quality/blind.sh   # only those columns (plain ema published reg swa mk_ema wide)
set -euo pipefail
cd "$(dirname "$0")/../.."
run() { python -m lightning_mk.experiments.run -m logger=csv hydra/launcher=joblib hydra.launcher.n_jobs=2 "$@"; }
best() { python benchmarks/quality/best_setting.py "$@"; }
# experiment|epochs|plain lr|published MK's lr|regulariser (dropout, weight decay)|extra overrides
TASKS=("mnist1d_mlp|100|0.1|0.2|0.1 1e-4|optimizer=sgd"
       "mnist1d_cnn_overfit|100|0.1|0.03|0.3 1e-3|"
       "mnist1d_transformer_overfit|150|0.003|0.001|0.1 1e-4|"
       "mnist1d_cnn|40|0.1|0.03|0.3 1e-3|"
       "mnist1d_transformer|20|0.003|0.001|0.1 1e-4|"
       "mnist1d_resnet|15|0.003|0.01|0.1 1e-3|"
       "digits_resnet|20|0.01|0.003|0.1 1e-4|"
       "mnist1d_mlp_large|10|0.01|0.01|0.1 1e-4|")
METHODS=${METHODS:-plain ema published reg swa mk_ema wide}  # the columns to (re)run; the others' runs are kept
has() { [[ " $METHODS " == *" $1 "* ]]; }
for entry in "${TASKS[@]}"; do
  IFS='|' read -r exp epochs lr mk_lr reg extra <<< "$entry"
  [[ $# -eq 0 || " $* " == *" $exp "* ]] || continue
  d=runs/quality/blind/$exp
  read -r dropout wd <<< "$reg"
  task=(experiment=$exp trainer.max_epochs=$epochs $extra "task='$exp'")
  if has ema || [ ! -d $d/tune ]; then
    rm -rf $d/tune
    run hydra.sweep.dir=$d/tune "${task[@]}" optimizer.lr=$lr method=ema method.callback.decay=0.99,0.999 seed=100,101
  fi
  decay=$(best $d/tune ema --keys method.callback.decay)
  if has swa; then  # SWA's learning rate: half or a tenth of the task's
    rm -rf $d/tune_swa
    run hydra.sweep.dir=$d/tune_swa "${task[@]}" optimizer.lr=$lr method=swa seed=100,101 \
      method.callback.swa_lrs=$(python -c "print($lr / 2)"),$(python -c "print($lr / 10)")
    swa_lr=$(best $d/tune_swa swa --keys method.callback.swa_lrs)
  fi
  for protocol in equal converge; do
    if [ $protocol = equal ]; then
      p=("${task[@]}") seeds=seed=0,1,2,3,4
    else
      p=(experiment=$exp trainer.max_epochs=$((3 * epochs)) early_stopping=10 $extra "task='$exp, converge'") seeds=seed=0,1,2
    fi
    each=hydra.sweep.subdir=\${method.name}-\${hydra.job.num}
    sweep() { rm -rf $d/$protocol/$1; run hydra.sweep.dir=$d/$protocol/$1 "${p[@]}" $seeds "${@:2}" $each; }
    if has plain; then sweep plain optimizer.lr=$lr method=baseline,mk; fi
    if has ema; then sweep ema optimizer.lr=$lr method=ema $decay; fi
    if has published; then sweep published optimizer.lr=$mk_lr method=mk_published; fi
    if has reg && [ $protocol = equal ]; then
      sweep reg optimizer.lr=$lr method=baseline_reg method.dropout=$dropout method.weight_decay=$wd
    fi
    if has swa && [ $protocol = equal ]; then sweep swa optimizer.lr=$lr method=swa $swa_lr; fi
    if has mk_ema; then sweep mk_ema optimizer.lr=$lr method=mk_ema method.average.decay=${decay#*=}; fi
    if has wide; then sweep wide optimizer.lr=$lr method=wide; fi
  done
  python -m lightning_mk.experiments.report $d/equal $d/converge --out benchmarks/results/quality/blind/$exp
done
