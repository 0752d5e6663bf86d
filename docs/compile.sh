#!/bin/bash
# torch.compile on this machine: seconds to the first training step (compiling included) and img/s
# after, for the whole network compiled at once against each U-Net block on its own (regional), each
# cold (an empty cache folder) and warm (a second process on the same cache). Run it alone; from the
# repo root:  bash docs/compile.sh [PRESET] [SIZE] [DEVICE]      (default: tiny 32 cpu)
set -euo pipefail
PY=${PYTHON:-.venv/bin/python}
PRESET=${1:-tiny}; SIZE=${2:-32}; DEVICE=${3:-cpu}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "# $PRESET at ${SIZE}x$SIZE on $DEVICE, $(date -u +%Y-%m-%d), torch $($PY -c 'import torch; print(torch.__version__)')"
echo "| compile | cache | first step, s | train img/s |"
echo "| --- | --- | ---: | ---: |"
for scope in none whole regional; do
  for cache in cold warm; do
    [ $scope = none ] && [ $cache = warm ] && continue
    how=$([ $scope = none ] && echo "--no-compile" || echo "--compile --compile-scope $scope")
    $PY ddpm.py bench --preset "$PRESET" --size "$SIZE" --batch-size 32 --steps 5 --warmup 1 --device "$DEVICE" \
      $how --cache-dir "$work/$scope" --json 2>/dev/null | $PY -c "
import json, sys
r = json.load(sys.stdin)['results']['ddpm.py']
print(f\"| $scope | $([ $scope = none ] && echo - || echo $cache) | {r['first_step_s']:.1f} | {r['train_img_s']:.1f} |\")"
  done
done
