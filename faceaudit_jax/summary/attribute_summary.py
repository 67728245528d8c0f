"""Reductions and tables of a two-model binary-attribute CAM audit (AFFACT-u vs AFFACT-b).

``model_report`` turns one model's per-face outputs (``explain.attribute_audit.
Evaluation``) into FNR/FPR and energies per predicted class;
``majority_class_finding`` compares the majority-class energies of an
unbalanced and a balanced model over the imbalanced attributes (one-sided
Wilcoxon signed-rank test) and ``finding_verdict`` names the outcome; the
``*_rows`` / ``*_markdown`` functions lay out the paper's Table 1, Table 2,
the Figure 4 numbers and the README summary from JSON-ready rows.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from faceaudit_jax.metrics import energy as energy_lib
from faceaudit_jax.metrics import fairness
from faceaudit_jax.viz.report import fmt, markdown_table

MODELS: tuple[str, ...] = ("affact_u", "affact_b")
MODEL_LABELS = {"affact_u": "AFFACT-u", "affact_b": "AFFACT-b"}
METHOD_LABELS = {"grad_cam": "Grad-CAM", "grad_cam_plusplus": "Grad-CAM++",
                 "hires_cam": "HiResCAM", "element_wise_grad_cam": "Element-wise Grad-CAM"}


def model_report(evaluation, names: Sequence[str], pairs, defined: np.ndarray
                 ) -> dict:
    """FNR/FPR, p_m (test), energies per (method, target) and predicted class, per attribute.

    Energies of attributes without a mask (``defined`` False) are NaN; sides
    without predictions are NaN with a RuntimeWarning (from the metrics).
    """
    names = list(names)
    rates = fairness.error_rates_from_counts(
        fairness.confusion_counts(evaluation.logits, evaluation.targets), names)
    predicted = evaluation.logits >= 0
    defined_names = [n for n, d in zip(names, defined) if d]

    def split(values):
        """energy_by_prediction over the attributes with a mask; NaN elsewhere."""
        out = {k: np.full(len(names), np.nan) for k in ("positive", "negative")}
        counts = {"num_positive": predicted.sum(0), "num_negative": (~predicted).sum(0)}
        if defined.any():
            result = energy_lib.energy_by_prediction(values[:, defined], predicted[:, defined],
                                                     names=defined_names)
            out["positive"][defined] = result.positive
            out["negative"][defined] = result.negative
        return {**out, **counts}

    energies = {f"{method}/{mode}": split(evaluation.energy[k])
                for k, (method, mode) in enumerate(pairs)}
    uniform = split(evaluation.area)
    return {
        "fnr": rates.fnr, "fpr": rates.fpr, "accuracy": rates.accuracy,
        "p_test": rates.positive_share, "num_positive": rates.num_positive,
        "num_negative": rates.num_negative,
        "predicted_positive": predicted.sum(0), "predicted_negative": (~predicted).sum(0),
        "energy": energies, "uniform_energy": uniform,
    }


def model_json(report_: dict, names: Sequence[str]) -> dict:
    """One ``model_report`` as its results.json entry: mean (balanced) accuracy and per-attribute numbers."""
    per_attribute = {}
    for a, name in enumerate(names):
        per_attribute[name] = {
            **{k: report_[k][a] for k in ("p_test", "fnr", "fpr", "accuracy", "num_positive",
                                          "num_negative", "predicted_positive",
                                          "predicted_negative")},
            "energy": {pair: {"positive": e["positive"][a], "negative": e["negative"][a]}
                       for pair, e in report_["energy"].items()},
            "uniform_energy": {"positive": report_["uniform_energy"]["positive"][a],
                               "negative": report_["uniform_energy"]["negative"][a]},
        }
    balanced_accuracy = 1.0 - 0.5 * (report_["fnr"] + report_["fpr"])
    return {"mean_accuracy": float(np.nanmean(report_["accuracy"])),
            "mean_balanced_accuracy": float(np.nanmean(balanced_accuracy)),
            "attributes": per_attribute}


MIN_ATTRIBUTES_FOR_TEST = 5  # a one-sided signed-rank test needs a handful of pairs


def _majority_side(report: dict, key: str, majority_positive, majority: bool, what: str):
    """Per attribute, the report's value on the majority (or minority) predicted class."""
    values = report[what] if what == "uniform_energy" else report[what][key]
    pick_pos = majority_positive if majority else ~majority_positive
    return np.where(pick_pos, values["positive"], values["negative"])


