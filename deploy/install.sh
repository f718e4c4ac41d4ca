#!/bin/sh
# Install loraserve into a new virtual environment: the one recipe that both the README's
# `make setup` (deploy/install.sh .venv -e '.[test]') and the Dockerfile's builder stage
# (deploy/install.sh /opt/venv .) run, so that the image is installed the way a clone is.
# tests/deploy/test_dockerfile.py checks that both still call it.
#
# usage: deploy/install.sh VENV PIP_INSTALL_ARGUMENTS...
set -eu
venv=$1
shift
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q "$@"
