#!/bin/sh
# The one install of aiworker: `make run` / `make test` (Makefile) and the container image
# (Dockerfile) both run this script, so the tests exercise the image's install steps.
#
#   sh scripts/install.sh [--venv DIR] [--editable] [--extras LIST] [--dry-run]
#
# Makes the virtual environment DIR (default .venv) when it is missing and pip-installs the
# package from the repository root into it: editable with --editable (development), with the
# optional dependencies LIST (comma separated, e.g. test) with --extras. --dry-run prints the
# commands without running them.
#
# Environment:
#   AIWORKER_TORCH   which torch build (its version is the torch== pin in pyproject.toml):
#                    auto  whatever pip's configured index resolves (default; make run/test)
#                    cpu   the CPU-only wheel from the PyTorch CPU index (the slim image)
#                    cuda  a CUDA wheel: the plain PyPI wheel for Linux x86_64 bundles the CUDA
#                          runtime; TORCH_INDEX_URL picks another (a PyTorch cuXYZ index)
#   TORCH_INDEX_URL  the index torch comes from (overrides the variant's default)
#   PYTHON           the interpreter that makes the virtual environment (default python3)
set -eu

CPU_INDEX=https://download.pytorch.org/whl/cpu
venv=.venv
editable=""
extras=""
dry_run=0

usage() {
    echo "usage: sh scripts/install.sh [--venv DIR] [--editable] [--extras LIST] [--dry-run]" >&2
    exit 2
}

while [ $# -gt 0 ]; do
    case "$1" in
        --venv) [ $# -ge 2 ] || usage; venv=$2; shift 2 ;;
        --editable) editable=-e; shift ;;
        --extras) [ $# -ge 2 ] || usage; extras=$2; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        *) usage ;;
    esac
done

cd "$(dirname "$0")/.."
variant=${AIWORKER_TORCH:-auto}
python=${PYTHON:-python3}
case "$variant" in
    auto | cpu | cuda) ;;
    *) echo "install.sh: AIWORKER_TORCH must be auto, cpu or cuda (got '$variant')" >&2; exit 2 ;;
esac

# pip of the virtual environment.
pip() {
    "$venv/bin/python" -m pip "$@"
}

# Print a command, then run it (unless --dry-run).
run() {
    if [ "$1" = pip ]; then echo "+ $venv/bin/python -m $*"; else echo "+ $*"; fi
    [ "$dry_run" = 1 ] || "$@"
}

# The torch requirement pinned in pyproject.toml (one place for the version).
torch_pin() {
    pin=$(sed -n 's/^ *"\(torch==[^"]*\)".*/\1/p' pyproject.toml)
    [ -n "$pin" ] || { echo "install.sh: no torch== pin in pyproject.toml" >&2; exit 1; }
    echo "$pin"
}

# Install the torch build the variant asks for, before the package (which then keeps it).
install_torch() {
    pin=$(torch_pin)
    case "$variant" in
        auto) [ -z "${TORCH_INDEX_URL:-}" ] || run pip install -q "$pin" --index-url "$TORCH_INDEX_URL" ;;
        cpu) run pip install -q "$pin" --index-url "${TORCH_INDEX_URL:-$CPU_INDEX}" ;;
        cuda)
            if [ -n "${TORCH_INDEX_URL:-}" ]; then
                run pip install -q "$pin" --index-url "$TORCH_INDEX_URL"
            else
                run pip install -q "$pin"
            fi ;;
    esac
}

# Fail when the installed torch is not the build the variant asked for (cpu: no CUDA; cuda:
# built with CUDA), so an image never ships the wrong one quietly.
check_torch() {
    [ "$dry_run" = 1 ] && return 0
    "$venv/bin/python" - "$variant" <<'EOF'
import sys

import torch

variant, cuda = sys.argv[1], torch.version.cuda
print(f"torch {torch.__version__} ({'CUDA ' + cuda if cuda else 'CPU only'})")
if variant == "cpu" and cuda or variant == "cuda" and not cuda:
    sys.exit(f"install.sh: AIWORKER_TORCH={variant} but torch {torch.__version__} is "
             f"{'built with CUDA ' + cuda if cuda else 'CPU only'}")
EOF
}

if [ ! -x "$venv/bin/python" ]; then
    run "$python" -m venv "$venv"
    run pip install -q --upgrade pip
fi
install_torch
run pip install -q $editable ".${extras:+[$extras]}"
check_torch
if [ "$dry_run" = 1 ]; then
    echo "dry run: nothing installed"
else
    echo "aiworker installed in $venv (torch: $variant)"
fi
