#!/bin/bash
# The README's pictures of classes and editing, from the conditional quality run (small, 32x32,
# cosine, 800 steps; README "Draw a chosen car"): bash docs/pictures.sh [RUN], from the repo root.
set -euo pipefail
PY=${PYTHON:-.venv/bin/python}
RUN=${1:-q/cond32}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
# One labelled row per class.
$PY ddpm.py sample -c "$RUN" --per-class 6 --class "AM General Hummer" --class "Audi R8" \
    --class "Ford F-150 Regular Cab 2012" --class "Chevrolet Express Cargo Van" \
    --class "Bugatti Veyron 16.4 Coupe" docs/per-class.png
# SDEdit from the built-in toy cars (drawings, so no photo of the data set lands in the repository).
$PY -c "
import sys, ddpm
for i, image in enumerate(ddpm.toy_cars(32, 32, 4)):
    ddpm.to_pil(image).save(f'$WORK/toy{i}.png')"
mkdir "$WORK/toys" && mv "$WORK"/toy*.png "$WORK/toys/"
$PY ddpm.py sample -c "$RUN" --init "$WORK/toys" -n 6 --strength 0.5 docs/sdedit.png
# Inpainting the lower half of three of the model's own samples.
$PY ddpm.py sample -c "$RUN" -n 3 --seed 11 "$WORK/own"
$PY -c "
from PIL import Image, ImageDraw
mask = Image.new('L', (32, 32), 0)
ImageDraw.Draw(mask).rectangle((0, 16, 31, 31), fill=255)
mask.save('$WORK/lower.png')"
$PY ddpm.py sample -c "$RUN" --init "$WORK/own" --mask "$WORK/lower.png" -n 4 docs/inpaint.png
# Interpolation between two seeds, and from one class to another.
$PY ddpm.py interpolate 3 17 -c "$RUN" --frames 10 "$WORK/interpolate.png"
cp "$WORK/interpolate.png" docs/interpolate.png
$PY ddpm.py interpolate 5 5 -c "$RUN" --frames 10 --class "AM General Hummer" --class "Audi R8" \
    docs/interpolate-classes.png
# The 32x32 grids twice as large (nearest neighbour; the per-class grid has text and stays as it is).
$PY -c "
from PIL import Image
for name in ('sdedit', 'inpaint', 'interpolate', 'interpolate-classes'):
    picture = Image.open(f'docs/{name}.png')
    picture.resize((picture.width * 2, picture.height * 2), Image.Resampling.NEAREST).save(f'docs/{name}.png')"
