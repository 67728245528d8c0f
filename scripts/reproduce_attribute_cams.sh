#!/usr/bin/env bash
# Reproduces results/attribute_cams/: AFFACT-u vs AFFACT-b binary attribute
# CAMs on CelebA-like synthetic faces (Tables 1-2 and Figures 2-4 analogues,
# results.json and the README fragment summary.md).
#
# About 7-8 minutes on a free 2-core CPU (two small ResNets x 1,000 updates at
# 96 px, then ~500 frontal test faces explained with 4 CAM methods). Rerunning
# reloads the finished models from results/attribute_cams/models/ (kept out of
# git by the .gitignore there) and only re-explains. Extra arguments are
# passed to explain.py, e.g. --config.train.unbalanced_loss=bce.
# Afterwards, `python scripts/update_readme.py` pastes summary.md into README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
python explain.py --config configs/attribute_cams.py --workdir results/attribute_cams "$@"