def _finding_rows(p, selected, majority_positive, report_u, report_b, key, names) -> list[dict]:
    rows = []
    for a in np.flatnonzero(selected):
        row = {"attribute": names[a], "p_train": float(p[a]),
               "majority": "positive" if majority_positive[a] else "negative"}
        for m, report in (("u", report_u), ("b", report_b)):
            for kind, majority in (("majority", True), ("minority", False)):
                row[f"{kind}_energy_{m}"] = float(
                    _majority_side(report, key, majority_positive, majority, "energy")[a])
            for kind, majority in (("majority", True), ("minority", False)):
                row[f"{kind}_uniform_{m}"] = float(
                    _majority_side(report, key, majority_positive, majority, "uniform_energy")[a])
            row[f"minority_error_{m}"] = float(
                np.where(majority_positive, report["fpr"], report["fnr"])[a])
        rows.append(row)
    return rows


def _compare_side(rows: Sequence[dict], kind: str) -> dict:
    """Energies of u vs b on one side ("majority" / "minority") over the rows both models have."""
    from scipy import stats  # only the closing note needs it

    eu, eb, cu, cb = (np.array([r[f"{kind}_{what}"] for r in rows], np.float64)
                      for what in ("energy_u", "energy_b", "uniform_u", "uniform_b"))
    both = np.isfinite(eu) & np.isfinite(eb) & (cu > 0) & (cb > 0)
    n = int(both.sum())

    def mean(values):
        return float(values[both].mean()) if n else None

    result = {
        "num_attributes": n,
        "attributes": [r["attribute"] for r, ok in zip(rows, both) if ok],
        "mean_u": mean(eu), "mean_b": mean(eb),
        "mean_uniform_u": mean(cu), "mean_uniform_b": mean(cb),
        "mean_lift_u": float((eu[both] / cu[both]).mean()) if n else None,
        "mean_lift_b": float((eb[both] / cb[both]).mean()) if n else None,
        "num_b_higher": int((eb[both] > eu[both]).sum()),
        "wilcoxon_p_b_greater": None,
    }
    if n >= MIN_ATTRIBUTES_FOR_TEST and np.any(eb[both] - eu[both] != 0):
        result["wilcoxon_p_b_greater"] = float(
            stats.wilcoxon(eb[both], eu[both], alternative="greater").pvalue)
    return result


def _finite_mean(rows: Sequence[dict], field: str):
    values = np.array([r[field] for r in rows], np.float64)
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else None


def majority_class_finding(p_train, report_u: dict, report_b: dict, key: str, defined,
                           names: Sequence[str], min_imbalance: float,
                           alpha: float = 0.05) -> dict:
    """Majority- and minority-class energies of an unbalanced (u) vs a balanced (b) model.

    Majority class: positive when the training p_m > 0.5, else negative. Over
    the attributes with a mask and |p_m - 0.5| >= ``min_imbalance``, compares
    per attribute the mean energy (pair ``key``, e.g. "grad_cam/predicted")
    over the faces each model predicts in the majority class, and in the
    minority class (where both models predicted some). ``lift`` = energy /
    the energy a uniform map gets on the same faces (the mask's area share),
    so attributes with small and large masks weigh alike. ``report_u`` /
    ``report_b`` are ``model_report`` dicts.

    ``shows`` (the paper's finding: the balanced model's majority-class CAMs
    carry more energy in the attribute region than the unbalanced model's):
    at least ``MIN_ATTRIBUTES_FOR_TEST`` attributes compared, the mean energy
    of b above u's, and a one-sided Wilcoxon signed-rank test of the
    per-attribute pairs (b > u) with p < ``alpha``.
    """
    p = np.asarray(p_train, np.float64)
    selected = np.asarray(defined, bool) & np.isfinite(p) & (fairness.imbalance(p) >= min_imbalance)
    rows = _finding_rows(p, selected, p > 0.5, report_u, report_b, key, names)
    majority, minority = _compare_side(rows, "majority"), _compare_side(rows, "minority")
    p_value = majority["wilcoxon_p_b_greater"]
    testable = majority["num_attributes"] >= MIN_ATTRIBUTES_FOR_TEST and p_value is not None
    shows = bool(testable and majority["mean_b"] > majority["mean_u"] and p_value < alpha)
    finding = {
        "pair": key, "min_imbalance": float(min_imbalance), "alpha": float(alpha),
        "rows": rows, "majority": majority, "minority": minority,
        "minority_error_u": _finite_mean(rows, "minority_error_u"),
        "minority_error_b": _finite_mean(rows, "minority_error_b"),
        "testable": bool(testable), "shows": shows,
    }
    finding["verdict"] = finding_verdict(finding)
    return finding


VERDICTS = ("shows", "trend", "does_not_show", "inconclusive")


