#!/usr/bin/env bash
# Reproduces results/corrrise/: the CorrRISE Table 1 analogue (Deletion /
# Insertion AUC of similarity Grad-CAM, Grad-CAM++, RISE, occlusion and
# CorrRISE on synthetic matching pairs), the model-randomisation sanity check,
# the saliency and curve figures, results.json and the README fragment summary.md.
#
#   bash scripts/reproduce_corrrise.sh            # default variant -> results/corrrise
#   bash scripts/reproduce_corrrise.sh smoke      # tiny budgets -> runs/corrrise_smoke
#   bash scripts/reproduce_corrrise.sh "" --config.explain.correlation=spearman
#
# The default variant takes about 15 minutes on a free 2-core CPU (plain and
# occluded scenarios). Checkpoints go
# to <workdir>/models/ (ignored by git via the .gitignore written there);
# rerunning reloads the finished model and only re-explains.
set -euo pipefail
cd "$(dirname "$0")/.."
variant="${1:-}"
shift || true
config="configs/corrrise.py"
workdir="results/corrrise"
if [[ -n "$variant" ]]; then
  config="$config:$variant"
  workdir="runs/corrrise_$variant"
fi
python explain.py --config "$config" --workdir "$workdir" "$@"
