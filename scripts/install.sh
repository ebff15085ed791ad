#!/usr/bin/env bash
# The one install script: the README's commands, CI and docker/Dockerfile all run it.
#   bash scripts/install.sh VENV_DIR [deps|project|all] [EXTRAS]
# deps:    create VENV_DIR (if missing) and install the dependencies listed in pyproject.toml (build-system
#          requires, [project].dependencies and the extras in EXTRAS, comma-separated: dev adds the test and lint
#          tools; the Docker image leaves them out) at the versions pinned in constraints.txt. pyproject.toml is
#          the one list; this script reads it with tomllib, so it needs Python >= 3.11 (requires-python).
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
"$venv/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { echo "[install] $venv/bin/python is older than Python 3.11, which the project requires" >&2; exit 1; }
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
stamp="$venv/.deps-$( (cat "$here/constraints.txt" "$here/pyproject.toml"; echo "$extras") | sha256sum | cut -c1-16)"

if [ "$what" = deps ] || [ "$what" = all ]; then
  if [ -f "$stamp" ]; then
    echo "[install] dependencies already match constraints.txt"
  else
    # The requirements of pyproject.toml, one a line: the build backend (the project step below builds without
    # isolation), [project].dependencies, then those of each extra in EXTRAS (an unknown extra is an error).
    requirements=$("$venv/bin/python" - "$here/pyproject.toml" "$extras" <<'EOF'
import sys
import tomllib

with open(sys.argv[1], "rb") as f:
    pyproject = tomllib.load(f)
optional = pyproject["project"].get("optional-dependencies", {})
wanted = [e.strip() for e in sys.argv[2].split(",") if e.strip()]
unknown = [e for e in wanted if e not in optional]
if unknown:
    sys.exit(f"[install] unknown extras {unknown}; pyproject.toml has {sorted(optional)}")
print(*pyproject["build-system"]["requires"], *pyproject["project"]["dependencies"], sep="\n")
for extra in wanted:
    print(*optional[extra], sep="\n")
EOF
    )
    mapfile -t packages <<<"$requirements"
    echo "[install] installing pinned dependencies (torch is large: a minute or more)"
    # Everything pinned by constraints.txt; the torch/torchvision pair first so nothing pulls another build.
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
  (cd / && "$venv/bin/python" -c "import data_pipeline, worldmodel, worlds") \
    || { echo "[install] the project does not import from $venv" >&2; exit 1; }
  echo "[install] project installed in $venv"
fi
