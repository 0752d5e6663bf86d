#!/bin/bash
# Issue 13: choose the training recipe by measurement. From the repo root:
#   bash docs/recipe.sh speed [NAME...]  # 1. img/s of the reference and the variants, side by side, alone
#   bash docs/recipe.sh train [NAME...]  # 2. train each variant on its share of the budget (resumable)
#   bash docs/recipe.sh score [NAME...]  # 3. KID and FID of each (N=$N, DDIM eta=1, 50 steps)
#   bash docs/recipe.sh table            # 4. the results as a markdown table, best FID first
#
# The budget is 20 minutes of training on 2 CPU cores. This machine's speed varies up to 2.5x from
# day to day, so "--minutes 20" would not mean the same thing twice. Instead the budget is fixed in
# images: the reference recipe (the README's quality run: small, 32x32, batch 32) gets 25,600
# images, what it trained in 20 minutes at 21 img/s. Every other variant gets 25,600 x its speed
# relative to the reference, measured side by side in one run (step 1), so that a smaller or faster
# network does more steps. Training is then defined by steps, and a run gives the same result
# whatever else the machine is doing; only step 1 must run alone.
set -euo pipefail
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-q/recipe}
N=${N:-500}
BUDGET_IMAGES=${BUDGET_IMAGES:-25600}
DATA=../shared/data/cars
REFERENCE="--preset small --size 32 --batch-size 32 --lr 5e-4 --warmup-steps 100 --schedule cosine --classes none"
declare -A VARIANTS=(
  [reference]=""
  [dropout0]="--dropout 0"
  [lr2e-4]="--lr 2e-4"
  [lr1e-3]="--lr 1e-3"
  [batch16]="--batch-size 16"
  [batch64]="--batch-size 64"
  [v]="--objective v"
  [min-snr5]="--min-snr-gamma 5"
  [ema0]="--ema-decay 0"
  [ema0.999]="--ema-decay 0.999"
  [ema0.9995]="--ema-decay 0.9995"
  [tiny]="--preset tiny"
  [channels96]="--base-channels 96"
  [attn8]="--attn-res 8"
  [attn-none]="--attn-res none"
  [l1]="--loss l1"
  [linear]="--schedule linear"
)
FASTER_OR_SLOWER="reference batch16 batch64 tiny channels96 attn8 attn-none"  # the others: same img/s
mkdir -p "$OUT"
names() { if [ $# -gt 0 ]; then echo "$@"; else printf '%s\n' "${!VARIANTS[@]}" | sort; fi; }
batch_of() { echo "$REFERENCE ${VARIANTS[$1]}" | grep -o -- '--batch-size [0-9]*' | tail -1 | cut -d' ' -f2; }

case "${1:-}" in
speed)  # 40 steps of the reference, then of each variant whose speed differs; img/s over steps 20-40
  shift
  for name in reference $(if [ $# -gt 0 ]; then echo "$@"; else echo "$FASTER_OR_SLOWER"; fi | sed 's/reference//'); do
    rm -rf "$OUT/speed-$name"
    $PY ddpm.py train --data $DATA $REFERENCE ${VARIANTS[$name]} --steps 40 --log-every 20 --save-every 1000 \
      --out "$OUT/speed-$name" >/dev/null 2>&1
    $PY -c "import json; print('$name', json.loads(open('$OUT/speed-$name/log.jsonl').read().splitlines()[-1])['img_per_s'])"
  done | tee -a "$OUT/speed.txt"  # a later line for a name replaces an earlier one
  ;;
train)
  shift
  for name in $(names "$@"); do
    ratio=1  # a variant of the reference's speed gets the reference's images; the others, in proportion
    if [[ " $FASTER_OR_SLOWER " == *" $name "* ]]; then
      speed_of() { grep "^$1 " "$OUT/speed.txt" | tail -1 | cut -d' ' -f2; }
      ratio="$(speed_of "$name") / $(speed_of reference)"
    fi
    steps=$($PY -c "print(round($BUDGET_IMAGES * $ratio / $(batch_of "$name")))")
    echo "$name: $steps steps"
    $PY ddpm.py train --data $DATA $REFERENCE ${VARIANTS[$name]} --steps "$steps" --log-every 25 \
      --save-every 250 --out "$OUT/$name" 2>&1 | tail -1
  done
  ;;
score)
  shift
  for name in $(names "$@"); do
    [ -s "$OUT/$name.json" ] && continue
    $PY ddpm.py fid "$OUT/$name" --real $DATA -n "$N" --json > "$OUT/$name.json.tmp"
    mv "$OUT/$name.json.tmp" "$OUT/$name.json"
  done
  ;;
table)
  $PY - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = []
for result in out.glob("*.json"):
    log = (out / result.stem / "log.jsonl").read_text().splitlines()
    last, score = json.loads(log[-1]), json.loads(result.read_text())
    rows.append((score["fid"], result.stem, last["step"], last["images_seen"], score["kid"], score["kid_std"]))
print("| variant | steps | images | FID | KID x10^3 |\n| --- | ---: | ---: | ---: | ---: |")
for fid, name, steps, images, kid, kid_std in sorted(rows):
    print(f"| {name} | {steps} | {images:,} | {fid:.1f} | {kid * 1e3:.1f} ± {kid_std * 1e3:.1f} |")
EOF
  ;;
*) sed -n 2,6p "$0"; exit 2 ;;
esac
