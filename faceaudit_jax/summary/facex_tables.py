"""FaceX's Tables 1, 3, 4 and Figure 5 from per-model audit records: rows, summaries, Markdown.

What the tables are (each a set of classifiers, scored by the ranking position
(RP) of the regions tied to the attributes their training data links to the target):

* Table 1 (single-attribute bias): target x confounder pairs, training subsets
  in which the confounder agrees with the target in a share ``corr`` (0.99),
  drawn from the attribute-independent pool so that the injected link is the
  only one; tested on a subset balanced over target x confounder. RP of the
  confounder = best rank among its regions. The model's accuracy on
  bias-aligned vs bias-conflicting test images says whether the shortcut was
  learned at all (an RP is only expected to be small when it was).
* Table 3 (two confounders at once): RP1 / RP2 = the better / worse of the two
  confounders' RPs ("the first and second confounder region found").
* Table 4 (no injected bias): a model trained on a target-balanced subset of
  CelebA-like correlated faces vs one trained on attribute-independent faces,
  both audited on the same correlated, target-balanced test set; RP of the
  regions of the ``top_k`` attributes most correlated with the target.
* Figure 5 (mitigation): Table 1's Male x Blond_Hair model vs the same
  training set with group-balanced reweighting (``reweighted_spec``) and with
  FLAC against a bias-capturing Blond_Hair classifier (``flac_spec``).

Here: the models' specs and fingerprints, the per-model records that
``experiments.facex_tables`` writes to ``<workdir>/audits/<name>.json``
(``audit_record`` plus accuracies, timings and fingerprints), each table's
rows and summary from those records, and each table's Markdown
(``viz.report``'s ``fmt`` / ``markdown_table``), so the tables can be laid
out again from saved records and tested on fixed ones.

A record holds ``name``, ``ior_vector`` float64 [19] (NaN where a region is
absent), ``ranking`` ([{"rank", "region", "ior"}], best first),
``confounder_rp`` (confounder -> RP or None), ``group_accuracy`` (accuracy,
aligned_accuracy, conflicting_accuracy, gap; the last three only with
confounders) and optionally ``counterfactual`` (``effects``, ``truth_rank``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import Optional, Sequence

import jax
import numpy as np

from faceaudit_jax import regions
from faceaudit_jax.data import sources
from faceaudit_jax.mitigation import reweighting
from faceaudit_jax.models import sources as model_sources
from faceaudit_jax.summary import audit as audit_lib
from faceaudit_jax.summary import ior as ior_lib
from faceaudit_jax.viz.report import fmt, markdown_table

# The paper's numbers (FaceX, CelebA), quoted next to ours in the Markdown.
PAPER = {
    "table1": "paper (CelebA, ResNet-18): mean RP 2.25, worst RP 6",
    "table3": "paper (CelebA): mean RP1 1.25, mean RP2 6.67",
}
GROUP_KEYS = ("accuracy", "aligned_accuracy", "conflicting_accuracy", "gap")


def parse_confounder_set(spec: str) -> tuple[str, ...]:
    """'Eyeglasses+Wearing_Hat' -> ('Eyeglasses', 'Wearing_Hat'), names validated."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"confounder set {spec!r}; expected names joined by '+', "
                         "e.g. 'Eyeglasses+Wearing_Hat'")
    names = tuple(n.strip() for n in spec.split("+"))
    regions.attribute_ids(names)
    if len(set(names)) != len(names):
        raise ValueError(f"confounder set {spec!r} repeats an attribute")
    return names


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything that defines one trained-and-audited model of a table."""

    name: str                       # directory and file name under models/ and audits/
    target: str
    confounders: tuple[str, ...]    # for the group report; () for none (Table 4)
    train_independent: bool         # training distribution: attribute-independent or correlated
    train_indices: np.ndarray       # int64 [N_train] image indices
    train_attrs: np.ndarray         # int8 [N_train, 40]
    test_independent: bool
    test_indices: np.ndarray        # int64 [N_test]
    test_attrs: np.ndarray          # int8 [N_test, 40]
    sample_weights: Optional[np.ndarray] = None   # float32 [N_train] or None
    confounder_values: tuple = ()   # per confounder, the value that goes with target = 1
    num_epochs: Optional[int] = None              # overrides train.num_epochs when set
    batch_size: Optional[int] = None              # overrides train.batch_size when set
    # FLAC (mitigation.flac): the bias-capturing model's spec (its target is the
    # protected attribute) and the loss weights {"alpha", "ce_weight", "d"}.
    protected: Optional["ModelSpec"] = None
    flac: Optional[dict] = None


def _mitigated_name(method: str, vanilla: ModelSpec, num_epochs: Optional[int]) -> str:
    """'biased_Male_Blond_Hair' -> '<method>_Male_Blond_Hair[_<n>ep]' (the rest of the
    vanilla name kept, so mitigations of different training sets do not collide)."""
    stem = vanilla.name[len("biased_"):] if vanilla.name.startswith("biased_") else vanilla.name
    return f"{method}_{stem}" + ("" if num_epochs is None else f"_{int(num_epochs)}ep")


def reweighted_spec(vanilla: ModelSpec, num_epochs: Optional[int] = None) -> ModelSpec:
    """The same training set as ``vanilla`` with group-balanced sample weights
    (trained for ``num_epochs`` when given; the name then says so)."""
    weights = reweighting.group_balanced_weights(vanilla.train_attrs, vanilla.target, vanilla.confounders)
    return dataclasses.replace(
        vanilla, name=_mitigated_name("reweighted", vanilla, num_epochs),
        sample_weights=weights, num_epochs=None if num_epochs is None else int(num_epochs))


def flac_spec(vanilla: ModelSpec, protected: ModelSpec, settings: dict,
              batch_size: Optional[int] = None, num_epochs: Optional[int] = None) -> ModelSpec:
    """The same training set as ``vanilla`` trained with FLAC against ``protected``
    (a classifier of the confounder); ``settings`` {"alpha", "ce_weight", "d"}."""
    if protected.target not in vanilla.confounders:
        raise ValueError(f"the protected model predicts {protected.target!r}; expected one of "
                         f"the vanilla model's confounders {list(vanilla.confounders)}")
    missing = sorted({"alpha", "ce_weight", "d"} - set(settings))
    if missing:
        raise ValueError(f"FLAC settings {dict(settings)} lack {missing}")
    return dataclasses.replace(
        vanilla, name=_mitigated_name("flac", vanilla, num_epochs),
        protected=protected, flac={k: float(settings[k]) for k in ("alpha", "ce_weight", "d")},
        batch_size=None if batch_size is None else int(batch_size),
        num_epochs=None if num_epochs is None else int(num_epochs))


def mitigation_of(spec: ModelSpec) -> Optional[str]:
    """"flac", "reweighted" or None."""
    return "flac" if spec.flac is not None else "reweighted" if spec.sample_weights is not None else None


# ----------------------------------------------------------------------------- fingerprints
# Their own hashing (not workdir.array_digest, which frames arrays differently):
# changing it would orphan every saved model and audit of results/facex.


def _digest(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        if a is None:
            h.update(b"none")
        else:
            a = np.ascontiguousarray(a)
            h.update(str((a.dtype.str, a.shape)).encode())
            h.update(a.tobytes())
    return h.hexdigest()[:16]


def _hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_fingerprint(config, spec: ModelSpec) -> str:
    """Hash of the settings that determine a model's trained weights."""
    train = config.train.to_dict()
    for k in ("ckpt_every", "log_every"):  # bookkeeping, not the weights
        train.pop(k, None)
    if spec.num_epochs is not None:
        train["num_epochs"] = int(spec.num_epochs)
    if spec.batch_size is not None:
        train["batch_size"] = int(spec.batch_size)
    settings = {
        "target": spec.target, "train_independent": spec.train_independent,
        "seed": int(config.seed), "model": config.model.to_dict(), "train": train,
        # Pool sizes only bound what can be drawn; ``independent`` is per model (spec).
        "data": {k: v for k, v in sources.fingerprint_fields(config.data).items()
                 if k not in ("pool_size", "test_pool_size", "independent")},
        "arrays": _digest(spec.train_indices, spec.sample_weights),
    }
    # Only when set, so the fingerprints of every other model stay as they were.
    if spec.flac is not None:
        settings["flac"] = {**spec.flac, "protected": model_fingerprint(config, spec.protected)}
    return _hash(settings)


