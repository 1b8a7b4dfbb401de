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

# The main job: a study on Fashion-MNIST (real images, Debian's dataset-fashion-mnist, installed
# here when missing and apt-get is usable as root), or on the bundled digits when it cannot be
# installed. Each run is a new study folder runs/<config>-<time>/ (a study name is never reused).
FASHION_MNIST_DIR := /usr/share/datasets/fashion-mnist

run: $(STAMP)
	@if [ ! -d $(FASHION_MNIST_DIR) ] && [ "$$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) \
			|| echo "warning: could not install dataset-fashion-mnist with apt-get" >&2; \
	fi
	@if [ -d $(FASHION_MNIST_DIR) ]; then config=fmnist_search; else \
		echo "Fashion-MNIST is not installed ($(FASHION_MNIST_DIR); as root: apt-get install -y dataset-fashion-mnist): running the digits study instead" >&2; \
		config=digits_search; fi; \
	$(BIN)/gradhpo tune experiments/configs/$$config.yaml --name $$config-$$(date +%Y%m%d-%H%M%S)

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
