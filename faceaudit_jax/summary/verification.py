"""Summaries of face-verification heatmaps (Correia et al.): the Table 1 analogue.

``sm_table`` reduces the per-pair output of ``explain.fv_heatmaps`` (SM+ / SM-,
removed area, selected technique) to statistics per technique and decision;
``oim_finding`` says which technique leads by each criterion; the Markdown
renderers print both next to the paper's numbers (NaN / JSON null as "n/a").
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from faceaudit_jax.explain import fv_heatmaps as fv
from faceaudit_jax.viz.report import fmt

TECHNIQUE_LABELS = {"oim": "OIM", "um": "UM", "n_ium": "N-IUM"}
# Display names of ``explain.attention.METHODS``.
METHOD_LABELS = {
    "rollout": "attention rollout",
    "grad_rollout": "gradient-weighted rollout (Chefer et al.)",
    "nograd": "no-gradient relevance (= rollout after normalisation)",
    "nograd_lrp": "No-Grad ViT-LRP",
}


def finite_stats(values) -> dict:
    """mean / median over the defined (finite) values, with the counts of defined and undefined."""
    values = np.asarray(values, np.float64)
    finite = values[np.isfinite(values)]
    return {"mean": float(finite.mean()) if finite.size else float("nan"),
            "median": float(np.median(finite)) if finite.size else float("nan"),
            "defined": int(finite.size), "undefined": int(values.size - finite.size)}


def _side_entry(result: Mapping, rows: np.ndarray, metric: str, candidates) -> dict:
    count = int(rows.sum())
    selected = np.asarray(result["selected"])[rows]
    entry: dict[str, Any] = {"n": count, "metric": metric, metric: {}, "wins": {}, "ra": {}}
    for tech in candidates:
        k = fv.TECHNIQUES.index(tech)
        entry[metric][tech] = finite_stats(np.asarray(result[metric])[k, rows])
        entry["wins"][tech] = float(np.mean(selected == k)) if count else float("nan")
        entry["ra"][tech] = float(np.mean(np.asarray(result["ra"])[k, rows])) if count \
            else float("nan")
    entry["undecided"] = float(np.mean(selected < 0)) if count else float("nan")
    return entry


def sm_table(result: Mapping[str, np.ndarray], positive: np.ndarray) -> dict:
    """The Table 1 analogue for one attention method.

    result: ``fv_heatmaps.explain_pair_batches`` output over P pairs ("sm_plus",
    "sm_minus", "ra" [3, P], "selected" [P]); positive: bool [P]. Returns
    {"positive": {...}, "negative": {...}}; each holds "n", per technique the
    SM statistics ("sm_plus" for OIM, UM; "sm_minus" for OIM, UM, N-IUM),
    "wins" (share of the pairs where the technique is selected), "undecided"
    (share with no defined SM for any candidate) and "ra" (mean removed area).
    """
    positive = np.asarray(positive, bool)
    return {"positive": _side_entry(result, positive, "sm_plus", fv.POSITIVE_TECHNIQUES),
            "negative": _side_entry(result, ~positive, "sm_minus", fv.NEGATIVE_TECHNIQUES)}


def _best(values: Mapping) -> Any:
    """The key of the largest finite value (the first on ties), None when there is none."""
    finite = {k: v for k, v in values.items() if v is not None and np.isfinite(v)}
    return max(finite, key=finite.get) if finite else None


def oim_finding(table: Mapping) -> dict:
    """Which technique leads by mean SM, by median SM and by share of wins, per decision.

    Returns {"positive" | "negative": {"best_by_mean", "best_by_median",
    "best_by_wins" (technique names; None when no SM is defined),
    "oim_wins_by_mean", "oim_wins_by_median", "oim_wins_by_share" (bools)}}.
    Ties go to the earlier technique in ``TECHNIQUES`` order.
    """
    finding = {}
    for side in ("positive", "negative"):
        entry = table[side]
        stats = entry[entry["metric"]]
        by_mean = _best({t: s["mean"] for t, s in stats.items()})
        by_median = _best({t: s["median"] for t, s in stats.items()})
        by_wins = _best(entry["wins"])
        finding[side] = {"best_by_mean": by_mean, "best_by_median": by_median,
                         "best_by_wins": by_wins, "oim_wins_by_mean": by_mean == "oim",
                         "oim_wins_by_median": by_median == "oim",
                         "oim_wins_by_share": by_wins == "oim"}
    return finding


def _pct(share) -> str:
    return fmt(share, ".0%")


def undefined_note(table: Mapping) -> str:
    """"2 OIM SM+, 1 UM SM-": the counts of undefined SM values left out, or "none"."""
    parts = []
    for side, metric in (("positive", "sm_plus"), ("negative", "sm_minus")):
        for tech, stats in table[side][metric].items():
            if stats["undefined"]:
                parts.append(f"{stats['undefined']} {TECHNIQUE_LABELS[tech]} "
                             f"{'SM+' if side == 'positive' else 'SM-'}")
    return ", ".join(parts) if parts else "none"


def table1_markdown(table: Mapping, method_label: str, paper: Mapping) -> str:
    """Table 1 analogue: SM statistics, win shares and RA per technique, next to the paper's
    mean SM+ / SM- (``paper``: {"sm_plus" | "sm_minus": {technique: mean}})."""
    pos, neg = table["positive"], table["negative"]
    header = ("| technique | mean SM+ | median SM+ | selected (TP) | RA (TP) | mean SM- "
              "| median SM- | selected (TN) | RA (TN) | paper mean SM+ | paper mean SM- |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for tech in fv.TECHNIQUES:
        plus, minus = pos["sm_plus"].get(tech), neg["sm_minus"][tech]
        cells = [TECHNIQUE_LABELS[tech]]
        cells += ([fmt(plus["mean"], ".2f"), fmt(plus["median"], ".2f"), _pct(pos["wins"][tech]),
                   fmt(pos["ra"][tech], ".3f")] if plus is not None else ["—"] * 4)
        cells += [fmt(minus["mean"], ".2f"), fmt(minus["median"], ".2f"), _pct(neg["wins"][tech]),
                  fmt(neg["ra"][tech], ".3f")]
        cells += [fmt(paper["sm_plus"][tech], ".2f") if tech in paper["sm_plus"] else "—",
                  fmt(paper["sm_minus"][tech], ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    note = (f"\n{method_label}; {pos['n']} true-positive and {neg['n']} true-negative pairs. "
            "Selected = share of pairs where the technique has the largest SM. Undefined SM "
            f"(RA = 0) left out: {undefined_note(table)}.\n")
    return header + "\n".join(lines) + "\n" + note


def methods_markdown(tables: Mapping[str, Mapping]) -> str:
    """Mean SM per technique and OIM's winner share for every attention method."""
    header = ("| attention method | mean SM+ OIM / UM | OIM selected (TP) | mean SM- OIM / UM / "
              "N-IUM | OIM selected (TN) |\n|---|---|---|---|---|\n")
    lines = []
    for method, table in tables.items():
        pos, neg = table["positive"], table["negative"]
        plus = " / ".join(fmt(pos["sm_plus"][t]["mean"], ".2f") for t in fv.POSITIVE_TECHNIQUES)
        minus = " / ".join(fmt(neg["sm_minus"][t]["mean"], ".2f") for t in fv.NEGATIVE_TECHNIQUES)
        lines.append(f"| {METHOD_LABELS.get(method, method)} | {plus} | "
                     f"{_pct(pos['wins']['oim'])} | {minus} | {_pct(neg['wins']['oim'])} |")
    return header + "\n".join(lines) + "\n"


