#!/bin/bash
# Replaces chain.sh after seed 42: waits for the seed-1 run, then two 1-epoch runs (the cost of one 2-epoch run), averages, evaluates.
cd /work/main
log=outputs/s16/chain.log
echo "chain2 start $(date -u) commit $(git rev-parse --short HEAD)" >> $log
while kill -0 2441 2>/dev/null; do sleep 10; done
echo "seed 1 finished $(date -u): $(tail -c 300 outputs/s16/train_seed1.log | grep -o 'done:.*')" >> $log
for seed in 42 1; do
  s=$(date +%s)
  .venv/bin/python train.py --epochs 1 --seed $seed --out outputs/s16/e1_seed$seed > outputs/s16/train_e1_seed$seed.log 2>&1
  echo "e1 seed $seed rc=$? $(( $(date +%s) - s )) s, $(date -u)" >> $log
done
.venv/bin/python average.py outputs/s16/seed42 outputs/s16/seed1 --out outputs/s16/avg >> $log 2>&1
.venv/bin/python average.py outputs/s16/e1_seed42 outputs/s16/e1_seed1 --out outputs/s16/e1_avg >> $log 2>&1
echo "averaged $(date -u)" >> $log
s=$(date +%s)
.venv/bin/python evaluate.py --adapters outputs/s16/avg outputs/s16/e1_avg outputs/s16/seed1 outputs/s16/seed42 --skip-base --outputs outputs/s16/eval > outputs/s16/eval.log 2>&1
echo "eval rc=$? $(( $(date +%s) - s )) s, $(date -u)" >> $log
