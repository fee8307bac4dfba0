# One entry point for set-up, the main job and the tests. Every target is idempotent.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# pytest-xdist workers: the suite is mostly single-threaded Python (exporters, tracing), one worker per core pays.
# Each test file runs whole in one worker (its module fixtures are built once); exported artifacts are shared.
JOBS ?= 2
XDIST := -n $(JOBS) --dist loadfile

.PHONY: venv demo lint test test-all bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev,all]"
	touch $(STAMP)

venv: $(STAMP)

# The main job: export LeViT-128S to ONNX and pass the parity gate (random weights: none are downloadable offline).
demo: $(STAMP)
	$(BIN)/levit-deploy export levit_128s --to onnx --init random --out out/levit_128s_onnx

# The import layers of docs/design.md (pyproject.toml, [tool.importlinter]): no module imports from a layer above.
lint: $(STAMP)
	$(BIN)/lint-imports

# The fast default run: each family's smallest and largest variant (the `slow` marker holds the rest).
test: $(STAMP)
	$(BIN)/python -m pytest -q $(XDIST) -m "not slow and not alone"

# The full matrix: every variant of every family (what CI runs). Tests marked `alone` compare timings across runs:
# they run after the parallel part, with the machine to themselves.
test-all: $(STAMP)
	$(BIN)/python -m pytest -q $(XDIST) -m "not alone"
	$(BIN)/python -m pytest -q -p no:xdist -m alone

bench: $(STAMP)
	$(BIN)/levit-deploy bench levit_128s --init random --runtime torch --runtime ort

clean:
	rm -rf $(VENV) out
