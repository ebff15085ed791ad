#!/usr/bin/env bash
# The README's main job: set up, make the default data, train JEPA and AdaSSL-V, evaluate both (with a pixel
# decoder each, so rollouts are decoded and scored in pixels), compare.
# Safe to run again: what exists (venv, data, finished runs, evaluations) is reused, and a run that was stopped
# (Ctrl-C, SIGTERM) resumes from its checkpoint; a run is evaluated only once it has finished.
#   bash scripts/run_demo.sh [extra key=value overrides for both training runs]
# Exit status 75: a training run was stopped (Ctrl-C, SIGTERM) after saving a checkpoint; run it again to resume.
# DEMO_CONFIG, DEMO_DATA, DEMO_RUNS replace configs/demo.yaml, data/moving_digits, runs/demo (the tests use them).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/install.sh .venv all dev
py=.venv/bin/python
config=${DEMO_CONFIG:-configs/demo.yaml}
data=${DEMO_DATA:-data/moving_digits}
runs=${DEMO_RUNS:-runs/demo}

if [ ! -f "$data/val/index.json" ]; then
  echo "== 1/4 generating the default data (stochastic moving digits) into $data"
  $py -m worlds.moving_digits --output "$data" --num-videos 1024 --val-videos 256 --seed 0
else
  echo "== 1/4 default data found in $data"
fi
echo "== pipeline throughput (decoder-only vs pipeline)"
$py -m benchmarks.pipeline --shards "$data/train/shard-*.tar" --workers 1 --batches 20

for latent in none adassl_v; do
  run="$runs/$latent"
  echo "== 2/4 training model.latent=$latent -> $run (continues from its newest checkpoint, if any)"
  status=0
  $py train.py --config "$config" run_dir="$run" model.latent="$latent" data.train_shards="$data/train/shard-*.tar" \
    data.val_shards="$data/val/shard-*.tar" "$@" --resume auto || status=$?
  if [ "$status" -eq 75 ]; then
    echo "== $latent stopped before train.steps (checkpoint saved in $run); run this script again to resume" >&2
    exit 75
  elif [ "$status" -ne 0 ]; then
    exit "$status"
  fi
  echo "== 3/4 evaluating $run on the held-out shards (pixel decoder first: trained once, then reused)"
  $py evaluate.py --run "$run" --shards "$data/val/shard-*.tar" --pixels --skip-evaluated
done
echo "== 4/4 comparison"
$py evaluate.py --compare "$runs/none" "$runs/adassl_v" --output "$runs/compare"
echo
echo "Reports:"
echo "  $runs/compare/compare.md             JEPA vs AdaSSL-V side by side (headline table above, psnr.png)"
echo "  $runs/none/eval/report.md           plain JEPA"
echo "  $runs/adassl_v/eval/report.md       AdaSSL-V (plots and frame strips beside it)"
echo "  $runs/adassl_v/eval/decoded-00.gif    a decoded rollout: truth, prior mean, K samples, posterior, copy-last"
