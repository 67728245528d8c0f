#!/usr/bin/env bash
# Reproduces results/debias_noise/: De Coninck et al.'s patch attribution and
# noise debiasing on synthetic faces (Table 1, Figure 7 and Figure 8
# analogues, mean attribution maps, reliability diagrams, results.json and the
# README fragment summary.md).
#
#   bash scripts/reproduce_debias_noise.sh            # default (~45 min on a free 2-core CPU: 3 trainings per cell)
#   bash scripts/reproduce_debias_noise.sh smoke      # every part on tiny budgets (~1 min)
#   bash scripts/reproduce_debias_noise.sh paper      # the paper's scale (accelerator)
#   bash scripts/reproduce_debias_noise.sh "" --config.sweep.method=specific_mask   # overrides
#
# The default variant writes to results/debias_noise (committed); smoke and
# paper write to runs/debias_noise_<variant> (ignored by git). Models and the
# attribution cache go to <workdir>/models/, kept out of git by the
# .gitignore there. Rerunning resumes: finished runs (runs/<Confounder>/*.json)
# are read back, finished models reloaded. Afterwards,
# `python scripts/update_readme.py` pastes summary.md into README.md.
set -euo pipefail

cd "$(dirname "$0")/.."
variant="${1:-}"
shift || true
config="configs/debias_noise.py"
workdir="results/debias_noise"
if [[ -n "$variant" ]]; then
  config="$config:$variant"
  workdir="runs/debias_noise_$variant"
fi
mkdir -p "$workdir/models"
[[ -f "$workdir/models/.gitignore" ]] || printf '*\n!.gitignore\n' > "$workdir/models/.gitignore"

python explain.py --config "$config" --workdir "$workdir" "$@"
