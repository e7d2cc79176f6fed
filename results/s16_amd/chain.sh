#!/bin/bash
cd /work/main
log=outputs/s16/chain.log
echo "start $(date -u) commit $(git rev-parse --short HEAD)" >> $log
for seed in 42 1; do
  s=$(date +%s)
  .venv/bin/python train.py --seed $seed --out outputs/s16/seed$seed > outputs/s16/train_seed$seed.log 2>&1
  echo "seed $seed rc=$? $(( $(date +%s) - s )) s, $(date -u)" >> $log
done
.venv/bin/python results/s15_amd/average/average_adapters.py outputs/s16/seed42 outputs/s16/seed1 outputs/s16/avg >> $log 2>&1
echo "averaged $(date -u)" >> $log
s=$(date +%s)
.venv/bin/python evaluate.py --adapters outputs/s16/avg outputs/s16/seed42 outputs/s16/seed1 --skip-base --outputs outputs/s16/eval > outputs/s16/eval.log 2>&1
echo "eval rc=$? $(( $(date +%s) - s )) s, $(date -u)" >> $log
