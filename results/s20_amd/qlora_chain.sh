#!/bin/bash
# Session 20: make qlora (the make train recipe, DITTO with one looping row, on the NF4 base) timed alone, then its evaluation.
cd /work/main
echo "start $(date -u) commit $(git rev-parse --short HEAD)"
( time make qlora ) > outputs/s20/make_qlora.log 2>&1
echo "qlora end $(date -u) rc $?"
( time .venv/bin/python evaluate.py --adapters outputs/qlora_r16 --skip-base --outputs outputs/s20/eval_qlora ) > outputs/s20/eval_qlora.log 2>&1
echo "eval end $(date -u) rc $?"
