# Set-up and the main jobs in one place; options reach train and bench through ARGS="...".
# Each target builds .venv on first use: torch first (on a machine without torch, the local
# CPU wheel torch==$(TORCH_VERSION)), then this package with its test, train and trl extras (test brings DeepSpeed
# for the ZeRO-3 tests), pinned to that torch so no later step replaces it.
# Bring your own torch (a CUDA build, say): make test VENV_FLAGS=--system-site-packages
PYTHON ?= python3
VENV ?= .venv
VENV_FLAGS ?=
TORCH_VERSION ?= 2.13.0
BIN := $(VENV)/bin

.PHONY: train demo test bench clean

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install "torch==$(TORCH_VERSION)"
	$(BIN)/python -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/constraints.txt
	$(BIN)/pip install -c $(VENV)/constraints.txt -e ".[test,train,trl]"
	touch $@

train: $(VENV)/.installed
	$(BIN)/papo-train $(ARGS)

demo: $(VENV)/.installed
	$(BIN)/python examples/quickstart.py

test: $(VENV)/.installed
	$(BIN)/python -m pytest tests/ -q

bench: $(VENV)/.installed
	$(BIN)/pip install -c $(VENV)/constraints.txt -e ".[bench]"
	$(BIN)/python -m benchmarks.run $(or $(ARGS),--cpu)

clean:
	rm -rf $(VENV)
