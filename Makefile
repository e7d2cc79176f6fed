# Everything runs inside .venv, created on first use from the pinned requirements files.
# Overridable: make train RECIPE=recipes/study-gemma-2-2b.yaml (a file of settings; the others override it)
#              RANK=8 MODEL=google/gemma-2-2b DATASET=iamtarun/python_code_instructions_18k_alpaca
#              EPOCHS=3 MAX_STEPS=100 SEED=1 OUT=outputs/my_run NPROC=2 REPORT_TO=tensorboard
#              OUTPUTS=DIR (where make eval and make serve find adapters), VENV=DIR (another virtualenv)
#              SAMPLES=10 TEMPERATURE=0.2 SAMPLE_TASKS=humaneval-chat (make pass-at-k)
VENV ?= .venv
PYTHON := $(VENV)/bin/python
RANK ?= 16
MODEL ?= embedded
DATASET ?= default
EPOCHS ?=
MAX_STEPS ?=
SEED ?=
OUT ?=
LIMIT ?=
SAMPLES ?= 20
TEMPERATURE ?= 0.8
SAMPLE_TASKS ?=
PORT ?= 8000
OUTPUTS ?= outputs
ADAPTER ?= outputs/lora_r16
BASELINE ?= e6f9fc5
NPROC ?=
RECIPE ?=
REPORT_TO ?=

# NPROC=N: N processes under torchrun (gloo on the CPU, nccl on GPUs), one shared run (distributed.py).
TRAINER = $(if $(NPROC),$(VENV)/bin/torchrun --standalone --nproc-per-node $(NPROC),$(PYTHON))

# Optional overrides become flags only when set. MODEL, DATASET and RANK have defaults for the other targets:
# they become flags only when given (on the command line or in the environment), so as not to override RECIPE.
given = $(filter command line environment,$(origin $(1)))
TRAIN_FLAGS = $(if $(RECIPE),--config $(RECIPE)) $(if $(call given,MODEL),--model $(MODEL)) \
	$(if $(call given,DATASET),--dataset $(DATASET)) $(if $(call given,RANK),--rank $(RANK)) \
	$(if $(EPOCHS),--epochs $(EPOCHS)) $(if $(MAX_STEPS),--max-steps $(MAX_STEPS)) $(if $(SEED),--seed $(SEED)) $(if $(OUT),--out $(OUT)) \
	$(if $(REPORT_TO),--report-to $(REPORT_TO))
# REPORT_TO=tensorboard installs TensorBoard (requirements-tensorboard.txt) before training.
TRAIN_NEEDS = venv $(if $(filter tensorboard,$(REPORT_TO)),$(VENV)/.tensorboard-installed)

.PHONY: venv gguf-venv test smoke train qlora eval pass-at-k sweep serve gguf-check bench bench-profile bench-serve bench-serve-load bench-serve-adapters data

venv: $(VENV)/.runtime-installed

$(VENV)/.runtime-installed: requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements.txt
	$(VENV)/bin/pip check
	touch $@

$(VENV)/.test-installed: $(VENV)/.runtime-installed requirements-test.txt
	$(VENV)/bin/pip install -q -r requirements-test.txt
	$(VENV)/bin/pip check
	touch $@

# llama-cpp-python (built from source, about 10 min here): with it, make test also runs llama.cpp's checks of
# the GGUF export on tiny models (tests/gguf_export), which skip without it.
gguf-venv: $(VENV)/.gguf-installed

$(VENV)/.gguf-installed: $(VENV)/.runtime-installed requirements-gguf.txt
	$(VENV)/bin/pip install -q -r requirements-gguf.txt
	$(VENV)/bin/pip check
	touch $@

test: $(VENV)/.test-installed
	$(PYTHON) -m pytest -q

# The README's own commands, each from a virtualenv built from requirements.txt alone and an empty
# model cache, so that a package only the tests bring cannot hide (tests/smoke.sh; CI runs it).
smoke:
	bash tests/smoke.sh

# LoRA on q/k/v/o; default output outputs/lora_r$(RANK). Re-running resumes from its checkpoint.
train: $(TRAIN_NEEDS)
	$(TRAINER) train.py $(TRAIN_FLAGS)

# QLoRA: NF4 base + LoRA; default output outputs/qlora_r$(RANK).
qlora: $(TRAIN_NEEDS)
	$(TRAINER) train.py --qlora $(TRAIN_FLAGS)

# TensorBoard (requirements-tensorboard.txt, kept out of requirements.txt) on every run under $(OUTPUTS) that
# logged to it (REPORT_TO=tensorboard, or train.py --report-to tensorboard): http://127.0.0.1:6006
$(VENV)/.tensorboard-installed: $(VENV)/.runtime-installed requirements-tensorboard.txt
	$(VENV)/bin/pip install -q -r requirements-tensorboard.txt
	$(VENV)/bin/pip check
	touch $@

