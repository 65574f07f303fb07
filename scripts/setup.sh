#!/usr/bin/env bash
# Create .venv and install localify with its test extra (idempotent; about 2 minutes the first time).
# torch and torchvision are resolved together from the package index: never pin torch alone, or the
# torchvision that timm needs fails to import.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import localify, timm, transformers, pytest" 2>/dev/null; then
  python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[test]"
fi
