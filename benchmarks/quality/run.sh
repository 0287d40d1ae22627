#!/usr/bin/env bash
# The quality study, in parts. Each part is one or more Hydra multiruns (raw runs under
# runs/quality/<part>/, ignored by git) and the report, whose table, plot and per-run CSV are
# committed under benchmarks/results/quality/<part>/.
#
#   bash benchmarks/quality/run.sh PART...
#
# parts: lr overfit ablation (the MNIST-1D MLP, 3 seeds, tuned on test: exploratory), and one part per task,
# every method, 5 seeds, tuned on validation: mnist1d_mlp mnist1d_mlp_large mnist1d_resnet mnist1d_transformer
# digits_resnet mnist1d_cnn; then options (after mnist1d_mlp): anneal_noise and per_rank_noise against mk on that task, and
# digits_ablation (after digits_resnet): the other schemes and init on a second task; transformer_ablation
# (after mnist1d_transformer): MK on the blocks' MLPs only, and the smooth `layer` scheme; resample: mk's final
# runs on every task again, compared with the committed ones (after a change of the draws); redraw: the same on
# the six tasks after `select`'s draw changed again, against the rows drawn the earlier way; decoupled:
# form=decoupled with a tuned scheme and noise level on every task, against the committed rows;
# decoupled_fixed: one fixed decoupled setting on every task; longer: plain, MK and decoupled at 4x the epochs;
# longer_decoupled: what avoids decoupled's collapse at 4x on the overfitting MLP; decoupled_wd: decoupled with
# weight decay on every task (exploratory, untuned). Every run uses logger=none (the study does not need W&B) and the presets in conf/experiment/.
set -euo pipefail
cd "$(dirname "$0")/../.."
run() { python -m lightning_mk.experiments.run -m logger=none "$@"; }
report() { python -m lightning_mk.experiments.report "runs/quality/$1" --out "benchmarks/results/quality/$1"; }
best() { python benchmarks/quality/best_setting.py "$@"; }

