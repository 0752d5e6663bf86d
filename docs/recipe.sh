#!/bin/bash
# Issue 13: choose the training recipe by measurement. From the repo root:
#   bash docs/recipe.sh speed [NAME...]  # 1. img/s of the reference and the variants, side by side, alone
#   bash docs/recipe.sh train [NAME...]  # 2. train each variant on its share of the budget (resumable)
#   bash docs/recipe.sh score [NAME...]  # 3. KID and FID of each (N=$N, DDIM eta=1, 50 steps)
#   bash docs/recipe.sh table            # 4. the results as a markdown table, best KID first
#   bash docs/recipe.sh confirm NAME...  # 5. finalists: FID and KID at N=1000 ($OUT/NAME-n1000.json)
#   bash docs/recipe.sh samplers NAME    # 6. the winner's samplers at N=1000 ($OUT/NAME-samplers/*.json;
#                                        #    SAMPLERS="ddim-25 dpm++-20 ddpm-large" for some of them)
#   bash docs/recipe.sh minutes NAME     # 7. FID after 5, 10, 20, 40 minutes' worth of images, then
#   python docs/plot_minutes.py $OUT/NAME-minutes docs/minutes.png   # the plot
# The runs go to $RUNS (runs/recipe, not committed); the measurements to $OUT (docs/recipe, committed):
# speed.txt and one JSON per score, which also records the steps and images its run had reached.
# NAME is one of VARIANTS below, or several joined by "+" (tiny+min-snr5: the reference with both
# changes), which is how the winners are combined and how the final recipe's ablation is named.
#
# The budget is 20 minutes of training on 2 CPU cores. This machine's speed varies up to 2.5x from
# day to day, so "--minutes 20" would not mean the same thing twice. Instead the budget is fixed in
# images: the reference recipe (the sampler table's run in docs/quality.md: small, 32x32, batch 32) gets 25,600
# images, what it trained in 20 minutes at 21 img/s. Every other variant gets 25,600 x its speed
# relative to the reference, measured side by side in one run (step 1), so that a smaller or faster
# network does more steps. Training is then defined by steps, and a run gives the same result
# whatever else the machine is doing; only step 1 must run alone.
# Edit this file only while no step of it runs: bash reads a script as it executes it.
set -euo pipefail
PY=${PYTHON:-.venv/bin/python}
RUNS=${RUNS:-runs/recipe}
OUT=${OUT:-docs/recipe}
N=${N:-500}
PART=${PART:-125}  # DDPM samples per part (samplers)
SIZE=32
BUDGET_IMAGES=${BUDGET_IMAGES:-25600}
DATA=../shared/data/cars
REFERENCE="--preset small --size $SIZE --batch-size 32 --lr 5e-4 --warmup-steps 100 --schedule cosine --classes none"
declare -A VARIANTS=(
  [reference]=""
  [dropout0]="--dropout 0"
  [dropout0.1]="--dropout 0.1"  # the reference's own: tiny+dropout0.1 is a tiny with dropout
  [lr2e-4]="--lr 2e-4"
  [lr1e-3]="--lr 1e-3"
  [batch16]="--batch-size 16"
  [batch64]="--batch-size 64"
  [v]="--objective v"
  [min-snr5]="--min-snr-gamma 5"
  [ema0]="--ema-decay 0"  # not trained: NAME+ema0 is NAME's run scored with fid --no-ema (see run_of)
  [ema0.95]="--ema-decay 0.95"  # the EMA's decay warms up as (1 + s) / (10 + s): 0.989 at step 800, so
  [ema0.98]="--ema-decay 0.98"  # only caps below that change a 20-minute run; the reference has 0.9999
  [ema0.995]="--ema-decay 0.995"  # the recipe's decay reaches 0.995 at step 1,790 and 0.9984 at its end
  [tiny]="--preset tiny --attn-res 16"  # tiny as measured: with the 16x16 attention layer it had until then
  [channels96]="--base-channels 96"
  [channels64]="--base-channels 64"  # small's own width: tiny+channels64 is a wider tiny
  [channels48]="--base-channels 48"
  [blocks1]="--blocks-per-level 1"  # shallower: 1 residual block per level going down (2 coming up)
  [blocks2]="--blocks-per-level 2"  # deeper: tiny has 1 (tiny+blocks2 is a deeper tiny)
  [attn8]="--attn-res 8"
  [attn-none]="--attn-res none"
  [seed1]="--seed 1"  # the same recipe from another seed: how far apart two runs land
  [l1]="--loss l1"
  [linear]="--schedule linear"
  [classes]="--classes auto"  # class-conditional on the devkit's 196 classes (label dropout 0.1); same img/s
  [wsd]="--lr-schedule wsd"  # the rate decays linearly to 0 over the last 20% of the run's steps; same img/s
  [cosine]="--lr-schedule cosine"  # the rate decays as a half cosine to 0 after the warm-up; same img/s
  [lr2e-3]="--lr 2e-3"
  [t-edm]="--t-sampling edm"  # timesteps drawn by EDM's log-normal noise levels, not uniformly; same img/s
  [t-sd3]="--t-sampling sd3"  # by Stable Diffusion 3's logit-normal t; same img/s
  [ema-std0.15]="--ema-std 0.15"  # EDM2's power EMA, 0.15 of the run wide (the warm-up's is ~0.09); same img/s
  [mult124]="--channel-mults 1,2,4"  # tiny's 8x8 level twice as wide (128 channels, not 64)
  [groups32]="--norm-groups 32"  # DDPM's 32 GroupNorm groups; tiny has 8 (4 channels a group at 32 channels)
  [time8]="--time-mult 8"  # the time (and class) embedding 8x the base channels wide (256 for tiny), not DDPM's 4x;
  # same img/s: it adds under 0.1% to an image's FLOPs, and two rounds of speed measured 1.08x and 1.00x (speed.txt)
  [bf16]="--precision bf16"  # bf16 autocast (what auto picks on a CPU with AMX or AVX512-BF16); same images
  [fp32]="--precision fp32"  # fp32 throughout (what auto picks on a CPU without native bf16); same images
  [uncond]=""  # not trained: NAME+uncond is NAME's conditional run sampled without classes (see run_of)
)
FASTER_OR_SLOWER="reference batch16 batch64 tiny channels96 channels64 channels48 blocks1 blocks2 attn8 attn-none mult124 groups32"  # the others: same img/s
mkdir -p "$RUNS" "$OUT"
names() { if [ $# -gt 0 ]; then echo "$@"; else printf '%s\n' "${!VARIANTS[@]}" | sort; fi; }
options() {  # a name joins variants with "+" (tiny+min-snr5: both changes); of one option, the last wins
  for part in ${1//+/ }; do echo -n "${VARIANTS[$part]} "; done
}
speed_key() {  # the parts of a name that change its speed: tiny+min-snr5 trains at tiny's speed
  for part in ${1//+/ }; do if [[ " $FASTER_OR_SLOWER " == *" $part "* ]]; then echo "$part"; fi; done | paste -sd+
}
batch_of() { echo "$REFERENCE $(options "$1")" | grep -o -- '--batch-size [0-9]*' | tail -1 | cut -d' ' -f2; }
budget_steps() {  # the reference's images x the variant's speed relative to it, in steps of its batch
  ratio=1  # a variant of the reference's speed gets the reference's images
  key=$(speed_key "$1")
  if [ -n "$key" ]; then
    grep -q "^$key " "$OUT/speed.txt" || { echo "no speed for $key: bash $0 speed $key" >&2; exit 2; }
    ratio=$(speed_ratio "$key")
  fi
  $PY -c "print(round($BUDGET_IMAGES * $ratio / $(batch_of "$1")))"
}
speed_ratio() {  # a name's img/s over the reference's in the same run of "speed". Its first measurement
  # counts, so that measuring again never changes a budget already trained. The speed ratios of this
  # machine drift from day to day (tiny+attn-none: 7.16 one day, 5.90 the next), so a later run that
  # re-measures known names scales its new ones by them: tiny+attn-none+channels48 then gets
  # tiny+attn-none's budget x their ratio measured side by side.
  $PY - "$OUT/speed.txt" "$1" <<'EOF_'
import math, sys
ratios, run = {}, {}  # name: ratio kept; name: ratio in the run being read
def close(run):
    known = [ratios[name] / ratio for name, ratio in run.items() if name in ratios]
    scale = math.prod(known) ** (1 / len(known)) if known else 1
    for name, ratio in run.items():
        ratios.setdefault(name, ratio * scale)
for line in open(sys.argv[1]):
    if line.strip() and not line.startswith("#"):
        name, speed = line.split()
        if name == "reference":
            close(run)
            run, reference = {}, float(speed)
        else:
            run[name] = float(speed) / reference
close(run)
print(ratios[sys.argv[2]])
EOF_
}
run_of() {  # the run folder that a name is scored from, and how. The EMA never feeds back into training,
  # so a run with --ema-decay 0 trains the same raw weights as NAME's: NAME+ema0 scores those with --no-ema.
  # NAME+uncond scores a conditional NAME with guidance 0: no class, which is what `sample` draws without --class.
  if [[ $1 == *+ema0 ]]; then echo "$RUNS/${1%+ema0} --no-ema"
  elif [[ $1 == *+uncond ]]; then echo "$RUNS/${1%+uncond} --guidance 0"
  else echo "$RUNS/$1"; fi
}
sampling_of() {  # a run trained in a chosen precision is also scored in it: +fp32 samples in fp32 where
  # auto would pick bf16, so that the fp32 and bf16 rows compare what each precision gives from end to end
  for part in ${1//+/ }; do [[ $part == fp32 || $part == bf16 ]] && echo -n "--precision $part "; done; true
}
fid() {  # fid OUTPUT.json RUN [fid options], RUN a run folder or one of its checkpoints; skipped when
  [ -s "$1" ] && return 0  # OUTPUT.json exists. It also records the step and images RUN had reached.
  $PY ddpm.py fid "$2" --real $DATA --json "${@:3}" > "$1.tmp"
  record "$1" "$2"
}
record() {  # record OUTPUT RUN [JSON]: the scores in OUTPUT.tmp, with RUN's steps and images and the JSON's fields
  $PY -c '
import json, sys, ddpm
out, run, extra = sys.argv[1], sys.argv[2], json.loads(sys.argv[3] if len(sys.argv) > 3 else "{}")
checkpoint = ddpm.load_checkpoint(run)  # a run folder: its newest checkpoint
scores = {**json.load(open(out)), "train_steps": checkpoint["step"], "images_seen": checkpoint["images_seen"], **extra}
json.dump(scores, open(out, "w"))
' "$1.tmp" "${@:2}" && mv "$1.tmp" "$1"  # OUTPUT appears only once complete
}

for name in "${@:2}"; do
  for part in ${name//+/ }; do [ -v "VARIANTS[$part]" ] || { echo "no variant $part: see VARIANTS in $0" >&2; exit 2; }; done
done
case "${1:-}" in
speed)  # 40 steps of the reference, then of each variant whose speed differs; img/s over steps 20-40
  shift
  for name in reference $(if [ $# -gt 0 ]; then echo "$@"; else echo "$FASTER_OR_SLOWER"; fi | sed 's/reference//'); do
    rm -rf "$RUNS/speed-$name"
    $PY ddpm.py train --data $DATA $REFERENCE $(options "$name") --steps 40 --log-every 20 --save-every 1000 \
      --out "$RUNS/speed-$name" >/dev/null 2>&1
    $PY -c "import json; print('$name', json.loads(open('$RUNS/speed-$name/log.jsonl').read().splitlines()[-1])['img_per_s'])"
  done | tee -a "$OUT/speed.txt"  # see speed_ratio for how runs combine
  ;;
train)
  shift
  for name in $(names "$@"); do
    [[ $(run_of "$name") != "$RUNS/$name" ]] && { echo "$name: not trained, scored from $(run_of "$name")"; continue; }
    steps=$(budget_steps "$name")
    echo "$name: $steps steps"
    $PY ddpm.py train --data $DATA $REFERENCE $(options "$name") --steps "$steps" --log-every 25 \
      --save-every 250 --out "$RUNS/$name" 2>&1 | tail -1
  done
  ;;
score)
  shift
  for name in $(names "$@"); do fid "$OUT/$name.json" $(run_of "$name") -n "$N" $(sampling_of "$name"); done
  ;;
confirm)
  shift
  for name in "$@"; do fid "$OUT/$name-n1000.json" $(run_of "$name") -n 1000 $(sampling_of "$name"); done
  ;;
samplers)  # DDIM eta=1 at 25, 50, 100 steps; DDPM ancestral (all T steps) with both variances; or those named,
  # among them dpm++-S (DPM-Solver++(2M) in S steps) and ddim0-S (DDIM eta=0): the deterministic ODE samplers
  name=$2
  mkdir -p "$OUT/$name-samplers"
  for how in ${SAMPLERS:-ddim-25 ddim-50 ddim-100 ddpm-small ddpm-large}; do
    IFS=- read -r sampler setting <<< "$how"
    json=$OUT/$name-samplers/$how.json
    if [ "$sampler" = ddim ] || [ "$sampler" = ddim0 ]; then
      fid "$json" "$RUNS/$name" -n 1000 --sampler ddim --eta "$([ "$sampler" = ddim ] && echo 1 || echo 0)" \
        --steps "$setting" $(sampling_of "$name")
      continue
    elif [ "$sampler" = dpm++ ]; then  # deterministic: no eta
      fid "$json" "$RUNS/$name" -n 1000 --sampler dpm++ --steps "$setting" $(sampling_of "$name")
      continue
    fi
    # DDPM: 1,000 evaluations per image, hours on the CPU. So its 1,000 images are drawn in parts of
    # $PART, part k with seed k (a finished part survives an interrupted run), then scored as a folder.
    [ -s "$json" ] && continue
    (( 1000 % PART == 0 )) || { echo "PART=$PART: it must divide 1000" >&2; exit 2; }
    samples=$RUNS/$name-$how
    for ((part = 0; part < 1000 / PART; part++)); do
      [ -d "$samples/part-$part" ] && continue
      mkdir -p "$samples" && rm -rf "$samples/.part-$part"  # hidden: a folder's scan skips it until it is complete
      $PY ddpm.py sample "$samples/.part-$part" -c "$RUNS/$name" -n "$PART" --seed "$part" --sampler ddpm \
        --variance "$setting" 2>&1 | tail -1
      mv "$samples/.part-$part" "$samples/part-$part"
    done
    $PY ddpm.py fid "$samples" --real $DATA --size $SIZE -n 1000 --json > "$json.tmp"
    record "$json" "$RUNS/$name" "{\"what\": \"1000 samples from $RUNS/$name (EMA), ddpm $setting, seeds 0-$((1000 / PART - 1)) x $PART\",
      \"sampler\": \"ddpm\", \"steps\": 1000, \"variance\": \"$setting\", \"ema\": true}"
  done
  ;;
minutes)  # twice the budget, a checkpoint at each quarter of it: 5, 10, 20 and 40 minutes' worth
  name=$2
  quarter=$(( ($(budget_steps "$name") + 2) / 4 ))
  mkdir -p "$OUT/$name-minutes"
  $PY ddpm.py train --data $DATA $REFERENCE $(options "$name") --steps $((8 * quarter)) --log-every 25 \
    --save-every "$quarter" --keep 8 --out "$RUNS/$name-minutes" 2>&1 | tail -1
  for minutes in 5 10 20 40; do
    step=$(printf %08d $((minutes / 5 * quarter)))
    fid "$OUT/$name-minutes/$minutes.json" "$RUNS/$name-minutes/ckpt-$step.pt" -n 1000
  done
  ;;
table)
  $PY - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
scores = lambda path: f"{(r := json.loads(path.read_text()))['fid']:.1f} | {r['kid'] * 1e3:.1f} ± {r['kid_std'] * 1e3:.1f}" \
    if path.exists() else "|"
rows = []
for name in sorted({path.stem.removesuffix("-n1000") for path in out.glob("*.json")}):
    n500, n1000 = out / f"{name}.json", out / f"{name}-n1000.json"
    r = json.loads((n1000 if n1000.exists() else n500).read_text())
    rows.append((r["kid"], f"| {name} | {r['train_steps']:,} | {r['images_seen']:,} | {scores(n500)} | "
                           f"{scores(n1000)} |"))
print("| variant | steps | images | FID, N=500 | KID x10^3, N=500 | FID, N=1000 | KID x10^3, N=1000 |\n"
      "| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
print("\n".join(row for _, row in sorted(rows)))  # best KID first (N = 1000 where measured): it compares across N
EOF
  ;;
*) sed -n 2,6p "$0"; exit 2 ;;
esac
