#!/usr/bin/env bash
# Creates .venv with rayquant and its CPU training stack (no GPU needed), from requirements/cpu.lock.
# Usage: bash scripts/setup.sh            (idempotent: an up-to-date .venv is left as it is)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${RAYQUANT_VENV:-.venv}
python=${PYTHON:-python3}
stamp="$venv/.rayquant-lock.sha256"
want=$(sha256sum requirements/cpu.lock pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
# --no-deps: the lock is complete, and unsloth's own metadata would pull xformers and a CUDA torch.
"$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps -r requirements/cpu.lock
"$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
echo "$want" > "$stamp"
echo "rayquant installed in $venv"
