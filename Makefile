# The two commands of the README: `make serve` and `make test`. Both set up .venv idempotently;
# `make test` also installs the Debian programs the tests drive when they are missing.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
export PIP_DISABLE_PIP_VERSION_CHECK := 1

# PyPI's Linux torch wheel is the CUDA build (GBs of nvidia-* wheels); the CPU build is 2.13.0+cpu on
# PyTorch's CPU index, and PyPI has no +cpu version, so this cannot fall back to CUDA. --no-deps: torch's
# own dependencies come from PyPI in the second install. constraints.txt then holds torch at 2.13.0.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
# System programs of the tests: Debian's chromium (the web page test; Playwright downloads nothing) and
# redis-server (fault tests start their own servers on free ports).
TOOLS := chromium redis-server

.PHONY: serve test lint venv tools clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --no-deps --extra-index-url $(TORCH_CPU_INDEX) torch==2.13.0+cpu
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -c "import sys, torch; sys.exit(torch.version.cuda and f'.venv got torch {torch.__version__}')"
	touch $(STAMP)

venv: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/ddpm-serve

tools:
	@missing=$$(for p in $(TOOLS); do command -v $$p >/dev/null || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing the tests' system programs:" $$missing; \
		sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq $$missing; \
	fi

test: $(STAMP) tools
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV)
