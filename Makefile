# Set-up and the two entry points named in README.md.
#   make run   - create .venv (if needed) and run the main job
#   make test  - create .venv (if needed) and run the test suite (slow checks: make test-slow)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: run test test-slow lint venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install -c constraints.txt -e ".[dev]"
	touch $(STAMP)

# Each run is a new study folder runs/digits_search-<time>/ (a study name is never reused).
run: $(STAMP)
	$(BIN)/gradhpo tune experiments/configs/digits_search.yaml --name digits_search-$$(date +%Y%m%d-%H%M%S)

# The default suite leaves out the tests marked slow (multi-process, Ray, kill-and-resume);
# CI runs them in a second step with `make test-slow`.
# pytest exits 5 when it collected no test; that is a failure here (make stops on any non-zero exit).
test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

lint: $(STAMP)
	$(BIN)/ruff check gradhpo models experiments tests

clean:
	rm -rf $(VENV) build *.egg-info
