#!/bin/bash
# The variant: the DITTO loss from the third copy on (the first run changed signatures copied from the prompt).
cd /work/main
log=outputs/s17/chain.log
echo "chain3 start $(date -u) commit $(git rev-parse --short HEAD)" >> $log
s=$(date +%s)
.venv/bin/python train.py --repetition 1 --repetition-from-copy 3 --seed 42 --out outputs/s17/ditto3_seed42 > outputs/s17/train_ditto3_seed42.log 2>&1
echo "train ditto3 seed 42 rc=$? $(( $(date +%s) - s )) s, $(date -u)" >> $log
s=$(date +%s)
.venv/bin/python evaluate.py --adapters outputs/s17/ditto3_seed42 --skip-base --outputs outputs/s17/eval_ditto3_seed42 > outputs/s17/eval_ditto3_seed42.log 2>&1
echo "eval ditto3 seed 42 rc=$? $(( $(date +%s) - s )) s, $(date -u)" >> $log
