# The README's two commands are `make main` and `make test`; both set the environment up
# first (idempotent: reinstalls only when pyproject.toml or constraints.txt change).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ditq-installed
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline

.PHONY: setup main test test-slow bench clean-cache

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	# clean-fid's wheel requires torchvision, which must not enter this environment:
	# install it without dependencies (the ones it uses are already installed above).
	$(PY) -m pip install -q --no-deps -c constraints.txt clean-fid==0.1.35
	$(PY) -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torchvision') is not None)" \
		|| (echo "torchvision got installed into $(VENV); it breaks diffusers on CPU torch. Remove it: $(PY) -m pip uninstall -y torchvision" && exit 1)
	touch $(STAMP)

# The main job: calibrate, quantize (RTN: FP, W8A8, W4A8, W4A4), sample, score, print the table.
main: $(STAMP)
	$(VENV)/bin/ditq experiment=digits/rtn_table

test: $(STAMP)
	$(PY) -m pytest -m "not slow" -q

test-slow: $(STAMP)
	$(PY) -m pytest -m slow -q

bench: $(STAMP)
	$(PY) benchmarks/bench_quant_linear.py
	$(PY) benchmarks/bench_gptq.py
