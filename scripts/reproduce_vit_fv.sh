#!/usr/bin/env bash
# Reproduces results/vit_fv/: ViT face-verification heatmaps (Correia et al.) on
# synthetic faces: a ViT embedder trained with CosFace, the 10-fold verification
# protocol on unseen identities, the Table 1 analogue (SM+ / SM- of OIM, UM and
# N-IUM, share of pairs each technique wins), recall / TNR perturbation curves
# against CorrRISE, RISE and occlusion, example figures, results.json and the
# README fragment summary.md.
#
#   bash scripts/reproduce_vit_fv.sh            # default variant (~10-12 min on a free 2-core CPU)
#   bash scripts/reproduce_vit_fv.sh smoke      # every stage on tiny budgets -> runs/vit_fv_smoke
#   bash scripts/reproduce_vit_fv.sh paper      # Face Transformer P12S8 recipe (accelerator) -> runs/vit_fv_paper
#   bash scripts/reproduce_vit_fv.sh "" --config.model.name=vit_tiny_face   # extra overrides
#
# Checkpoints go to <workdir>/models/ (a .gitignore there keeps them out of
# git); rerunning reloads the trained model and only re-explains.
# Afterwards, `python scripts/update_readme.py` pastes summary.md into README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
variant="${1:-}"
shift || true
config="configs/vit_fv.py"
workdir="results/vit_fv"
if [[ -n "$variant" ]]; then
  config="$config:$variant"
  workdir="runs/vit_fv_$variant"
fi
python explain.py --config "$config" --workdir "$workdir" "$@"