def finding_verdict(finding: dict) -> str:
    """One of ``VERDICTS`` for a ``majority_class_finding`` result (or its JSON).

    "shows": significant (see ``majority_class_finding``); "trend": AFFACT-b's
    majority-class energy higher on average and for most attributes, but not
    significant; "does_not_show": otherwise; "inconclusive": too few
    attributes to test.
    """
    majority = finding["majority"]
    n = majority["num_attributes"]
    if finding["shows"]:
        return "shows"
    if not finding["testable"]:
        return "inconclusive"
    if majority["mean_b"] > majority["mean_u"] and majority["num_b_higher"] > n / 2:
        return "trend"
    return "does_not_show"


def table1_rows(p_train, reports: dict, key: str, names: Sequence[str], defined) -> list[dict]:
    """Table 1 analogue, attributes sorted by training imbalance (most imbalanced first)."""
    rows = []
    for a in fairness.imbalance_order(p_train):
        row = {"attribute": names[a], "p_train": float(p_train[a]),
               "imbalance": float(fairness.imbalance(p_train[a])), "mask_defined": bool(defined[a])}
        for model, r in reports.items():
            row[model] = {
                "fnr": float(r["fnr"][a]), "fpr": float(r["fpr"][a]),
                "energy_positive": float(r["energy"][key]["positive"][a]),
                "energy_negative": float(r["energy"][key]["negative"][a]),
                "uniform_positive": float(r["uniform_energy"]["positive"][a]),
                "uniform_negative": float(r["uniform_energy"]["negative"][a]),
                "predicted_positive": int(r["predicted_positive"][a]),
                "predicted_negative": int(r["predicted_negative"][a]),
            }
        rows.append(row)
    return rows


def _energy_cell(value, majority: bool) -> str:
    text = fmt(value)
    return f"**{text}**" if majority and text != "n/a" else text


def model_label(name: str) -> str:
    """"AFFACT-u" / "AFFACT-b" for the trained pair; any other (loaded) model by its name."""
    return MODEL_LABELS.get(name, name)


def row_models(row: dict) -> list[str]:
    """The models a Table 1 row holds (its dict-valued fields), in order."""
    return [k for k, v in row.items() if isinstance(v, dict)]


def _short(models: Sequence[str]) -> dict[str, str]:
    """Column suffixes: " u" / " b" for AFFACT-u / AFFACT-b, nothing for a single model."""
    if len(models) == 1:
        return {models[0]: ""}
    return {m: " " + {"affact_u": "u", "affact_b": "b"}.get(m, m) for m in models}


def _table1_note(models: Sequence[str], method_label: str) -> str:
    who = ("u = AFFACT-u, b = AFFACT-b; " if list(models) == list(MODELS)
           else f"model: {', '.join(model_label(m) for m in models)}; ")
    return (f"Table 1 analogue: {who}p_m = training share of positives; "
            f"FNR/FPR on the frontal test faces; E+ / E- = mean proportional energy (eq. 7) of "
            f"the {method_label} CAM (predicted-class target |z|) inside the attribute mask over "
            "the positively / negatively predicted faces; **bold** = the majority class; "
            f"E unif = the energy a uniform map would get on {model_label(models[0])}'s "
            "positively / negatively predicted faces (the mask's area share, chance level). n/a: "
            "no prediction on that side, or no mask for the attribute. Sorted by |p_m - 0.5|.\n\n")


def table1_markdown(rows: Sequence[dict], method_label: str) -> str:
    models = row_models(rows[0]) if rows else list(MODELS)
    short = _short(models)
    headers = (["Attribute", "p_m"] + [f"{k}{short[m]}" for m in models for k in ("FNR", "FPR")]
               + [f"{k}{short[m]}" for m in models for k in ("E+", "E-")]
               + ["E+ unif", "E- unif"])
    body = []
    for row in rows:
        majority_positive = row["p_train"] > 0.5
        cells = [row["attribute"].replace("_", " "), fmt(row["p_train"])]
        for model in models:
            cells += [fmt(row[model]["fnr"]), fmt(row[model]["fpr"])]
        for model in models:
            cells += [_energy_cell(row[model]["energy_positive"], majority_positive),
                      _energy_cell(row[model]["energy_negative"], not majority_positive)]
        first = row[models[0]]
        cells += [fmt(first["uniform_positive"]), fmt(first["uniform_negative"])]
        body.append(cells)
    return _table1_note(models, method_label) + markdown_table(headers, body)