def _verdict(entry: Mapping, found: Mapping, metric: str, label: str, paper: Mapping) -> str:
    """Does OIM lead by mean (the paper's criterion), by median, by share of selections?"""
    def name(tech):
        return TECHNIQUE_LABELS[tech] if tech else "none"

    means = ", ".join(f"{TECHNIQUE_LABELS[t]} {fmt(s['mean'], '.2f')}" for t, s in entry[metric].items())
    paper_numbers = ", ".join(f"{TECHNIQUE_LABELS[t]} {v:.2f}" for t, v in paper.items())
    head = (f"OIM wins by mean {label} ({means}; paper: {paper_numbers})" if found["oim_wins_by_mean"]
            else f"OIM does not win by mean {label}: {name(found['best_by_mean'])} does "
                 f"({means}; paper: {paper_numbers})")
    medians = ", ".join(f"{TECHNIQUE_LABELS[t]} {fmt(s['median'], '.2f')}"
                        for t, s in entry[metric].items())
    wins = entry["wins"]
    share = (f"OIM is selected for the most pairs ({_pct(wins['oim'])})" if found["oim_wins_by_share"]
             else f"{name(found['best_by_wins'])} is selected for the most pairs "
                  f"({_pct(wins[found['best_by_wins']])}; OIM {_pct(wins['oim'])})")
    return f"{head}; by median {name(found['best_by_median'])} leads ({medians}); {share}"


def finding_sentence(table: Mapping, finding: Mapping, paper: Mapping) -> str:
    """The finding in words, one clause per decision, with the paper's mean SM+ / SM-."""
    positive = _verdict(table["positive"], finding["positive"], "sm_plus", "SM+", paper["sm_plus"])
    negative = _verdict(table["negative"], finding["negative"], "sm_minus", "SM-", paper["sm_minus"])
    return f"Here, for positive decisions {positive}. For negative decisions {negative}."
