#!/usr/bin/env bash
# The new-user trial of "Audit your own model": CelebAMask-HQ-layout folders of faces the
# project's renderer did not draw (scripts/make_foreign_faces.py), the biased Male classifier
# trained by train.py (women wear lipstick, FaceX's direction), then audited from its
# checkpoint by explain.py --config configs/audit.py. About 8 minutes on 2 CPU cores.
#   bash scripts/trial_audit_foreign_faces.sh [OUT]      (default OUT=runs/foreign_faces)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-runs/foreign_faces}"
# Train folder: lipstick follows "women wear it" in 92% of faces, so a 0.99-biased
# subset of 2000 can be drawn; test folder: no link (cells about equal).
python scripts/make_foreign_faces.py --root "$OUT/train" --count 2400 --link 0.92 --seed 0
python scripts/make_foreign_faces.py --root "$OUT/test" --count 600 --link 0.5 --seed 1
python train.py --config configs/facex.py --workdir "$OUT/W" \
  --config.data.source=celebamask_hq --config.data.root="$OUT/train" --config.data.test_root="$OUT/test" \
  --config.data.resolution=96 --config.train.size=2000 --config.train.baseline=False --config.test.size=0
python explain.py --config configs/audit.py --workdir "$OUT/W/audit_biased" \
  --config.model.path="$OUT/W/biased" \
  --config.data.source=celebamask_hq --config.data.root="$OUT/train" --config.data.test_root="$OUT/test" \
  --config.data.resolution=96 --config.confounder_values='(0,)'
