#!/usr/bin/env bash
# A plain (non-editable) `pip install .` into a fresh virtual environment: the `localify` console script works,
# the command line is importable as localify.cli, and no top-level `cli` package is installed.
# The dependencies (torch, timm, ...) are borrowed from .venv through a .pth file instead of downloaded again.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
tmp=$(mktemp -d)
had_build=$([ -d build ] && echo 1 || echo 0)
cleanup() { rm -rf "$tmp"; if [ "$had_build" = 0 ]; then rm -rf "$root/build"; fi; }
trap cleanup EXIT

python3 -m venv "$tmp/venv"
purelib() { "$1" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"; }
purelib .venv/bin/python > "$(purelib "$tmp/venv/bin/python")/_localify_deps.pth"
"$tmp/venv/bin/python" -m pip install -q --no-deps "$root"

cd "$tmp"  # away from the checkout: only the installed copy can be imported
"$tmp/venv/bin/python" - <<'PY'
import importlib.util, sysconfig
import localify.cli
site = sysconfig.get_paths()["purelib"]
assert localify.cli.__file__.startswith(site), localify.cli.__file__
assert importlib.util.find_spec("cli") is None, "a top-level 'cli' package was installed"
print("localify.cli from", localify.cli.__file__)
PY
"$tmp/venv/bin/localify" --version
"$tmp/venv/bin/localify" --help > /dev/null
"$tmp/venv/bin/localify" inspect deit_tiny_patch16_224 --json \
  --model-kwargs '{"depth": 2, "embed_dim": 32, "num_heads": 2, "img_size": 64}' > inspect.json
"$tmp/venv/bin/python" -c "import json; assert json.load(open('inspect.json'))['num_blocks'] == 2"
echo "check_install: ok"