# Bumped when what an audit record holds changes for the same settings, so stored
# records are redone rather than read back without it (2: region_effects).
RECORD_VERSION = 2


def audit_fingerprint(config, spec: ModelSpec) -> str:
    """Hash of the model's settings plus what its test and audit depend on."""
    return _hash({
        "model": model_fingerprint(config, spec), "test_independent": spec.test_independent,
        "confounders": list(spec.confounders), "explain": config.explain.to_dict(),
        "test": _digest(spec.test_indices), "record_version": RECORD_VERSION,
    })


# ----------------------------------------------------------------------------- records


def audit_record(spec: ModelSpec, result: audit_lib.AuditResult) -> dict:
    """The JSON record of one model's audit (without timings, fingerprints and accuracies)."""
    return {
        "name": spec.name, "target": spec.target, "confounders": list(spec.confounders),
        "train_distribution": "independent" if spec.train_independent else "correlated",
        "test_distribution": "independent" if spec.test_independent else "correlated",
        "train_size": int(spec.train_indices.size), "test_size": int(spec.test_indices.size),
        "reweighted": spec.sample_weights is not None,
        "mitigation": mitigation_of(spec),
        "ior": dict(zip(regions.REGIONS, result.ior.tolist())),
        "counts": dict(zip(regions.REGIONS, np.asarray(result.counts).tolist())),
        "ior_vector": result.ior.astype(np.float64),
        "ranking": [{"rank": r, "region": n, "ior": v} for r, n, v in result.ranking()],
        "confounder_rp": dict(zip(spec.confounders,
                                  audit_lib.confounder_rp(result.ior, list(spec.confounders)))),
    }


