#!/usr/bin/env bash
# Container entrypoint.
#   docker run IMAGE --config configs/x.yaml key=value ...   trains: the arguments go to train.py through
#                                                            docker/launch_multinode.sh (env-driven, see there)
#   docker run IMAGE python evaluate.py ... | bash | ...     runs that command instead (any program on PATH)
set -euo pipefail
if [ "$#" -gt 0 ] && command -v -- "$1" >/dev/null 2>&1; then
  exec "$@"
fi
exec "$(dirname "${BASH_SOURCE[0]}")/launch_multinode.sh" "$@"
