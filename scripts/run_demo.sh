#!/usr/bin/env bash
# The README's main job: set up, make the default data, train JEPA and AdaSSL-V, evaluate both, compare.
# Safe to run again: what exists (venv, data, finished runs, evaluations) is reused.
#   bash scripts/run_demo.sh [extra key=value overrides for both training runs]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/install.sh .venv all dev
py=.venv/bin/python
data=data/moving_digits
runs=runs/demo

if [ ! -f "$data/val/index.json" ]; then
  echo "== 1/4 generating the default data (stochastic moving digits) into $data"
  $py -m data_pipeline.make_moving_digits --output "$data" --num-videos 1024 --val-videos 256 --seed 0
else
  echo "== 1/4 default data found in $data"
fi
echo "== pipeline throughput (decoder-only vs pipeline)"
$py -m data_pipeline.bench --shards "$data/train/shard-*.tar" --workers 1 --batches 20

for latent in none adassl_v; do
  run="$runs/$latent"
  if [ -f "$run/eval/metrics.json" ]; then
    echo "== $latent: trained and evaluated already ($run)"
    continue
  fi
  echo "== 2/4 training model.latent=$latent -> $run"
  $py train.py --config configs/demo.yaml run_dir="$run" model.latent="$latent" "$@" --resume auto
  echo "== 3/4 evaluating $run on the held-out shards"
  $py evaluate.py --run "$run" --shards "$data/val/shard-*.tar"
done
echo "== 4/4 comparison"
$py evaluate.py --compare "$runs/none" "$runs/adassl_v" --output "$runs/compare"
echo
echo "Reports:"
echo "  $runs/compare/compare.md             JEPA vs AdaSSL-V side by side"
echo "  $runs/none/eval/report.md           plain JEPA"
echo "  $runs/adassl_v/eval/report.md       AdaSSL-V (plots and frame strips beside it)"
