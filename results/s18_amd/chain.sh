#!/bin/bash
# A second seed of make train's recipe (DITTO from copy 3), then its evaluation.
cd /work/main
log=outputs/s18/chain.log
echo "chain start $(date -u) commit $(git rev-parse --short HEAD)" >> $log
s=$(date +%s)
.venv/bin/python train.py --seed 1 --out outputs/s18/ditto3_seed1 > outputs/s18/train_seed1.log 2>&1
echo "train seed 1 rc=$? $(( $(date +%s) - s )) s, $(date -u)" >> $log
s=$(date +%s)
.venv/bin/python evaluate.py --adapters outputs/s18/ditto3_seed1 --skip-base --outputs outputs/s18/eval_seed1 > outputs/s18/eval_seed1.log 2>&1
echo "eval seed 1 rc=$? $(( $(date +%s) - s )) s, $(date -u)" >> $log
