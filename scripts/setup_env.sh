#!/usr/bin/env bash
# Creates (or reuses) the virtualenv .venv/ with everything the tests, the main job and the
# benchmarks need on a CPU-only machine, upstream SGLang's engine included, and installs this
# overlay in editable mode (tests and the CLI run the working tree).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
. .venv/bin/activate
stamp=.venv/.mezo-requirements
want=$(cat requirements/cpu.txt requirements/no-deps.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  python -m pip install -q --upgrade pip
  # TORCH_INDEX: an index with CPU torch wheels, where PyPI's default torch is a CUDA build
  python -m pip install -q ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} -r requirements/cpu.txt
  python -m pip install -q --no-deps -r requirements/no-deps.txt
  python -m pip install -q --no-deps --no-build-isolation -e .
  echo "$want" > "$stamp"
fi
python -c "import sglang.srt.mezo_trainer
from sglang.srt.mezo.backends import cpu_standins
cpu_standins.install()
import sglang.srt.entrypoints.engine" 2>/dev/null \
  || { echo "setup_env: the overlay or upstream SGLang does not import" >&2; exit 1; }
