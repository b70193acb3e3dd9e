# make test   fresh clone -> .venv with the project and its dev tools -> the test suite
# make demo   a small sweep on the built-in demo data (CPU, tiny ViT), then its table
# make table  the VTAB-1K table of a sweep: make table SWEEP=outputs/<sweep_name>
# make bench  the throughput benchmark (fast path vs reference path); appends to benchmarks/RESULTS.md

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
SWEEP  ?= outputs/sweep
DEMO_TASKS := dtd,eurosat,clevr_count

.PHONY: install test demo table bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[dev]"
	touch $@

test: install
	$(PY) -m pytest -n 2 -q

data/demo/.complete: | install
	$(PY) -m gist_exp.data.fake --root data/demo --tasks $(DEMO_TASKS) --train 1000 --test 300
	touch $@

demo: install data/demo/.complete
	$(PY) -m gist_exp.train -m experiment=demo task=$(DEMO_TASKS) peft=adapter,lora,vpt gist=on,off
	$(PY) -m gist_exp.table outputs/demo

table: install
	$(PY) -m gist_exp.table $(SWEEP)

bench: install
	$(PY) -m gist_exp.bench

clean:
	rm -rf outputs data/demo