def load_record(path) -> dict:
    """A record written as JSON, with ``ior_vector`` back as float64 [19] (null -> NaN)."""
    record = json.loads(Path(path).read_text())
    record["ior_vector"] = np.asarray(
        [np.nan if v is None else v for v in record["ior_vector"]], np.float64)
    return record


def target_accuracy(logits: np.ndarray, attrs: np.ndarray, target: str) -> dict:
    """Accuracy of ``logits`` [N] > 0 against ``target`` over the images that annotate it."""
    y = attrs[:, regions.attribute_id(target)]
    known = y >= 0
    correct = (logits[known] > 0).astype(np.int32) == y[known]
    return {"accuracy": float(correct.mean()) if correct.size else math.nan,
            "num_images": int(known.sum())}


def group_value(record: dict, key: str) -> Optional[float]:
    """``record["group_accuracy"][key]`` as a float (None when absent)."""
    value = record["group_accuracy"].get(key)
    return None if value is None else float(value)


def top_regions(record: dict, n: int = 3) -> str:
    """The record's ``n`` best-ranked regions, comma separated."""
    return ", ".join(r["region"] for r in record["ranking"][:n])


def truth_rank(record: dict, attribute: str) -> Optional[float]:
    """The attribute's rank by counterfactual logit change (None without a ground truth)."""
    cf_record = record.get("counterfactual")
    if not cf_record:
        return None
    return cf_record["truth_rank"].get(attribute)


def evidence_region(record: dict, attribute: str) -> Optional[str]:
    """The region whose pixels carry the attribute's evidence: switching the attribute
    there alone changes the logit most (None without a region ground truth)."""
    by_region = (record.get("counterfactual") or {}).get("region_effects", {}).get(attribute)
    if not by_region:
        return None
    return max(by_region, key=lambda r: -np.inf if np.isnan(by_region[r]) else by_region[r])


def truth_top(record: dict) -> Optional[str]:
    """The attribute whose switch changes the logit most (None without a ground truth)."""
    cf_record = record.get("counterfactual")
    if not cf_record:
        return None
    effects = cf_record["effects"]
    return max(effects, key=lambda a: effects[a]["mean_abs_change"])