# compare DIR NAME LRS OVERRIDES...: one task, every method, on equal terms.
#  1. tuning, seeds 100 and 101, scored on validation accuracy: the learning rate of baseline and of mk over
#     the same grid LRS; then dropout x weight decay of baseline_reg (4 settings, as many as the lr grid) at
#     the baseline's learning rate.
#  2. final, seeds 0-4: every method at its chosen setting; wide, distill and submodular at the baseline's.
#     distill (wide teacher) and submodular select from the same seed's wide run; distill (ensemble teacher)
#     distils the other 4 seeds' baselines, so their training time is not in those rows' train time.
compare() {
  local d=$1 name=$2 lrs=$3; shift 3
  local tune=("$@" "task='$name tuning, lr=\${optimizer.lr}'" seed=100,101)
  run hydra.sweep.dir=$d/tune "${tune[@]}" method=baseline,mk optimizer.lr=$lrs
  local lr mk_lr reg
  lr=$(best $d/tune baseline) mk_lr=$(best $d/tune mk)
  run hydra.sweep.dir=$d/tune "${tune[@]}" hydra.sweep.subdir=reg-\${hydra.job.num} method=baseline_reg $lr \
    method.dropout=0.1,0.3 method.weight_decay=1e-4,1e-3
  reg=$(best $d/tune baseline_reg)
  python -m lightning_mk.experiments.report $d/tune --metric val_acc --out benchmarks/results/quality/$part/tuning
  local final=("$@" "task='$name'") seeds=seed=0,1,2,3,4 each=hydra.sweep.subdir=s\${seed}
  run hydra.sweep.dir=$d/final/baseline "${final[@]}" $each $seeds method=baseline $lr
  run hydra.sweep.dir=$d/final/baseline_reg "${final[@]}" $each $seeds method=baseline_reg $reg
  run hydra.sweep.dir=$d/final/mk "${final[@]}" $each $seeds method=mk $mk_lr
  run hydra.sweep.dir=$d/final/wide "${final[@]}" $each $seeds method=wide $lr
  run hydra.sweep.dir=$d/final/distill_wide "${final[@]}" $each $seeds method=distill method.teacher=wide $lr \
    "method.teacher_ckpt=$d/final/wide/s\${seed}/model.pt"
  run hydra.sweep.dir=$d/final/submodular "${final[@]}" hydra.sweep.subdir=s\${seed}-ft\${method.finetune_epochs} $seeds \
    method=submodular $lr "method.wide_ckpt=$d/final/wide/s\${seed}/model.pt" method.finetune_epochs=0,5
  local s o others
  for s in 0 1 2 3 4; do
    others=$(for o in 0 1 2 3 4; do [ $o = $s ] || printf '%s,' "$d/final/baseline/s$o/model.pt"; done)
    run hydra.sweep.dir=$d/final/distill_ensemble "${final[@]}" $each seed=$s method=distill $lr "method.teacher_ckpt=[${others%,}]"
  done
  python -m lightning_mk.experiments.report $d/final --out benchmarks/results/quality/$part
}
setting='${hydra:runtime.choices.optimizer} lr=${optimizer.lr}'
# experiment|task name|plain's tuned lr|mk's tuned lr|extra overrides: the committed tuning's choices
# (benchmarks/results/quality/<experiment>/tuning), for the parts that build on the committed study
# ("tuned": read from the raw tuning runs of that part, which must have run in this checkout).
# ONLY="exp1 exp2" limits resample, decoupled and decoupled_fixed to those experiments (and keeps the others' runs).
TASKS=("mnist1d_mlp|mnist1d/mlp 100 ep, sgd|0.1|0.2|trainer.max_epochs=100 optimizer=sgd"
       "mnist1d_mlp_large|mnist1d/mlp-50k, adam|0.01|0.01|" "mnist1d_resnet|mnist1d/resnet, adam|0.003|0.01|"
       "mnist1d_transformer|mnist1d/transformer, adam|0.003|0.001|" "digits_resnet|digits/resnet, adam|0.01|0.003|"
       "mnist1d_cnn|mnist1d/cnn, sgd|tuned|tuned|")
wanted() { [[ -z "${ONLY:-}" || " $ONLY " == *" $1 "* ]]; }
tuned() {  # tuned EXPERIMENT METHOD VALUE: VALUE, or the lr the raw tuning of that experiment chose for METHOD
  if [ "$3" = tuned ]; then best "runs/quality/$1/tune" "$2" --keys optimizer.lr | cut -d= -f2; else echo "$3"; fi
}
task() {  # task ENTRY: false if ONLY leaves the TASKS entry out; else set exp, name, lr (tuned resolved), mk_lr (as
  # written) and extra from it, and clear the part's earlier runs of that experiment
  IFS='|' read -r exp name lr mk_lr extra <<< "$1"
  wanted "$exp" || return 1
  rm -rf "${d:?}/$exp"
  lr=$(tuned "$exp" baseline "$lr")
}
published_again() {  # published_again CNN_LR [OVERRIDES...]: MK as published (method=mk_published, what the study's
  # `mk` rows ran) on the wanted TASKS again into $d, seeds 0-4, each at its committed tuned rate; a task whose rate
  # TASKS leaves to its raw tuning ("tuned": the CNN) runs at CNN_LR, or not at all when CNN_LR is empty
  local t exp name mk_lr extra
  for t in "${TASKS[@]}"; do
    IFS='|' read -r exp name _ mk_lr extra <<< "$t"
    wanted "$exp" || continue
    if [ "$mk_lr" = tuned ]; then [ -n "$1" ] || continue; mk_lr=$1; fi
    rm -rf "${d:?}/$exp"
    # shellcheck disable=SC2086
    run hydra.sweep.dir=$d/$exp experiment=$exp $extra "task='$name'" hydra.sweep.subdir=s\${seed} \
      seed=0,1,2,3,4 method=mk_published optimizer.lr=$mk_lr "${@:2}"
  done
}
# labels of the decoupled runs (Hydra resolves the interpolations per run)
dec_label="method.label='mk (\${method.callback.scheme}, k=4, decoupled, noise \${method.callback.noise})'"
dec_wd_label="method.label='mk (select, k=4, decoupled, noise \${method.callback.noise}, wd \${optimizer.weight_decay})'"

