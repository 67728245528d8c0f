#!/usr/bin/env bash
# The README's main job, with its report kept under results/main (checkpoints ignored by git).
set -euo pipefail
cd "$(dirname "$0")/.."
python explain.py --config configs/facex.py --workdir results/main "$@"
python scripts/update_readme.py
