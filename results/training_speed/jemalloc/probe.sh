#!/bin/bash
# Does jemalloc (LD_PRELOAD, same numbers) speed up our LoRA step on this CPU? Alternating A/B/A/B, our LoRA only.
# Run from anywhere; it works from the repository root (needs `apt install libjemalloc2` and the bench's .venv).
cd "$(dirname "$0")/../../.." || exit 1
out=results/training_speed/jemalloc
echo "start $(date -u) commit $(git rev-parse --short HEAD)"
for round in 1 2; do
  .venv/bin/python -m bench --variants lora --steps 2 --generate-prompts 0 --output $out/plain$round.md > /dev/null 2>&1
  LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 .venv/bin/python -m bench --variants lora --steps 2 --generate-prompts 0 --output $out/jemalloc$round.md > /dev/null 2>&1
  echo "round $round done $(date -u)"
done