def table2_rows(reports: dict, methods: Sequence[str], attributes: Sequence[str],
                names: Sequence[str]) -> list[dict]:
    rows = []
    for attribute in attributes:
        a = list(names).index(attribute)
        for model, report in reports.items():
            r = report["energy"]
            rows.append({"attribute": attribute, "model": model, **{
                method: {"energy_positive": float(r[f"{method}/predicted"]["positive"][a]),
                         "energy_negative": float(r[f"{method}/predicted"]["negative"][a])}
                for method in methods}})
    return rows


def table2_markdown(rows: Sequence[dict], methods: Sequence[str]) -> str:
    headers = ["Attribute", "Model"] + [f"{METHOD_LABELS.get(m, m)} {s}" for m in methods
                                        for s in ("E+", "E-")]
    body = [[row["attribute"].replace("_", " "), model_label(row["model"])]
            + [fmt(row[m][k]) for m in methods for k in ("energy_positive", "energy_negative")]
            for row in rows]
    note = ("Table 2 analogue: mean proportional energy inside the attribute mask per CAM "
            "method (predicted-class target |z|), over the positively (E+) and negatively (E-) "
            "predicted frontal test faces. With a head of global average pooling and one dense "
            "layer the gradient is constant over the feature map, so HiResCAM equals "
            "Grad-CAM.\n\n")
    return note + markdown_table(headers, body)


def target_rows(reports: dict, main_method: str, attributes: Sequence[str],
                names: Sequence[str]) -> list[dict]:
    """Energy on negatively predicted faces: positive target z vs predicted target |z|."""
    rows = []
    for attribute in attributes:
        a = list(names).index(attribute)
        for model, r in reports.items():
            rows.append({
                "attribute": attribute, "model": model,
                "num_negative": int(r["predicted_negative"][a]),
                "predicted_target": float(r["energy"][f"{main_method}/predicted"]["negative"][a]),
                "positive_target": float(r["energy"][f"{main_method}/positive"]["negative"][a]),
            })
    return rows


def target_markdown(rows: Sequence[dict], method_label: str) -> str:
    headers = ["Attribute", "Model", "negatively predicted", "E- target |z|", "E- target z"]
    body = [[r["attribute"].replace("_", " "), model_label(r["model"]), r["num_negative"],
             fmt(r["predicted_target"]), fmt(r["positive_target"])] for r in rows]
    note = (f"Figure 4 numbers: {method_label} energy inside the attribute mask on the "
            "negatively predicted faces, with the predicted-class target |z| (eq. 4: explains "
            "the negative decision) and the positive target z (eq. 8: what most tools show).\n\n")
    return note + markdown_table(headers, body)


def finding_paragraph(finding: dict) -> str:
    """The closing note: the finding's numbers and its verdict in words."""
    maj, mino = finding["majority"], finding["minority"]
    n = maj["num_attributes"]
    if n == 0:
        verdict = ("No attribute with a mask is imbalanced enough (|p_m - 0.5| >= "
                   f"{finding['min_imbalance']}) to test the paper's finding.")
    else:
        p_value = maj["wilcoxon_p_b_greater"]
        verdict = (
            f"Over the {n} attributes with |p_m - 0.5| >= {finding['min_imbalance']:.2f} and a "
            f"mask, the majority-class CAMs put a mean energy of {maj['mean_u']:.3f} (AFFACT-u) "
            f"vs {maj['mean_b']:.3f} (AFFACT-b) inside the attribute region, "
            f"{maj['mean_lift_u']:.2f}x vs {maj['mean_lift_b']:.2f}x what a uniform map gets "
            f"on the same faces; AFFACT-b is higher for {maj['num_b_higher']} of {n} attributes "
            f"(one-sided Wilcoxon signed-rank p = {fmt(p_value)}). Minority class: "
            f"{fmt(mino['mean_u'])} vs {fmt(mino['mean_b'])} over the "
            f"{mino['num_attributes']} of these attributes that both models predict at least "
            f"once; mean minority-class error rate {fmt(finding['minority_error_u'])} (u) vs "
            f"{fmt(finding['minority_error_b'])} (b). ")
        verdict += {
            "shows": "**The paper's finding shows**: the unbalanced model's majority-class CAMs "
                     "carry less energy in the attribute region than the balanced model's.",
            "trend": "**The paper's finding shows only as a trend** here: the balanced model's "
                     "majority-class CAMs carry more energy in the attribute region on average "
                     "and for most attributes, but not significantly (p >= "
                     f"{finding['alpha']}).",
            "does_not_show": "**The paper's finding does not show** here: the balanced model's "
                             "majority-class CAMs do not carry more energy in the attribute "
                             "region than the unbalanced model's.",
            "inconclusive": f"**Inconclusive**: fewer than {MIN_ATTRIBUTES_FOR_TEST} attributes "
                            "to compare.",
        }[finding_verdict(finding)]
    return verdict


