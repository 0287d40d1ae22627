#!/usr/bin/env bash
# Prototype comparison, seeds 0-2, same lr as plain. Usage: bash benchmarks/diagnosis/run_seeds.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
R=benchmarks/results/diagnosis/seeds
jobs=()
for s in 0 1 2; do
  C="--model cnn --opt sgd --lr 0.05 --wd 5e-4 --epochs 40 --seed $s"
  jobs+=("$C --method plain --out $R/cnn/plain_s$s.json" "$C --method mk --out $R/cnn/mk_select_s$s.json"
         "$C --method mk --scheme layer --out $R/cnn/mk_layer_s$s.json" "$C --method dec --out $R/cnn/dec_select_s$s.json"
         "$C --method dec --scheme layer --out $R/cnn/dec_layer_s$s.json" "$C --method dec --pull 0.01 --out $R/cnn/dec_select_pull0.01_s$s.json")
  C="--model mlp --samples 62500 --epochs 10 --opt adam --schedule constant --lr 1e-3 --seed $s"
  jobs+=("$C --method plain --out $R/mlp50k/plain_s$s.json" "$C --method mk --out $R/mlp50k/mk_select_s$s.json"
         "$C --method mk --scheme layer --out $R/mlp50k/mk_layer_s$s.json" "$C --method dec --out $R/mlp50k/dec_select_s$s.json"
         "$C --method dec --scheme layer --out $R/mlp50k/dec_layer_s$s.json" "$C --method dec --delta-lr-scale 0.1 --out $R/mlp50k/dec_select_dlr0.1_s$s.json")
done
printf '%s\n' "${jobs[@]}" | xargs -P 2 -I{} sh -c "python benchmarks/diagnosis/diag.py {}"
