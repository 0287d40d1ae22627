#!/usr/bin/env bash
# The quality study, in parts. Each part is one or more Hydra multiruns (raw runs under
# runs/quality/<part>/, ignored by git) and the report, whose table, plot and per-run CSV are
# committed under benchmarks/results/quality/<part>/.
#
#   bash benchmarks/quality/run.sh PART...      parts: lr overfit ablation mnist1d_mlp_large
#
# Every run uses logger=none (the study does not need W&B) and the presets in conf/experiment/.
set -euo pipefail
cd "$(dirname "$0")/../.."
run() { python -m lightning_mk.run -m logger=none +trainer.enable_progress_bar=false "$@"; }
report() { python -m lightning_mk.report "runs/quality/$1" --out "benchmarks/results/quality/$1"; }
setting='${hydra:runtime.choices.optimizer} lr=${optimizer.lr}'

for part in "$@"; do
  d=runs/quality/$part
  rm -rf "$d"
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
    mnist1d_mlp_large)  # the capacity-limited regime (50,000 training samples): the main job's methods, 3 seeds
      run hydra.sweep.dir=$d experiment=mnist1d_mlp_large method=baseline,baseline_reg,mk,wide,distill,submodular seed=0,1,2
      ;;
    *) echo "unknown part $part" >&2; exit 2 ;;
  esac
  report "$part"
done
