#!/usr/bin/env bash
# The GPU check in one command (docs/gpu.md). Run from the repository root.
#   bench/gpu_check.sh --prepare    # here, with internet to PyPI: fetch the pure-Python wheels the GPU
#                                   # machine lacks into gpu_wheels/ (ignored by git, carried with the tree)
#   bench/gpu_check.sh [ARGS...]    # on the GPU machine: unpack them, run bench/gpu_check.py ARGS
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=gpu_wheels
# What tbps imports that the GPU machines (torch, torchvision, timm, transformers, ...) do not have.
PACKAGES="open_clip_torch==3.3.0 ftfy wcwidth"
if [[ "${1:-}" == "--prepare" ]]; then
  mkdir -p "$WHEELS"
  PIP="${PIP:-python3 -m pip}"
  $PIP download --no-deps --only-binary=:all: $PACKAGES -d "$WHEELS"
  ls -l "$WHEELS"
  exit 0
fi
PY="${PYTHON:-python3}"
ls "$WHEELS"/*.whl >/dev/null 2>&1 || { echo "no wheels in $WHEELS/: run bench/gpu_check.sh --prepare first" >&2; exit 2; }
# Wheels are zip files; open_clip reads its model configs and BPE vocabulary as files, so unpack them
# (a zip on sys.path would hide those) into an ignored folder next to the wheels.
"$PY" - "$WHEELS" <<'PYEOF'
import sys, zipfile, pathlib
root = pathlib.Path(sys.argv[1]); site = root / "site"
site.mkdir(exist_ok=True)
for whl in sorted(root.glob("*.whl")):
    stamp = site / (whl.name + ".done")
    if not stamp.exists():
        zipfile.ZipFile(whl).extractall(site)
        stamp.touch()
PYEOF
export PYTHONPATH="$PWD/src:$PWD/$WHEELS/site${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$PY" bench/gpu_check.py "$@"