def counterfactual_record(clf: model_sources.Classifier, config, spec: ModelSpec) -> dict:
    """The model's ground-truth reliance on each switchable attribute (``summary.counterfactual``).

    Every test face is rendered again with one attribute switched; the mean
    |logit change| ranks the attributes without any explainer. Returns
    ``effects`` (attribute -> mean_abs_change, mean_change, num_images),
    ``truth_rank`` (attribute -> 1-based rank, ties averaged) and
    ``region_effects`` (confounder -> region -> mean |logit change| when the
    confounder is switched inside that region only: where its evidence sits).
    """
    from faceaudit_jax.summary import counterfactual as cf

    features_fn, head_fn = clf.fns()
    forward = jax.jit(lambda x: head_fn(features_fn(x))[:, 0])
    effects = cf.counterfactual_effects(
        forward, int(config.data.seed), spec.test_indices, int(config.data.resolution),
        batch_size=int(config.test.batch_size), independent=spec.test_independent,
        images_per_identity=int(config.data.images_per_identity))
    ranks = cf.average_ranks([effects[a]["mean_abs_change"] for a in effects])
    by_region = {}
    for confounder in spec.confounders:
        values = cf.region_effects(
            forward, int(config.data.seed), spec.test_indices, int(config.data.resolution),
            confounder, batch_size=int(config.test.batch_size),
            independent=spec.test_independent,
            images_per_identity=int(config.data.images_per_identity))
        by_region[confounder] = dict(zip(regions.REGIONS, values.tolist()))
    return {"effects": effects, "truth_rank": dict(zip(effects, ranks.tolist())),
            "region_effects": by_region}


# ----------------------------------------------------------------------------- Table 1


def table1_row(record: dict, target: str, confounder: str, learned_gap: float) -> dict:
    """One (target, confounder) model: its RP, top regions, group accuracies, ground truth."""
    row = {
        "target": target, "confounder": confounder, "regions": list(regions.regions_of(confounder)),
        "rp": record["confounder_rp"][confounder], "top_regions": top_regions(record),
        "accuracy": group_value(record, "accuracy"),
        "aligned_accuracy": group_value(record, "aligned_accuracy"),
        "conflicting_accuracy": group_value(record, "conflicting_accuracy"),
        "gap": group_value(record, "gap"), "model": record["name"],
        "ground_truth_rank": truth_rank(record, confounder),
        "ground_truth_top": truth_top(record),
        "evidence_region": evidence_region(record, confounder),
    }
    row["shortcut_learned"] = bool(row["gap"] is not None and row["gap"] >= float(learned_gap))
    return row


def table1_summary(rows: Sequence[dict], targets: Sequence[str], corr: float, learned_gap: float,
                   ior_vectors: Sequence[np.ndarray] = ()) -> dict:
    """Mean / worst RP over the rows, where the shortcut was learned, per target; left-right check.

    ``ior_vectors`` [19] each (the rows' models'), when given, add the mean
    IoR(right) - IoR(left) over twin regions and the share of pairs the right wins.
    """
    rps = [r["rp"] for r in rows]
    learned = [r["rp"] for r in rows if r["shortcut_learned"]]
    found = [rp for rp in rps if rp is not None]
    summary = {
        "mean_rp": audit_lib.mean_rp(rps), "worst_rp": max(found) if found else None,
        "num_cases": len(rows), "num_unranked": len(rps) - len(found),
        "mean_rp_where_shortcut_learned": audit_lib.mean_rp(learned),
        "worst_rp_where_shortcut_learned": max((rp for rp in learned if rp is not None),
                                               default=None),
        "num_shortcut_learned": len(learned),
        "mean_rp_by_target": {t: audit_lib.mean_rp([r["rp"] for r in rows if r["target"] == t])
                              for t in targets},
        "corr": float(corr), "learned_gap_threshold": float(learned_gap),
    }
    if len(ior_vectors):
        symmetry = ior_lib.left_right_symmetry(np.stack(ior_vectors))
        summary["right_minus_left"] = symmetry["mean_right_minus_left"]
        summary["right_wins_share"] = symmetry["right_wins_share"]
    return summary


_TRUTH_NOTE = (" GT rank: the confounder's rank among the switchable attributes by the mean "
               "|logit change| when each test face is re-rendered with that attribute "
               "switched (a ground truth no explainer is involved in): GT rank 1 with a "
               "large RP is the explainer's miss; a large GT rank means the model leans on "
               "something else. Evidence region: the region where switching the confounder "
               "alone (the rest of the face as drawn) changes the logit most; a right "
               "explanation ranks it first.")


