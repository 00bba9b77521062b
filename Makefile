# Two entry points for a fresh machine:
#   make run [DATA=path/to/chest_xray] [PRESET=quick]  audit, train, evaluate, report
#   make test                                          install, lint, run the test suite
VENV   ?= .venv
PYTHON ?= python3.11
DATA   ?= kaggle
PRESET ?= default
RUNS   ?= runs
NAME   ?= $(PRESET)
BIN    := $(VENV)/bin

.PHONY: install run test lint browser clean

install: $(VENV)/.installed

# torch first, pinned: pip takes it from this machine's disk (uv/poetry would download GBs).
# Every other package at the version in constraints.txt, so that an upstream release cannot
# change a run or break CI unnoticed.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

# A run folder already there (same NAME): continue it if interrupted, else evaluate and
# report it again; NAME=another starts a new run.
run: install
	@if [ -f $(RUNS)/$(NAME)/config.yaml ]; then \
	  echo "continuing $(RUNS)/$(NAME) (NAME=another for a new run)"; \
	  $(BIN)/cxr run --resume $(RUNS)/$(NAME); \
	else \
	  $(BIN)/cxr run $(DATA) --preset $(PRESET) --runs-dir $(RUNS) --name $(NAME); \
	fi

# The browser test drives Debian's Chromium (Playwright cannot download its own here).
browser:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)

lint: install
	$(BIN)/ruff check src tests benchmarks

test: install browser lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
