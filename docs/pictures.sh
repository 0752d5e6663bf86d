#!/bin/bash
# The README's pictures, from the repo root:
#   bash docs/pictures.sh [RUN]    classes and editing, from the conditional quality run (small, 32x32,
#                                  cosine, 800 steps; README "Draw a chosen car"; default q/cond32)
#   bash docs/pictures.sh digits   greyscale digits drawn here (no download), the tiny preset trained on
#                                  them for 5 minutes at 16x16, then a grid of 36 samples
# Each picture is made in a temporary folder, then copied over the one in docs/.
set -euo pipefail
PY=${PYTHON:-.venv/bin/python}
RUN=${1:-q/cond32}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
enlarge() {  # enlarge FACTOR FILE...: nearest neighbour, so the pixels stay sharp
  $PY - "$@" <<'EOF'
import sys
from PIL import Image
for name in sys.argv[2:]:
    picture = Image.open(name)
    factor = int(sys.argv[1])
    picture.resize((picture.width * factor, picture.height * factor), Image.Resampling.NEAREST).save(name)
EOF
}
if [ "$RUN" = digits ]; then
  $PY - "$WORK/digits" <<'EOF'
import random, sys
from pathlib import Path
from PIL import Image, ImageDraw, ImageFont
out = Path(sys.argv[1])
out.mkdir()
font = ImageFont.load_default(size=13)
for i in range(2000):  # white digits on black, each shifted, rotated and shaded at random
    rng = random.Random(i)
    image = Image.new("L", (16, 16), 0)
    ImageDraw.Draw(image).text((8 + rng.uniform(-1.5, 1.5), 8 + rng.uniform(-1.5, 1.5)), str(i % 10),
                               fill=rng.randint(170, 255), font=font, anchor="mm")
    image.rotate(rng.uniform(-12, 12), resample=Image.Resampling.BICUBIC).save(out / f"{i:04d}.png")
EOF
  $PY ddpm.py train --data "$WORK/digits" --preset tiny --size 16 --batch-size 32 --warmup-steps 100 --minutes 5 \
      --save-every 100000 --out "$WORK/run" 2>&1 | grep -E "^(Data|Channels|Done)"
  $PY ddpm.py sample -n 36 -c "$WORK/run" "$WORK/digits.png"
  enlarge 4 "$WORK/digits.png"
  cp "$WORK/digits.png" docs/digits.png
  exit 0
fi
# One labelled row per class.
$PY ddpm.py sample -c "$RUN" --per-class 6 --class "AM General Hummer" --class "Audi R8" \
    --class "Ford F-150 Regular Cab 2012" --class "Chevrolet Express Cargo Van" \
    --class "Bugatti Veyron 16.4 Coupe" --guidance 2 "$WORK/per-class.png"
# SDEdit from the built-in toy cars (drawings, so no photo of the data set lands in the repository).
mkdir "$WORK/toys"
$PY -c "
import ddpm
for i, image in enumerate(ddpm.toy_cars(32, 32, 4)):
    ddpm.to_pil(image).save(f'$WORK/toys/toy{i}.png')"
$PY ddpm.py sample -c "$RUN" --init "$WORK/toys" -n 6 --strength 0.5 "$WORK/sdedit.png"
# Inpainting the lower half of three of the model's own samples.
$PY ddpm.py sample -c "$RUN" -n 3 --seed 11 "$WORK/own"
$PY -c "
from PIL import Image, ImageDraw
mask = Image.new('L', (32, 32), 0)
ImageDraw.Draw(mask).rectangle((0, 16, 31, 31), fill=255)
mask.save('$WORK/lower.png')"
$PY ddpm.py sample -c "$RUN" --init "$WORK/own" --mask "$WORK/lower.png" -n 4 "$WORK/inpaint.png"
# Interpolation between two seeds, and from one class to another.
$PY ddpm.py interpolate 3 17 -c "$RUN" --frames 10 "$WORK/interpolate.png"
$PY ddpm.py interpolate 5 5 -c "$RUN" --frames 10 --class "AM General Hummer" --class "Audi R8" \
    "$WORK/interpolate-classes.png"
# The 32x32 grids twice as large (the per-class grid has text and stays as it is).
enlarge 2 "$WORK"/{sdedit,inpaint,interpolate,interpolate-classes}.png
cp "$WORK"/{per-class,sdedit,inpaint,interpolate,interpolate-classes}.png "$WORK/interpolate-classes.gif" docs/
