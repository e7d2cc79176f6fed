# Everything runs inside .venv, created on first use from the pinned requirements files.
PYTHON := .venv/bin/python
RANK ?= 16
MODEL ?= embedded
DATASET ?= default
EPOCHS ?=
MAX_STEPS ?=
OUT ?= outputs/lora_r$(RANK)

# Optional overrides become flags only when set.
TRAIN_FLAGS = --model $(MODEL) --dataset $(DATASET) \
	$(if $(EPOCHS),--epochs $(EPOCHS)) $(if $(MAX_STEPS),--max-steps $(MAX_STEPS))

.PHONY: venv test train qlora eval bench data

venv: .venv/.runtime-installed

.venv/.runtime-installed: requirements.txt
	python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	.venv/bin/pip install -q -r requirements.txt
	touch $@

.venv/.test-installed: .venv/.runtime-installed requirements-test.txt
	.venv/bin/pip install -q -r requirements-test.txt
	touch $@

test: .venv/.test-installed
	$(PYTHON) -m pytest -q tests