def table1_markdown(result: dict) -> str:
    """Table 1's section: one row per model, then the summary and the paper's numbers."""
    s = result["summary"]
    with_truth = any(r.get("ground_truth_rank") is not None for r in result["rows"])
    truth_headers = ["GT rank", "Largest logit change", "Evidence region"] if with_truth else []
    body = markdown_table(
        ["Target", "Confounder", "RP", *truth_headers, "Top-3 regions", "Acc.", "Aligned acc.",
         "Conflicting acc.", "Shortcut learned"],
        [[r["target"], r["confounder"], r["rp"],
          *([fmt(r.get("ground_truth_rank"), ".0f"), r.get("ground_truth_top") or "n/a",
             r.get("evidence_region") or "n/a"]
            if with_truth else []),
          r["top_regions"], r["accuracy"],
          r["aligned_accuracy"], r["conflicting_accuracy"], "yes" if r["shortcut_learned"] else "no"]
         for r in result["rows"]])
    symmetry_note = (f" Left-right check over ear/eye/brow twins: mean IoR(right) - IoR(left) "
                     f"{fmt(s['right_minus_left'], '+.3f')}, right wins in "
                     f"{fmt(100 * s['right_wins_share'], '.0f')}% of pairs (0 and 50% on "
                     f"these left-right symmetric faces when the maps sit where the model looks)."
                     if s.get("right_minus_left") is not None else "")
    return (f"## Table 1: single-attribute bias (co-occurrence {s['corr']})\n\n{body}\n"
            f"Mean RP {fmt(s['mean_rp'], '.2f')}, worst RP {fmt(s['worst_rp'])} "
            f"({s['num_unranked']} of {s['num_cases']} unranked); mean RP where the shortcut was "
            f"learned (aligned - conflicting accuracy >= {s['learned_gap_threshold']}): "
            f"{fmt(s['mean_rp_where_shortcut_learned'], '.2f')} over "
            f"{s['num_shortcut_learned']} models, worst "
            f"{fmt(s.get('worst_rp_where_shortcut_learned'))}. {PAPER['table1']}."
            f"{_TRUTH_NOTE if with_truth else ''}{symmetry_note}\n")


# ----------------------------------------------------------------------------- Table 3


def table3_row(record: dict, target: str, confounders: Sequence[str]) -> dict:
    """One model biased on two confounders: RP of each, RP1 (better) and RP2 (worse)."""
    per = [record["confounder_rp"][c] for c in confounders]
    rp1, rp2 = audit_lib.ordered_rps(per)
    return {
        "target": target, "confounders": list(confounders),
        "rp_per_confounder": dict(zip(confounders, per)), "rp1": rp1, "rp2": rp2,
        "top_regions": top_regions(record, 4),
        "accuracy": group_value(record, "accuracy"),
        "aligned_accuracy": group_value(record, "aligned_accuracy"),
        "conflicting_accuracy": group_value(record, "conflicting_accuracy"),
        "model": record["name"],
    }


def table3_summary(rows: Sequence[dict], corr: float) -> dict:
    return {"mean_rp1": audit_lib.mean_rp([r["rp1"] for r in rows]),
            "mean_rp2": audit_lib.mean_rp([r["rp2"] for r in rows]),
            "num_cases": len(rows), "corr": float(corr)}


def table3_markdown(result: dict) -> str:
    """Table 3's section: RP per confounder, RP1 / RP2, accuracies; mean RP1 / RP2 vs the paper."""
    s = result["summary"]
    body = markdown_table(
        ["Target", "Confounders", "RP per confounder", "RP1", "RP2", "Top-4 regions",
         "Aligned acc.", "Conflicting acc."],
        [[r["target"], " + ".join(r["confounders"]),
          ", ".join(f"{c}: {fmt(v)}" for c, v in r["rp_per_confounder"].items()),
          r["rp1"], r["rp2"], r["top_regions"], r["aligned_accuracy"], r["conflicting_accuracy"]]
         for r in result["rows"]])
    return (f"## Table 3: two confounders at once (co-occurrence {s['corr']})\n\n{body}\n"
            f"Mean RP1 {fmt(s['mean_rp1'], '.2f')}, mean RP2 {fmt(s['mean_rp2'], '.2f')}. "
            f"{PAPER['table3']}. Aligned: both confounders agree with the target.\n")


# ----------------------------------------------------------------------------- Table 4


