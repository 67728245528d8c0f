#!/usr/bin/env bash
# Reproduce FaceX's Tables 1, 3, 4 and Figure 5 on synthetic faces.
#
#   bash scripts/reproduce_facex.sh                 # default variant (~45 min on a free 2-core CPU)
#   bash scripts/reproduce_facex.sh smoke           # every part on tiny budgets (~2 min)
#   bash scripts/reproduce_facex.sh paper           # ResNet-18 / 224 px recipe (accelerator)
#   bash scripts/reproduce_facex.sh "" --config.table1.targets='("Male",)'   # extra overrides
#
# Results (table{1,3,4}.{json,md}, figure5.{png,json,md}, tables.md, audits/)
# of the default variant go to results/facex (committed); the smoke and paper
# variants write to runs/facex_tables_<variant> (ignored by git). Checkpoints
# go to <workdir>/models/, ignored by git. Rerunning resumes where it stopped.
set -euo pipefail

cd "$(dirname "$0")/.."
variant="${1:-}"
shift || true
config="configs/facex_tables.py"
workdir="results/facex"
if [[ -n "$variant" ]]; then
  config="$config:$variant"
  workdir="runs/facex_tables_$variant"
fi
mkdir -p "$workdir"
# Checkpoints stay out of git; the tables, figures and audits are the results.
[[ -f "$workdir/.gitignore" ]] || printf 'models/\n' > "$workdir/.gitignore"

python explain.py --config "$config" --workdir "$workdir" "$@"
