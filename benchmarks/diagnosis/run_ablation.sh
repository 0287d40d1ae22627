#!/usr/bin/env bash
# Mechanism ablations, seed 0 (each run ~10-40 s on one core). Usage: bash benchmarks/diagnosis/run_ablation.sh [cnn|mlp|mlp50k]
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
R=benchmarks/results/diagnosis/runs
D="python benchmarks/diagnosis/diag.py"
jobs=()
case "$1" in
  cnn)  # small CNN, SGD momentum 0.9, wd 5e-4, cosine, 40 epochs, lr 0.05
    C="--model cnn --opt sgd --lr 0.05 --wd 5e-4 --epochs 40 --seed 0"
    jobs+=("$C --method plain --out $R/cnn/plain.json")
    jobs+=("--model cnn --opt sgd --lr 0.0125 --wd 5e-4 --epochs 40 --seed 0 --method plain --out $R/cnn/plain_lr-div-k.json")
    jobs+=("--model cnn --opt sgd --lr 0.0125 --wd 2e-3 --epochs 40 --seed 0 --method plain --out $R/cnn/plain_lr-div-k_wd-x-k.json")
    jobs+=("$C --method mk --out $R/cnn/mk_select.json")
    jobs+=("$C --method mk --scheme layer --out $R/cnn/mk_layer.json")
    jobs+=("--model cnn --opt sgd --lr 0.05 --wd 0 --epochs 40 --seed 0 --method mk --out $R/cnn/mk_select_wd0.json")
    jobs+=("$C --method mk --wd-kernel-scale 0.25 --out $R/cnn/mk_select_wd-div-k.json")
    jobs+=("$C --method mk --grad-scale k --out $R/cnn/mk_select_gradscale-k.json")
    jobs+=("$C --method mk --scheme layer --grad-scale k --out $R/cnn/mk_layer_gradscale-k.json")
    jobs+=("--model cnn --opt sgd --lr 0.2 --wd 5e-4 --epochs 40 --seed 0 --method mk --out $R/cnn/mk_select_lr-x-k.json")
    jobs+=("$C --method dec --out $R/cnn/dec_select.json")
    jobs+=("$C --method dec --scheme layer --out $R/cnn/dec_layer.json")
    jobs+=("$C --method dec --pull 0.01 --out $R/cnn/dec_select_pull0.01.json")
    ;;
  mlp|mlp50k)  # MLP n=128 depth 2, Adam, constant lr 1e-3, no wd
    if [ "$1" = mlp ]; then C="--model mlp --samples 5000 --epochs 40"; o=mlp; else C="--model mlp --samples 62500 --epochs 10"; o=mlp50k; fi
    C="$C --opt adam --schedule constant --seed 0"
    jobs+=("$C --lr 1e-3 --method plain --out $R/$o/plain.json")
    jobs+=("$C --lr 5e-4 --method plain --out $R/$o/plain_lr-div-sqrtk.json")
    jobs+=("$C --lr 2.5e-4 --method plain --out $R/$o/plain_lr-div-k.json")
    jobs+=("$C --lr 1e-3 --method mk --out $R/$o/mk_select.json")
    jobs+=("$C --lr 1e-3 --method mk --scheme layer --out $R/$o/mk_layer.json")
    jobs+=("$C --lr 2e-3 --method mk --out $R/$o/mk_select_lr-x-sqrtk.json")
    jobs+=("$C --lr 4e-3 --method mk --out $R/$o/mk_select_lr-x-k.json")
    jobs+=("$C --lr 3e-4 --method mk --out $R/$o/mk_select_lr-0.3x.json")
    jobs+=("$C --lr 1e-3 --method dec --out $R/$o/dec_select.json")
    jobs+=("$C --lr 1e-3 --method dec --scheme layer --out $R/$o/dec_layer.json")
    jobs+=("$C --lr 1e-3 --method dec --delta-lr-scale 0.1 --out $R/$o/dec_select_dlr0.1.json")
    ;;
esac
printf '%s\n' "${jobs[@]}" | xargs -P 2 -I{} sh -c "$D {}"
