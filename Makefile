# Two commands on a fresh machine:  `make quickstart` (set up, train, sample)  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.gptkit-installed

.PHONY: setup quickstart test test-slow test-all benchmarks clean

# A virtual environment with the CPU build of PyTorch 2.13 and gptkit (editable) with its extras.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# Fetch the Shakespeare corpus, train the default small model on CPU, then print a sample.
quickstart: $(STAMP)
	$(BIN)/gptkit train configs/shakespeare-char.yaml --overwrite  # a second quickstart replaces the first run
	$(BIN)/gptkit generate out/shakespeare-char --prompt "ROMEO:" --seed 1  # 300 characters: the recipe's sample section

# The default test run (under 15 minutes on 2 cores); slow tests are a separate target.
test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" -q

test-slow: $(STAMP)
	# Multi-process torchrun tests on 2 shared cores: a failed test gets one rerun (--lf) before failing.
	$(BIN)/python -m pytest -m slow -q || [ $$? -eq 5 ] || $(BIN)/python -m pytest -m slow -q --lf

test-all: test test-slow

benchmarks: $(STAMP)
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/generate_throughput.py

clean:
	rm -rf out data .pytest_cache
