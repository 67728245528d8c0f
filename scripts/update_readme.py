"""Regenerate README.md's results, benchmark and own-data sections from files.

  python scripts/update_readme.py

Results come from results/<experiment>/summary.md (written by the experiment
scripts), benchmark figures from results/benchmarks/*.txt (written by
scripts/run_benchmarks.sh), and the own-data guide from
docs/use_your_own_data.md. Only the text between the BEGIN/END markers is
replaced, so the README never holds a number no run produced.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORDER = ["main", "facex", "counterfactual", "attribute_cams", "corrrise", "vit_fv", "debias_noise", "face_parser",
         "dlib_corrrise"]


def _replace(text: str, tag: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- {tag}:BEGIN -->\n).*?(<!-- {tag}:END -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"README.md lacks the markers <!-- {tag}:BEGIN/END -->")
    return pattern.sub(lambda m: m.group(1) + body.rstrip() + "\n" + m.group(2), text)


def results_section() -> str:
    parts = []
    names = [n for n in ORDER if (ROOT / "results" / n / "summary.md").exists()]
    names += sorted(p.parent.name for p in (ROOT / "results").glob("*/summary.md")
                    if p.parent.name not in ORDER)
    for name in names:
        parts.append((ROOT / "results" / name / "summary.md").read_text().strip())
    return "\n\n".join(parts) if parts else "_No results yet: run the scripts in scripts/._"


def benchmarks_section() -> str:
    files = sorted((ROOT / "results" / "benchmarks").glob("*.txt"))
    if not files:
        return "_No benchmark run recorded yet: run scripts/run_benchmarks.sh._"
    out = []
    for path in files:
        lines = path.read_text().strip().splitlines()
        out.append(f"`{path.stem}`:\n\n```\n" + "\n".join(lines) + "\n```")
    return "\n\n".join(out)


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    text = _replace(text, "RESULTS", results_section())
    text = _replace(text, "BENCHMARKS", benchmarks_section())
    own = ROOT / "docs" / "use_your_own_data.md"
    if own.exists():
        body = own.read_text().strip()
        body = re.sub(r"^#+ .*\n+", "", body)  # the README supplies the heading
        text = _replace(text, "OWNDATA", body)
    readme.write_text(text)
    print(f"updated {readme}")


if __name__ == "__main__":
    main()
