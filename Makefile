# Two commands set up everything on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
APT_PACKAGES := tesseract-ocr tesseract-ocr-eng fonts-liberation wamerican
PYTEST_ARGS ?=

.PHONY: venv system-deps demo reproduce lint test test-slow test-gpu bench clean

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || python3.11 -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

venv: $(VENV)/.installed system-deps

# System packages: installed when run as root; otherwise a clear message naming them.
system-deps:
	@missing=""; \
	command -v tesseract >/dev/null 2>&1 || missing="$$missing tesseract-ocr tesseract-ocr-eng"; \
	test -f /usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf || missing="$$missing fonts-liberation"; \
	test -s /usr/share/dict/words || missing="$$missing wamerican"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = "0" ]; then \
	    echo "installing system packages:$$missing"; \
	    (apt-get update -qq || true) && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES) >/dev/null; \
	  else \
	    echo "WARNING: missing system packages:$$missing -- run: sudo apt-get install -y $(APT_PACKAGES)"; \
	  fi; \
	fi

demo: venv
	$(PY) demo.py --out outputs/demo

# Each paper's headline effect on the world (<= 60 min on 2 cores): results/reproduce/<part>.json + reproduction.md,
# then the report and its figure are copied to docs/reproduction.{md,png} (the one deliberate write into the tree). REPRODUCE_ARGS e.g.
# "--parts textspan spatial" or "--pretrained path/to/tiny_clip_world.pt".
REPRODUCE_OUT ?= results/reproduce
REPRODUCE_ARGS ?=
reproduce: venv
	$(PY) -m xclip.reproduction --config configs/reproduce/world.yaml --out $(REPRODUCE_OUT) $(REPRODUCE_ARGS)
	cp $(REPRODUCE_OUT)/reproduction.md docs/reproduction.md
	cp $(REPRODUCE_OUT)/reproduction.png docs/reproduction.png

lint: venv
	$(PY) -m ruff check .

test: venv lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-slow: venv
	$(PY) -m pytest -q -m "slow or not slow" $(PYTEST_ARGS)

# CUDA tier (tests/test_gpu.py): each method's step on CUDA == CPU, mixed precision, cross-device checkpoints.
# Skips without a GPU. On a lent device: bash benchmarks/gpu_smoke.sh (this tier + step benchmarks, < 8 min).
test-gpu: venv
	$(PY) -m pytest -q -m gpu $(PYTEST_ARGS)

bench: venv
	for f in benchmarks/*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

clean:
	rm -rf outputs runs results cache .pytest_cache build
