#!/bin/bash
# Replaces chain.sh (this instance is a slow one: one DITTO run only): waits for the seed-42 run, then evaluates it.
cd /work/main
log=outputs/s17/chain.log
echo "chain2 start $(date -u) commit $(git rev-parse --short HEAD)" >> $log
while kill -0 3224 2>/dev/null; do sleep 10; done
echo "train seed 42 finished $(date -u): $(tail -c 400 outputs/s17/train_seed42.log | grep -o 'done:.*')" >> $log
s=$(date +%s)
.venv/bin/python evaluate.py --adapters outputs/s17/ditto_seed42 --skip-base --outputs outputs/s17/eval_seed42 > outputs/s17/eval_seed42.log 2>&1
echo "eval seed 42 rc=$? $(( $(date +%s) - s )) s, $(date -u)" >> $log
