#!/usr/bin/env bash
# Reproduces results/face_parser/: the 19-region U-Net face parser trained on
# synthetic faces and scored by IoU per region on identity-disjoint test faces
# (results.json, table.md, summary.md, example and IoU figures).
#
#   bash scripts/reproduce_face_parser.sh          # default variant -> results/face_parser
#   bash scripts/reproduce_face_parser.sh smoke    # tiny budgets -> runs/face_parser_smoke
#
# Checkpoints go to <workdir>/models/ (ignored by git); rerunning reloads the
# finished model and only re-evaluates. FaceX then takes the parser with
# --config.explain.parser=results/face_parser.
set -euo pipefail
cd "$(dirname "$0")/.."
variant="${1:-}"
shift || true
config="configs/face_parser.py"
workdir="results/face_parser"
if [[ -n "$variant" ]]; then
  config="$config:$variant"
  workdir="runs/face_parser_$variant"
fi
python explain.py --config "$config" --workdir "$workdir" "$@"
