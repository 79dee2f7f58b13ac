# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
DEMO   := demo-output

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip "setuptools>=68" wheel
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -c "import sam2" 2>/dev/null || SAM2_BUILD_CUDA=0 $(PIP) install -q --no-build-isolation sam2==1.1.0
	$(PIP) install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	rm -rf $(DEMO)
	$(VENV)/bin/mosaic-toolkit synth --out $(DEMO)/synthetic --n 4 --seed 7
	$(VENV)/bin/mosaic-toolkit augment $(DEMO)/synthetic --out $(DEMO)/augmented --seed 7
	$(VENV)/bin/mosaic-toolkit eval --pred $(DEMO)/synthetic/masks --gt $(DEMO)/synthetic --out $(DEMO)/report
	@echo "Demo outputs are in $(DEMO)/"

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	for b in bench/*.py; do $(PY) $$b; done

clean:
	rm -rf $(DEMO) .pytest_cache
