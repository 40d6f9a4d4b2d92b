# Each target creates .venv (repo root) on first use and installs the project into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test golden bench clean gpu-kit gpu-kit-check

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

DEMO_ROWS := prune.kind,rewind_iteration

demo: $(STAMP)
	$(BIN)/lth sweep run sweeps/demo_digits.yaml
	$(BIN)/lth report table --experiment demo-digits --rows $(DEMO_ROWS) --format latex --out reports/demo_table.tex
	$(BIN)/lth report table --experiment demo-digits --rows $(DEMO_ROWS) --format markdown --out reports/demo_table.md
	$(BIN)/lth report plot --experiment demo-digits --rows $(DEMO_ROWS) --out reports/demo_imp.png
	cat reports/demo_table.md

# two pytest-xdist workers, each test file on one, longest first (tests/conftest.py FIRST)
TEST_WORKERS ?= 2

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# record this machine's golden records (tests/golden/make_records.py says when)
golden: $(STAMP)
	$(BIN)/python tests/golden/make_records.py

bench: $(STAMP)
	$(BIN)/python bench/trial_speed.py
	$(BIN)/python bench/sweep_efficiency.py
	$(BIN)/python bench/sweep_sharing.py

# the wheels a lent GPU machine lacks, for its Python (3.12), in .kit/cp312 (README, "A GPU for a day")
gpu-kit:
	$(PYTHON) bench/gpu_kit.py

# the same kit for this machine's Python, installed into a fresh stand-in for the device's
# image, then bench/gpu_day.sh on this CPU (GPU_DAY_CPU=1)
gpu-kit-check:
	bash bench/gpu_kit_check.sh

clean:
	rm -rf $(VENV) runs reports
