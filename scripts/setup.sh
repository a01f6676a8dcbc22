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
pip_install() {
  # This machine's pip config names optional local mirrors; drop pip's notes about absent ones.
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps "$@" 2>&1 \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}
pip_install -r requirements/cpu.lock
pip_install --no-build-isolation -e .
echo "$want" > "$stamp"
echo "rayquant installed in $venv"
