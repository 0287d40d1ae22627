#!/usr/bin/env bash
# Which part of weight decay helps the decoupled prototype on the overfitting MLP (3,600 samples, SGD lr 0.1,
# constant): decay on the mean (mu), on the deviations (the elastic pull), or both; plain beside it.
# Seeds 0-2, 100 and 400 epochs. Usage: bash benchmarks/diagnosis/run_decay.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
R=benchmarks/results/diagnosis/decay
jobs=()
for epochs in 100 400; do
  for s in 0 1 2; do
    C="--model mlp --samples 5000 --opt sgd --lr 0.1 --schedule constant --epochs $epochs --seed $s"
    O=$R/mlp${epochs}
    jobs+=("$C --method plain --out $O/plain_s$s.json" "$C --method plain --wd 5e-4 --out $O/plain_wd_s$s.json"
           "$C --method dec --out $O/dec_s$s.json" "$C --method dec --wd 5e-4 --out $O/dec_wd_both_s$s.json"
           "$C --method dec --pull 5e-4 --out $O/dec_wd_deviations_s$s.json"
           "$C --method dec --wd 5e-4 --wd-kernel-scale 0 --out $O/dec_wd_mean_s$s.json")
  done
done
printf '%s\n' "${jobs[@]}" | xargs -P 2 -I{} sh -c "python benchmarks/diagnosis/diag.py {}"
