# Two commands: `make demo` runs the whole pipeline on a small default; `make test` runs the tests.
# Both create .venv and install what they need first, idempotently.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install lint bench clean browser

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Torch first, from the pinned CPU build; the project then finds `torch>=2.4` satisfied.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[test,serve]"
	touch $(STAMP)

install: $(STAMP)

# The web UI's tests drive Debian's chromium: installed here when run as root, otherwise they skip and say why.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 || \
	    { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null; } || \
	    echo "chromium could not be installed: the browser tests will skip"; \
	  else echo "chromium not found (install it as root: apt-get install chromium): the browser tests will skip"; fi; }

test: $(STAMP) browser
	$(BIN)/ruff check nanoforge tests bench
	$(BIN)/python -m pytest -q --timeout=900

demo: $(STAMP)
	$(BIN)/nanoforge speedrun --preset cpu-demo

bench: $(STAMP)
	$(BIN)/python bench/tokenizer.py
	$(BIN)/python bench/data.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/eval.py

lint: $(STAMP)
	$(BIN)/ruff check nanoforge tests bench

clean:
	rm -rf $(VENV) build *.egg-info