def table4_rows(top: Sequence[tuple[str, float]], r_independent: np.ndarray,
                records: dict) -> list[dict]:
    """Per top-correlated attribute (name, r): its regions' RP in the "correlated" and
    "independent" models' records; ``r_independent`` [40] = r in the independent training set."""
    rows = []
    for name, r in top:
        attr_regions = regions.regions_of(name)
        rps = {k: ior_lib.ranking_position(rec["ior_vector"], attr_regions)
               for k, rec in records.items()}
        rows.append({"attribute": name, "regions": list(attr_regions),
                     "r_correlated_train": r,
                     "r_independent_train": float(r_independent[regions.attribute_id(name)]),
                     "rp_correlated_model": rps["correlated"],
                     "rp_independent_model": rps["independent"]})
    return rows


def table4_summary(rows: Sequence[dict], records: dict, target: str, distinct_regions: bool) -> dict:
    return {
        "target": target,
        "mean_rp_correlated_model": audit_lib.mean_rp([r["rp_correlated_model"] for r in rows]),
        "mean_rp_independent_model": audit_lib.mean_rp([r["rp_independent_model"] for r in rows]),
        "accuracy": {k: rec["group_accuracy"]["accuracy"] for k, rec in records.items()},
        "top_regions": {k: [r["region"] for r in rec["ranking"][:5]] for k, rec in records.items()},
        "models": {k: rec["name"] for k, rec in records.items()},
        "excluded": "the target, undrawn (-1) attributes, attributes tied to no region"
                    + (" and attributes sharing a region with a stronger one"
                       if distinct_regions else ""),
    }


def table4_markdown(result: dict) -> str:
    """Table 4's section: RP of the top-correlated attributes in both models, mean RPs, accuracies."""
    s = result["summary"]
    body = markdown_table(
        ["Attribute", "Regions", "r (correlated train)", "r (independent train)",
         "RP, correlated-data model", "RP, independent-data model"],
        [[r["attribute"], ", ".join(r["regions"]), r["r_correlated_train"],
          r["r_independent_train"], r["rp_correlated_model"], r["rp_independent_model"]]
         for r in result["rows"]])
    return (f"## Table 4: no injected bias ({s['target']} classifiers)\n\n{body}\n"
            f"Mean RP: {fmt(s['mean_rp_correlated_model'], '.2f')} (trained on CelebA-like "
            f"correlated faces, accuracy {fmt(s['accuracy']['correlated'])}) vs "
            f"{fmt(s['mean_rp_independent_model'], '.2f')} (attribute-independent faces, accuracy "
            f"{fmt(s['accuracy']['independent'])}); both audited on the same correlated, "
            f"target-balanced test set. Top regions: correlated model "
            f"{', '.join(s['top_regions']['correlated'])}; independent model "
            f"{', '.join(s['top_regions']['independent'])}.\n")


# ----------------------------------------------------------------------------- Figure 5


def figure5_result(records: dict, target: str, confounder: str, corr: float, figures: dict,
                   tried: Sequence[dict], min_accuracy: float,
                   protected: Optional[dict] = None) -> dict:
    """The "vanilla" record against each mitigated one ("reweighted", "flac"): RPs,
    accuracies, IoR and its change per mitigation, whether each beats chance.

    ``figures``: mitigation -> figure file; ``tried``: [{"num_epochs", "accuracy"}] of
    the reweighted budgets trained; ``protected``: FLAC's bias-capturing model
    (name, attribute, accuracy, ...) when FLAC ran.
    """
    mitigated = [k for k in records if k != "vanilla"]
    ior_v = records["vanilla"]["ior_vector"]
    return {
        "target": target, "confounder": confounder, "corr": float(corr),
        "confounder_regions": list(regions.regions_of(confounder)),
        "mitigations": mitigated,
        "rp": {k: rec["confounder_rp"][confounder] for k, rec in records.items()},
        "group_accuracy": {k: {g: rec["group_accuracy"].get(g) for g in GROUP_KEYS}
                           for k, rec in records.items()},
        "ior": {k: dict(zip(regions.REGIONS, rec["ior_vector"].tolist()))
                for k, rec in records.items()},
        "ior_change": {k: dict(zip(regions.REGIONS, (records[k]["ior_vector"] - ior_v).tolist()))
                       for k in mitigated},
        "top_regions": {k: [r["region"] for r in rec["ranking"][:5]] for k, rec in records.items()},
        # Without an explainer: how much switching the confounder moves each model's
        # logit, and its rank among the switchable attributes (None on real data).
        "confounder_effect": {k: _confounder_effect(rec, confounder) for k, rec in records.items()},
        "models": {k: rec["name"] for k, rec in records.items()},
        "figures": dict(figures),
        "mitigated_schedule": list(tried),
        "mitigated_min_accuracy": min_accuracy,
        "mitigated_beats_chance": {k: bool(records[k]["group_accuracy"]["accuracy"] >= min_accuracy)
                                   for k in mitigated},
        "protected": protected,
    }


