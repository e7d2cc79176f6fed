#!/bin/bash
cd /work/main
log=outputs/s17/chain.log
echo "start $(date -u) commit $(git rev-parse --short HEAD)" >> $log
for seed in 42 1; do
  s=$(date +%s)
  .venv/bin/python train.py --repetition 1 --seed $seed --out outputs/s17/ditto_seed$seed > outputs/s17/train_seed$seed.log 2>&1
  echo "train seed $seed rc=$? $(( $(date +%s) - s )) s, $(date -u)" >> $log
  s=$(date +%s)
  .venv/bin/python evaluate.py --adapters outputs/s17/ditto_seed$seed --skip-base --outputs outputs/s17/eval_seed$seed > outputs/s17/eval_seed$seed.log 2>&1
  echo "eval seed $seed rc=$? $(( $(date +%s) - s )) s, $(date -u)" >> $log
done
