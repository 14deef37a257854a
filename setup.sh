#!/usr/bin/env bash
# Installs everything InstUnique needs into the Python that runs this script
# (activate a virtualenv first to keep it apart). Safe to run again: each step
# is skipped when what it installs is already there.
#   bash setup.sh           run time: torch, detectron2, requirements.txt, this project
#   bash setup.sh --dev     the same plus requirements-dev.txt (pytest, ruff, black)
#   PYTHON=python3.11 bash setup.sh
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
requirements=requirements.txt
for arg in "$@"; do
  case "$arg" in
    --dev) requirements=requirements-dev.txt ;;
    -h|--help) sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "setup.sh: unknown argument '$arg' (expected --dev)" >&2; exit 2 ;;
  esac
done
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

# PyPI's torchvision wheels link the CUDA torch build; this pair runs on CPU and GPU alike.
if ! "$PY" -c "import torch, torchvision" >/dev/null 2>&1; then
  pip_install torch==2.14.1 torchvision==0.29.1
fi

# detectron2 publishes no wheels. A user's own build (with compiled ops) wins; otherwise
# take sal-detectron2, a wheel of upstream main. Its compiled extension is built for
# CPython 3.10, so on 3.11 detectron2 runs in its pure-Python mode: torchvision's ops, and
# pycocotools' COCOeval in COCOEvaluator. --no-deps: requirements.txt has the rest.
if ! "$PY" -c "import detectron2" >/dev/null 2>&1; then
  site=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  pip_install --no-deps --only-binary=:all: --python-version 3.10 --target "$site" \
    --upgrade sal-detectron2==0.7.2
fi

pip_install -r "$requirements"
pip_install --no-deps -e .
"$PY" -c "import detectron2, instunique" || { echo "setup.sh: install failed" >&2; exit 1; }