def _confounder_effect(record: dict, confounder: str) -> dict:
    effects = (record.get("counterfactual") or {}).get("effects", {})
    change = effects.get(confounder, {}).get("mean_abs_change")
    return {"mean_abs_logit_change": change, "truth_rank": truth_rank(record, confounder)}


def _verdict(result: dict, method: str) -> str:
    return ("clearly beats chance" if result["mitigated_beats_chance"][method] else
            "does NOT clearly beat chance, so its comparison tests little")


def _mitigation_notes(result: dict) -> str:
    notes = []
    threshold = fmt(result.get("mitigated_min_accuracy"), ".2f")
    tried = result.get("mitigated_schedule") or []
    if "reweighted" in result["mitigations"] and tried:
        steps = ", ".join(f"{t['num_epochs'] or 'base'} epochs: accuracy {fmt(t['accuracy'])}"
                          for t in tried)
        notes.append(f"Group-reweighted model trained until its accuracy reached {threshold} "
                     f"({steps}): it {_verdict(result, 'reweighted')}.")
    if "flac" in result["mitigations"]:
        p = result.get("protected") or {}
        notes.append(f"FLAC model (bias-capturing network: {p.get('attribute')} classifier, "
                     f"{p.get('train_size')} attribute-independent images x {p.get('num_epochs')} "
                     f"epochs, test accuracy {fmt(p.get('accuracy'))}): accuracy "
                     f"{fmt(result['group_accuracy']['flac']['accuracy'])}, it "
                     f"{_verdict(result, 'flac')} (threshold {threshold}).")
    return "".join(f"{n}\n\n" for n in notes)


def figure5_markdown(result: dict, link_prefix: str = "") -> str:
    """Figure 5's section; ``link_prefix`` goes before the figures' file names
    (see ``workdir_lib.readme_link_prefix``)."""
    acc, kinds = result["group_accuracy"], ["vanilla"] + list(result["mitigations"])
    effect = result.get("confounder_effect") or {}
    with_truth = any((effect.get(k) or {}).get("truth_rank") is not None for k in kinds)
    truth_headers = [f"GT rank of {result['confounder']}", "Mean abs. logit change"] if with_truth else []
    summary = markdown_table(
        ["Model", f"RP of {result['confounder']}", *truth_headers, "Acc.", "Aligned acc.",
         "Conflicting acc.", "Top-5 regions"],
        [[k, result["rp"][k],
          *([fmt(effect[k]["truth_rank"], ".0f"), effect[k]["mean_abs_logit_change"]] if with_truth else []),
          acc[k]["accuracy"], acc[k]["aligned_accuracy"],
          acc[k]["conflicting_accuracy"], ", ".join(result["top_regions"][k])] for k in kinds])
    per_region = markdown_table(
        ["Region"] + [f"IoR {k}" for k in kinds] + [f"Change {k}" for k in result["mitigations"]],
        [[n] + [result["ior"][k][n] for k in kinds]
         + [result["ior_change"][k][n] for k in result["mitigations"]] for n in regions.REGIONS])
    images = "".join(f"![figure 5, {k}]({link_prefix}{f})\n\n" for k, f in result["figures"].items())
    truth_note = (f"GT rank: the rank of {result['confounder']} among the switchable attributes by "
                  "the mean |logit change| when each is switched on the test faces (1 = the model "
                  "relies on it most; no explainer involved).\n\n") if with_truth else ""
    return (f"## Figure 5: {result['target']} x {result['confounder']} at {result['corr']}, "
            f"before and after mitigation ({', '.join(result['mitigations'])})\n\n{images}"
            f"{_mitigation_notes(result)}{summary}\n{truth_note}{per_region}")


MARKDOWN = {"table1": table1_markdown, "table3": table3_markdown, "table4": table4_markdown,
            "figure5": figure5_markdown}
