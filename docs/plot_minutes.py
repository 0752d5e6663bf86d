"""FID against training minutes for docs/quality.md: python docs/plot_minutes.py FOLDER docs/minutes.png

FOLDER holds 5.json, 10.json, 20.json and 40.json, written by `bash docs/recipe.sh minutes NAME`: the
fid command's results for the checkpoints after 5, 10, 20 and 40 minutes' worth of training images."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import ddpm  # noqa: E402  (the repository's module, wherever this script is run from)

folder, out = Path(sys.argv[1]), Path(sys.argv[2])
points = sorted((int(f.stem), json.loads(f.read_text())["fid"]) for f in folder.glob("*.json") if f.stem.isdigit())
ddpm.save_curve(points, out, "FID (N = 1000) against training time on 2 CPU cores", unit="minutes", log_scale=False)
print("\n".join(f"{minutes} minutes: FID {fid:.1f}" for minutes, fid in points), f"\nwrote {out}", sep="")