.PHONY: tensorboard
tensorboard: $(VENV)/.tensorboard-installed
	$(VENV)/bin/tensorboard --logdir $(OUTPUTS)

# Base model and every adapter under $(OUTPUTS) (outputs/): syntax, BLEU, HumanEval pass@1 (sandboxed), with
# 95% intervals -> outputs/model_comparison.csv / .md, outputs/rank_comparison.png. LIMIT=N for a quick look
# (written to model_comparison_limitN.* beside them).
eval: venv
	$(PYTHON) evaluate.py --model $(MODEL) --dataset $(DATASET) --outputs $(OUTPUTS) $(if $(LIMIT),--limit $(LIMIT))

# pass@k: SAMPLES answers per problem at TEMPERATURE (HumanEval chat and raw, held-out doctest rows) for the base
# model and every adapter under $(OUTPUTS), beside greedy pass@1 -> outputs/pass_at_k.{csv,md}. Cached and
# resumable like make eval; LIMIT=N for a quick look; SAMPLE_TASKS="humaneval-chat" for some of the three.
# SAMPLES=20 makes about 20 times make eval's answers.
pass-at-k: venv
	$(PYTHON) evaluate.py --samples $(SAMPLES) --temperature $(TEMPERATURE) --model $(MODEL) --dataset $(DATASET) \
		--outputs $(OUTPUTS) $(if $(LIMIT),--limit $(LIMIT)) $(if $(SAMPLE_TASKS),--sample-tasks $(SAMPLE_TASKS))

# The study's experiment: LoRA r=8/16/32 and QLoRA r=16 on one recipe (train.py's defaults), evaluated with
# the base model, compared in pairs (exact McNemar) -> outputs/model_comparison.*, outputs/paired_tests.md,
# outputs/training_curves.png. Hours on a CPU; stop it any time, run it again to go on (sweep.py).
sweep: venv
	$(PYTHON) sweep.py --model $(MODEL) --dataset $(DATASET) $(if $(LIMIT),--limit $(LIMIT))

# OpenAI-compatible HTTP server on 127.0.0.1:$(PORT): the base model and every adapter under outputs/.
serve: venv
	$(PYTHON) serve.py --model $(MODEL) --outputs $(OUTPUTS) --port $(PORT)

# llama.cpp against our merged model: the GGUF tests, then $(ADAPTER) exported at f16 and q8_0 and compared on
# 10 held-out prompts (prompt tokens, 32 greedy tokens, where answers stop) -> results/gguf_export/README.md.
gguf-check: $(VENV)/.gguf-installed $(VENV)/.test-installed
	$(PYTHON) -m pytest -q tests/gguf_export
	$(PYTHON) -m bench.gguf_agreement --adapter $(ADAPTER) --model $(MODEL)

# Our LoRA / QLoRA loop side by side with PEFT + HF Trainer (benchmark-only packages in
# requirements-bench.txt); writes bench/RESULTS.md. Run it on an otherwise idle machine (~10 min here).
$(VENV)/.bench-installed: $(VENV)/.runtime-installed requirements-bench.txt
	$(VENV)/bin/pip install -q -r requirements-bench.txt
	touch $@

bench: $(VENV)/.bench-installed
	$(PYTHON) -m bench

# Where the step time of our LoRA and of PEFT + Trainer goes (torch.profiler, by kind of work);
# writes its own section of bench/RESULTS.md (~3 min here).
bench-profile: $(VENV)/.bench-installed
	$(PYTHON) -m bench --profile --steps 2

# serve.py under load (1, 4, 16 concurrent clients; batched vs one request at a time), on the
# `make train` adapter; prints a Markdown table (~7 min here).
bench-serve: venv
	$(PYTHON) -m bench.serving --adapter outputs/lora_r$(RANK)

# serve.py (its own process, the base model) under 1,000 requests from 64 concurrent clients mixing good,
# streamed, bad, huge and abandoned ones: every request ends as it should, and memory comes back.
bench-serve-load: venv
	$(PYTHON) -m bench.serving_load --requests 1000 --clients 64

# The base model and 3 adapters (outputs/lora_r$(RANK) and two derived from it) to 16 clients spread over the 4
# models: one shared base with mixed batches against serve.py as it was at BASELINE (one base copy per model)
# -> results/serving_adapters/README.md. Needs a git checkout and an otherwise idle machine.
bench-serve-adapters: venv
	$(PYTHON) -m bench.serving_adapters --adapter outputs/lora_r$(RANK) --baseline $(BASELINE)

# Rebuild the embedded corpus data/python_pairs.parquet (and data/NOTICE) from the pinned packages in
# requirements-data.txt, in a virtualenv of its own so the mined packages never enter .venv.
.venv-data/.installed: requirements-data.txt
	python3 -m venv .venv-data
	.venv-data/bin/pip install -q -r requirements-data.txt
	touch $@

data: .venv-data/.installed
	.venv-data/bin/python data/build_corpus.py
