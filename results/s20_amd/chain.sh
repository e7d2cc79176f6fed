#!/bin/bash
# Session 20 (rerun of session 19's chain, lost with its machine): make train (DITTO with one looping row per step) timed alone, then its evaluation.
cd /work/main
echo "start $(date -u) commit $(git rev-parse --short HEAD)"
( time make train ) > outputs/s20/make_train.log 2>&1
echo "train end $(date -u) rc $?"
( time .venv/bin/python evaluate.py --adapters outputs/lora_r16 --skip-base --outputs outputs/s20/eval ) > outputs/s20/eval.log 2>&1
echo "eval end $(date -u) rc $?"