OUTPUT_FILES = ("table1.md", "table2.md", "table_targets.md", "figure2_mean_cams.png",
                "figure3_cam_methods.png", "figure4_targets.png", "figure_energy.png")


def _file_links(link_prefix: str) -> str:
    return ", ".join(f"[{f}]({link_prefix}{f})" for f in OUTPUT_FILES)


def _explained_on(setup: dict) -> str:
    test = setup["test"]
    return (f"{setup['main_method_label']} with the predicted-class target |z| on {test['kept']} "
            f"frontal test faces ({test['excluded']} of {test['total']} excluded by the frontal "
            "filter)")


def summary_markdown(setup: dict, rows1: Sequence[dict], finding: dict,
                     key_attributes: Sequence[str], link_prefix: str) -> str:
    """The README fragment: setup, key rows of Table 1, and the closing note with numbers."""
    by_name = {row["attribute"]: row for row in rows1}
    headers = ["Attribute", "p_m", "FNR u / b", "FPR u / b", "E+ u / b", "E- u / b"]
    body = []
    for name in key_attributes:
        if name not in by_name:
            continue
        row = by_name[name]
        u, b = row["affact_u"], row["affact_b"]
        maj_pos = row["p_train"] > 0.5
        body.append([
            name.replace("_", " "), fmt(row["p_train"]),
            f"{fmt(u['fnr'], '.2f')} / {fmt(b['fnr'], '.2f')}",
            f"{fmt(u['fpr'], '.2f')} / {fmt(b['fpr'], '.2f')}",
            f"{_energy_cell(u['energy_positive'], maj_pos)} / "
            f"{_energy_cell(b['energy_positive'], maj_pos)}",
            f"{_energy_cell(u['energy_negative'], not maj_pos)} / "
            f"{_energy_cell(b['energy_negative'], not maj_pos)}",
        ])
    verdict = finding_paragraph(finding)
    loss_u = ("plain Euclidean loss on +-1 targets" if setup["unbalanced_loss"] == "euclidean"
              else "sigmoid cross-entropy")
    files = _file_links(link_prefix)
    return (
        "### Binary attribute CAMs\n\n"
        f"AFFACT-u ({loss_u}) vs AFFACT-b (balanced Euclidean loss, eq. 5-6): two "
        f"{setup['model']} networks with one logit per attribute ({setup['num_attributes']} "
        f"attributes), trained on the same {setup['train_size']} {setup['source_label']} "
        f"({setup['num_steps']} updates each, {setup['resolution']} px), explained by "
        f"{_explained_on(setup)}; E = proportional energy "
        f"(eq. 7) in the {setup['mask_source']} attribute mask, **bold** = majority class.\n\n"
        + markdown_table(headers, body) + "\n" + verdict + "\n\nFull tables and figures: "
        + files + ".\n")


def loaded_model_summary_markdown(setup: dict, rows1: Sequence[dict],
                                  key_attributes: Sequence[str], link_prefix: str) -> str:
    """summary.md for one loaded model (``model.source`` checkpoint / torchvision): no u-vs-b test."""
    by_name = {row["attribute"]: row for row in rows1}
    body = []
    for name in key_attributes:
        if name not in by_name:
            continue
        row = by_name[name]
        (m,) = row_models(row)
        maj_pos = row["p_train"] > 0.5
        body.append([name.replace("_", " "), fmt(row["p_train"]), fmt(row[m]["fnr"], ".2f"),
                     fmt(row[m]["fpr"], ".2f"), _energy_cell(row[m]["energy_positive"], maj_pos),
                     _energy_cell(row[m]["energy_negative"], not maj_pos)])
    source = setup["model_source"]
    files = _file_links(link_prefix)
    return (
        "### Binary attribute CAMs\n\n"
        f"A {source['arch']} classifier loaded from {source['path']} (model.source="
        f"{source['source']}, {setup['num_attributes']} attribute outputs), explained by "
        f"{_explained_on(setup)}; p_m = positive share of the "
        f"{setup['train_size']} {setup['source_label']} of the configured training split; E = "
        f"proportional energy (eq. 7) in the {setup['mask_source']} attribute mask, **bold** = "
        "majority class. One model: the AFFACT-u vs AFFACT-b comparison is not made.\n\n"
        + markdown_table(["Attribute", "p_m", "FNR", "FPR", "E+", "E-"], body)
        + "\nFull tables and figures: " + files + ".\n")
