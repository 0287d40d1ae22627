#!/usr/bin/env bash
# The callback's default against plain training and the reviewer's baselines, on the six study tasks and the two
# overfitting variants, under two protocols, seeds 0-4 each:
#   equal:    the task's epochs;
#   converge: 3x the epochs with early stopping on validation accuracy (patience 10), deploying the best
#             validation epoch (its test accuracy, and the epochs taken, in each run's results). SWA, whose
#             average only exists at the end, runs the 3x epochs without early stopping.
# Every method runs at plain training's tuned learning rate of the task (benchmarks/results/quality/<task>/tuning;
# an overfitting variant takes its parent task's), except MK as published, at its own tuned rate. The tuned
# regulariser takes the committed tuning's dropout and weight decay; EMA's decay (0.99 or 0.999) is tuned here on
# validation accuracy (seeds 100, 101). The default MK runs with no option set (`method=mk`: the callback's
# defaults); MK as published is `method=mk_published` (MajorityKernelCallback.published()).
#
# MK + EMA takes EMA's tuned decay; the k-times-wider model plain training's learning rate; SWA (Lightning's
# StochasticWeightAveraging, from 75 % of the epochs) its annealing rate, half or a tenth of plain's, tuned like
# EMA's decay. Distillation learns from the wide model of the same seed and protocol (runs/.../<protocol>/wide, so
# the wide column runs first; its training time is not counted); its temperature (2, 4) and alpha (0.5, 0.9) are
# tuned at plain's learning rate, then the best pair also at a third of it (seeds 100, 101 with the equal
# protocol's wide models of seeds 0, 1 as teachers).
#
#   bash benchmarks/quality/blind.sh [TASK...]        # raw runs: runs/quality/blind/<task>/; tables: benchmarks/results/quality/blind/
#   METHODS="mk_ema wide" bash benchmarks/quality/blind.sh   # only those columns (plain ema published reg swa mk_ema wide distill)
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
METHODS=${METHODS:-plain ema published reg swa mk_ema wide distill}  # the columns to (re)run; the others' runs are kept
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
      p=("${task[@]}")
    else
      p=(experiment=$exp trainer.max_epochs=$((3 * epochs)) $extra "task='$exp, converge'")
    fi
    stop=$([ $protocol = converge ] && echo early_stopping=10 || true)
    each=hydra.sweep.subdir=\${method.name}-\${hydra.job.num}
    sweep() { rm -rf $d/$protocol/$1; run hydra.sweep.dir=$d/$protocol/$1 "${p[@]}" seed=0,1,2,3,4 "${@:2}" $each; }
    if has plain; then sweep plain $stop optimizer.lr=$lr method=baseline,mk; fi
    if has ema; then sweep ema $stop optimizer.lr=$lr method=ema $decay; fi
    if has published; then sweep published $stop optimizer.lr=$mk_lr method=mk_published; fi
    if has reg; then sweep reg $stop optimizer.lr=$lr method=baseline_reg method.dropout=$dropout method.weight_decay=$wd; fi
    if has swa; then sweep swa optimizer.lr=$lr method=swa $swa_lr; fi
    if has mk_ema; then sweep mk_ema $stop optimizer.lr=$lr method=mk_ema method.average.decay=${decay#*=}; fi
    if has wide; then sweep wide $stop optimizer.lr=$lr method=wide; fi
    if has distill; then
      teachers=$PWD/$d/teachers/$protocol  # <seed>.pt: the wide model of that seed
      mkdir -p $teachers
      for s in 0 1 2 3 4; do ln -sf $PWD/$d/$protocol/wide/wide-$s/model.pt $teachers/$s.pt; done
      kd=(method=distill method.teacher=wide "method.teacher_ckpt=$teachers/\${seed}.pt")
      if [ $protocol = equal ]; then
        ln -sf $teachers/0.pt $teachers/100.pt; ln -sf $teachers/1.pt $teachers/101.pt
        rm -rf $d/tune_distill
        run hydra.sweep.dir=$d/tune_distill/a "${task[@]}" optimizer.lr=$lr "${kd[@]}" method.temperature=2,4 method.alpha=0.5,0.9 seed=100,101
        pair=$(best $d/tune_distill/a distill --keys method.temperature method.alpha)
        run hydra.sweep.dir=$d/tune_distill/b "${task[@]}" optimizer.lr=$(python -c "print($lr / 3)") "${kd[@]}" $pair seed=100,101
        # one step past each edge of the grid the best setting sits on, the other two values kept
        read -r clr ct ca <<< "$(best $d/tune_distill distill --keys optimizer.lr method.temperature method.alpha | sed 's/[a-z.]*=//g')"
        wider=()
        [ "$ct" = 2 ] && wider+=("optimizer.lr=$clr method.temperature=1 method.alpha=$ca")
        [ "$ca" = 0.5 ] && wider+=("optimizer.lr=$clr method.temperature=$ct method.alpha=0.25")
        [ "$ca" = 0.9 ] && wider+=("optimizer.lr=$clr method.temperature=$ct method.alpha=0.99")
        python -c "import sys; sys.exit(abs($clr - $lr / 3) > 1e-12)" && wider+=("optimizer.lr=$(python -c "print($lr / 10)") method.temperature=$ct method.alpha=$ca")
        python -c "import sys; sys.exit(abs($clr - $lr) > 1e-12)" && wider+=("optimizer.lr=$(python -c "print($lr * 3)") method.temperature=$ct method.alpha=$ca")
        for i in "${!wider[@]}"; do
          run hydra.sweep.dir=$d/tune_distill/c/$i "${task[@]}" "${kd[@]}" ${wider[$i]} seed=100,101
        done
      fi
      sweep distill $stop "${kd[@]}" $(best $d/tune_distill distill --keys optimizer.lr method.temperature method.alpha)
    fi
  done
  python -m lightning_mk.experiments.report $d/equal $d/converge --out benchmarks/results/quality/blind/$exp
done