for part in "$@"; do
  d=runs/quality/$part
  [ -n "${ONLY:-}" ] || rm -rf "$d"
  case $part in
    lr)  # learning rate tuned for baseline and mk on equal terms: the same grid for both, 3 seeds
      run hydra.sweep.dir=$d/adam experiment=mnist1d_mlp "task='mlp, ${setting}'" optimizer=adam optimizer.lr=3e-4,1e-3,3e-3 \
        method=baseline,mk seed=0,1,2
      run hydra.sweep.dir=$d/adam-gs experiment=mnist1d_mlp "task='mlp, ${setting}'" optimizer=adam optimizer.lr=3e-4,1e-3,3e-3 \
        method=mk method.callback.grad_scale=k,matched seed=0,1,2
      run hydra.sweep.dir=$d/sgd experiment=mnist1d_mlp "task='mlp, ${setting}'" optimizer=sgd optimizer.lr=0.01,0.03,0.1 \
        method=baseline,mk seed=0,1,2
      run hydra.sweep.dir=$d/sgd-gs experiment=mnist1d_mlp "task='mlp, ${setting}'" optimizer=sgd optimizer.lr=0.01,0.03,0.1 \
        method=mk method.callback.grad_scale=k,matched seed=0,1,2
      ;;
    overfit)  # 100 epochs: the MLP fits its 3,600 training samples; SGD, one lr grid for all, 3 seeds
      run hydra.sweep.dir=$d/plain experiment=mnist1d_mlp trainer.max_epochs=100 "task='mlp 100 ep, ${setting}'" \
        optimizer=sgd optimizer.lr=0.03,0.1,0.3 method=baseline,baseline_reg,mk seed=0,1,2
      run hydra.sweep.dir=$d/gs experiment=mnist1d_mlp trainer.max_epochs=100 "task='mlp 100 ep, ${setting}'" \
        optimizer=sgd optimizer.lr=0.03,0.1,0.3 method=mk method.callback.grad_scale=k seed=0,1,2
      ;;
    ablation)  # at overfit's best shared setting (100 epochs, SGD lr 0.1): every scheme, the other init, k
      abl=(experiment=mnist1d_mlp trainer.max_epochs=100 "task='mlp 100 ep, ${setting}, ablation'" optimizer=sgd optimizer.lr=0.1)
      run hydra.sweep.dir=$d/baseline "${abl[@]}" method=baseline seed=0,1,2
      run hydra.sweep.dir=$d/schemes "${abl[@]}" method=mk method.callback.scheme=select,convex,layer,majority seed=0,1,2
      run hydra.sweep.dir=$d/init "${abl[@]}" method=mk method.callback.init=independent seed=0,1,2
      run hydra.sweep.dir=$d/k "${abl[@]}" method=mk k=2,8 seed=0,1,2
      ;;
    mnist1d_mlp)  # the overfitting regime (3,600 training samples, 100 epochs: plain training fits them all)
      compare $d "mnist1d/mlp 100 ep, sgd" 0.01,0.03,0.1,0.2 experiment=mnist1d_mlp trainer.max_epochs=100 optimizer=sgd; continue ;;
    mnist1d_cnn)  # a CNN without normalisation, SGD + momentum, cosine schedule: where MK underfit most by hand
      compare $d "mnist1d/cnn, sgd" 0.01,0.03,0.1,0.3 experiment=mnist1d_cnn; continue ;;
    mnist1d_mlp_large)  # the capacity-limited regime (50,000 training samples)
      compare $d "mnist1d/mlp-50k, adam" 3e-4,1e-3,3e-3,1e-2 experiment=mnist1d_mlp_large; continue ;;
    mnist1d_resnet)
      compare $d "mnist1d/resnet, adam" 3e-4,1e-3,3e-3,1e-2 experiment=mnist1d_resnet; continue ;;
    mnist1d_transformer)
      compare $d "mnist1d/transformer, adam" 3e-4,1e-3,3e-3,1e-2 experiment=mnist1d_transformer; continue ;;
    digits_resnet)
      compare $d "digits/resnet, adam" 3e-4,1e-3,3e-3,1e-2 experiment=digits_resnet; continue ;;
    options)  # each documented option against mk at mk's tuned setting on the overfitting MLP task, 5 seeds
      t=runs/quality/mnist1d_mlp
      lr=$(best $t/tune baseline) mk_lr=$(best $t/tune mk)
      task=(experiment=mnist1d_mlp trainer.max_epochs=100 optimizer=sgd)
      run hydra.sweep.dir=$d/anneal "${task[@]}" "task='mnist1d/mlp 100 ep, sgd'" hydra.sweep.subdir=s\${seed} seed=0,1,2,3,4 \
        method=mk $mk_lr method.callback.anneal_noise=true "method.label='mk (select, k=4, replicate, anneal_noise)'"
      # per-rank noise needs ranks: DDP, 2 CPU processes (global batch 256), one run per job (multirun and
      # Lightning's DDP launcher do not mix), the same baseline and mk settings as above
      ddp() { python -m lightning_mk.experiments.run logger=none "${task[@]}" trainer.devices=2 \
                +trainer.strategy=ddp "task='mnist1d/mlp 100 ep, sgd, ddp 2 processes'" "$@"; }
      for s in 0 1 2 3 4; do
        ddp seed=$s hydra.run.dir=$d/ddp/baseline-s$s method=baseline $lr
        ddp seed=$s hydra.run.dir=$d/ddp/mk-s$s method=mk $mk_lr
        ddp seed=$s hydra.run.dir=$d/ddp/mk-per-rank-s$s method=mk $mk_lr method.callback.per_rank_noise=true \
          "method.label='mk (select, k=4, replicate, per_rank_noise)'"
      done
      python -m lightning_mk.experiments.report $t/final/baseline $t/final/mk $d --out benchmarks/results/quality/$part
      continue ;;
    digits_ablation)  # the other schemes and the other init on a second task, at mk's tuned setting, 5 seeds
      t=runs/quality/digits_resnet
      mk_lr=$(best $t/tune mk)
      abl=(experiment=digits_resnet "task='digits/resnet, adam'" method=mk $mk_lr seed=0,1,2,3,4)
      run hydra.sweep.dir=$d/schemes "${abl[@]}" method.callback.scheme=convex,layer,majority
      run hydra.sweep.dir=$d/init "${abl[@]}" method.callback.init=independent
      python -m lightning_mk.experiments.report $t/final/baseline $t/final/mk $d --out benchmarks/results/quality/$part
      continue ;;
    transformer_ablation)  # where MK hurt most: copies only in the blocks' MLPs; the smooth scheme; 5 seeds
      t=runs/quality/mnist1d_transformer
      mk_lr=$(best $t/tune mk)
      abl=(experiment=mnist1d_transformer "task='mnist1d/transformer, adam'" method=mk $mk_lr seed=0,1,2,3,4)
      run hydra.sweep.dir=$d/mlps "${abl[@]}" 'method.callback.include=["net.blocks.*.fc1","net.blocks.*.fc2"]' \
        "method.label='mk (select, k=4, replicate, block MLPs only)'"
      run hydra.sweep.dir=$d/layer "${abl[@]}" method.callback.scheme=layer
      python -m lightning_mk.experiments.report $t/final/baseline $t/final/mk $d --out benchmarks/results/quality/$part
      continue ;;
    resample)  # MK as published again, after a change of the random generator: the study's tasks before the new
      # generator (not the CNN), against their committed rows
      published_again ""
      python benchmarks/quality/paired.py $d --against mk --out benchmarks/results/quality/$part
      continue ;;
    redraw)  # the same on all six tasks after the draw of `select` changed (integers split from shared hashes),
      # against the rows drawn the earlier way (resample's, and the CNN's)
      published_again 0.03 hydra/launcher=joblib hydra.launcher.n_jobs=2  # the CNN's rate: its committed mk rows'
      python benchmarks/quality/paired.py $d --against mk --out benchmarks/results/quality/$part \
        --committed benchmarks/results/quality/resample/runs.csv benchmarks/results/quality/mnist1d_cnn/runs.csv
      continue ;;
    decoupled)  # form=decoupled at plain's tuned learning rate (with zero noise it is plain training); scheme
      # and noise level tuned on validation over 4 settings (plain's lr grid had 4), then 5 seeds; against the
      # committed rows of each task
      for t in "${TASKS[@]}"; do
        task "$t" || continue
        dec=(experiment=$exp $extra method=mk method.callback.form=decoupled optimizer.lr=$lr)
        # shellcheck disable=SC2086
        run hydra.sweep.dir=$d/$exp/tune "${dec[@]}" seed=100,101 method.callback.scheme=select,layer \
          method.callback.noise=1.0,0.3 "task='$name tuning, \${method.callback.scheme} \${method.callback.noise}'"
        chosen=$(best $d/$exp/tune mk --keys method.callback.scheme method.callback.noise)
        # shellcheck disable=SC2086
        run hydra.sweep.dir=$d/$exp/final "${dec[@]}" "task='$name'" $chosen hydra.sweep.subdir=s\${seed} seed=0,1,2,3,4 \
          "$dec_label"
      done
      python benchmarks/quality/paired.py $d --runs final --against baseline --also baseline_reg wide mk \
        --out benchmarks/results/quality/$part
      continue ;;
    decoupled_fixed)  # one fixed setting on every task (the one decoupled's tuning chose most often), 5 seeds
      for t in "${TASKS[@]}"; do
        task "$t" || continue
        # shellcheck disable=SC2086
        run hydra.sweep.dir=$d/$exp experiment=$exp $extra method=mk method.callback.form=decoupled optimizer.lr=$lr \
          method.callback.scheme=layer method.callback.noise=0.3 "task='$name'" hydra.sweep.subdir=s\${seed} \
          seed=0,1,2,3,4 "method.label='mk (layer, k=4, decoupled, noise 0.3)'"
      done
      python benchmarks/quality/paired.py $d --against baseline --also baseline_reg wide mk --out benchmarks/results/quality/$part
      continue ;;
    longer)  # 4x the epochs (learning-rate schedules stretched with them) for plain, MK (copies, its tuned lr) and
      # decoupled (its chosen setting, after the decoupled part), the same learning rates, 5 seeds: do k copies
      # need more steps? Rows at 4x against each other (report.md) and against the committed 1x rows (paired/)
      for t in "${TASKS[@]}"; do
        task "$t" || continue
        mk_lr=$(tuned "$exp" mk "$mk_lr")
        # shellcheck disable=SC2086
        epochs=$(python -m lightning_mk.experiments.run experiment=$exp $extra --cfg job -p trainer.max_epochs | tail -1)
        chosen=$(best runs/quality/decoupled/$exp/tune mk --keys method.callback.scheme method.callback.noise)
        long=(experiment=$exp $extra trainer.max_epochs=$((4 * epochs)) "task='$name, $((4 * epochs)) ep'"
              hydra.sweep.subdir=s\${seed} seed=0,1,2,3,4)
        # shellcheck disable=SC2086
        run hydra.sweep.dir=$d/$exp/baseline "${long[@]}" method=baseline optimizer.lr=$lr
        run hydra.sweep.dir=$d/$exp/mk "${long[@]}" method=mk optimizer.lr=$mk_lr
        # shellcheck disable=SC2086
        run hydra.sweep.dir=$d/$exp/decoupled "${long[@]}" method=mk method.callback.form=decoupled optimizer.lr=$lr $chosen \
          "$dec_label"
      done
      python benchmarks/quality/paired.py $d --against baseline --also mk --out benchmarks/results/quality/$part/paired
      ;;
    longer_decoupled)  # after longer: the decoupled collapse on the overfitting MLP at 400 epochs, against a
      # lower noise level and against weight decay (5 seeds each, the same lr; plain with weight decay beside it)
      long=(experiment=mnist1d_mlp optimizer=sgd trainer.max_epochs=400 optimizer.lr=0.1 "task='mnist1d/mlp 100 ep, sgd, 400 ep'"
            hydra.sweep.subdir=s\${seed} seed=0,1,2,3,4)
      dec=(method=mk method.callback.form=decoupled method.callback.scheme=select "$dec_wd_label")
      run hydra.sweep.dir=$d/noise "${long[@]}" "${dec[@]}" method.callback.noise=0.3
      run hydra.sweep.dir=$d/wd "${long[@]}" "${dec[@]}" optimizer.weight_decay=5e-4
      run hydra.sweep.dir=$d/plain_wd "${long[@]}" method=baseline optimizer.weight_decay=5e-4 "method.label='baseline, wd 5e-4'"
      # the same weight decay at the study's 100 epochs
      short=(experiment=mnist1d_mlp optimizer=sgd trainer.max_epochs=100 optimizer.lr=0.1 "task='mnist1d/mlp 100 ep, sgd'"
             hydra.sweep.subdir=s\${seed} seed=0,1,2,3,4 optimizer.weight_decay=5e-4)
      run hydra.sweep.dir=$d/100ep/mnist1d_mlp/wd "${short[@]}" "${dec[@]}"
      run hydra.sweep.dir=$d/100ep/mnist1d_mlp/plain_wd "${short[@]}" method=baseline "method.label='baseline, wd 5e-4'"
      t=runs/quality/longer/mnist1d_mlp  # against plain without weight decay, then against plain with it
      python -m lightning_mk.experiments.report $t/baseline $t/mk $t/decoupled $d/noise $d/wd --out benchmarks/results/quality/$part
      python -m lightning_mk.experiments.report $d/plain_wd $d/wd --out benchmarks/results/quality/$part/against_wd
      python benchmarks/quality/paired.py $d/100ep --against baseline --also baseline_reg mk wide \
        --out benchmarks/results/quality/$part/100ep  # against the committed rows of the task
      python -m lightning_mk.experiments.report $d/100ep --out benchmarks/results/quality/$part/100ep/against_wd
      continue ;;
    decoupled_wd)  # exploratory, after longer_decoupled: decoupled (select, noise 1.0) with weight decay 5e-4 (the
      # CNN preset's; untuned) at plain's lr on every task, and plain with the same weight decay; 5 seeds
      for t in "${TASKS[@]}"; do
        task "$t" || continue
        wd=(experiment=$exp $extra optimizer.lr=$lr optimizer.weight_decay=5e-4 "task='$name'" hydra.sweep.subdir=s\${seed}
            seed=0,1,2,3,4)
        # shellcheck disable=SC2086
        run hydra.sweep.dir=$d/$exp/decoupled "${wd[@]}" method=mk method.callback.form=decoupled method.callback.scheme=select \
          "$dec_wd_label"
        # shellcheck disable=SC2086
        run hydra.sweep.dir=$d/$exp/plain "${wd[@]}" method=baseline "method.label='baseline, wd \${optimizer.weight_decay}'"
      done
      python benchmarks/quality/paired.py $d --against baseline --also baseline_reg mk wide \
        --out benchmarks/results/quality/$part/paired  # against the committed plain rows (no weight decay)
      report "$part"  # each task: decoupled against plain with the same weight decay
      continue ;;
    *) echo "unknown part $part" >&2; exit 2 ;;
  esac
  report "$part"
done
