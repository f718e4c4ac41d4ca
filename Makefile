# One command each, from a fresh clone:
#   make test   set up .venv, install, lint, type-check, run the tests
#   make demo   set up .venv, install, convert the demo model (once), serve it and its adapters
VENV ?= .venv

.PHONY: test demo setup lint typecheck pytest clean

test: setup lint typecheck pytest

$(VENV)/.installed: pyproject.toml deploy/install.sh
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

pytest: setup
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache .mypy_cache
