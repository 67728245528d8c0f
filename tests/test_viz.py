"""Prototype heatmap, figures and report: files are written and say what they should."""

import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from faceaudit_jax.regions import NUM_REGIONS, REGION_ID, REGIONS  # noqa: E402
from faceaudit_jax.summary import ior as ior_lib  # noqa: E402
from faceaudit_jax.summary import top_patches as tp  # noqa: E402
from faceaudit_jax.viz import figures, prototype  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == PNG_MAGIC


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _texts(fig):
    return [t.get_text() for ax in fig.axes for t in ax.texts] + [t.get_text() for t in fig.texts]


@pytest.mark.parametrize("case", ["all_finite", "some_nan", "all_nan", "constant"])
def test_prototype_heatmap_writes_png(tmp_path, case):
    values = np.linspace(0.05, 0.6, NUM_REGIONS)
    if case == "some_nan":
        values[[REGION_ID["hat"], REGION_ID["ear_r"]]] = np.nan
    elif case == "all_nan":
        values[:] = np.nan
    elif case == "constant":
        values[:] = 0.3
    path = tmp_path / "proto.png"
    fig = prototype.plot_prototype_heatmap(values, path=str(path), title=case)
    assert _is_png(path)
    texts = _texts(fig)
    absent_labels = [t for t in texts if t.endswith("\nabsent")]
    assert len(absent_labels) == int(np.isnan(values).sum())
    # Every region is labelled exactly once across the two panels.
    assert sum(t.count("\n") == 1 for t in texts) == NUM_REGIONS


def test_prototype_colours_follow_values():
    values = np.full(NUM_REGIONS, 0.1)
    values[REGION_ID["u_lip"]] = 0.9
    values[REGION_ID["hat"]] = np.nan
    fig, ax = plt.subplots()
    norm = prototype.color_scale([values])
    prototype.draw_prototype(ax, values, "face", norm, labels=False)
    cmap = plt.get_cmap(prototype.DEFAULT_CMAP)
    facecolors = [tuple(np.round(p.get_facecolor()[:3], 4)) for p in ax.patches]
    assert tuple(np.round(cmap(norm(0.9))[:3], 4)) in facecolors  # the upper lip, red end
    fig2, ax2 = plt.subplots()
    prototype.draw_prototype(ax2, values, "accessories", norm, labels=False)
    grey = tuple(np.round(matplotlib.colors.to_rgb(prototype.ABSENT_COLOR), 4))
    assert grey in [tuple(np.round(p.get_facecolor()[:3], 4)) for p in ax2.patches]
    with pytest.raises(ValueError, match="one value per region"):
        prototype.plot_prototype_heatmap(np.zeros(5))


def _gallery_inputs():
    rng = np.random.default_rng(0)
    images = rng.random((4, 32, 32, 3)).astype(np.float32)
    parse = np.zeros((4, 32, 32), np.int32)
    parse[:, 8:24, 8:24] = REGION_ID["skin"]
    parse[:, 18:22, 12:20] = REGION_ID["u_lip"]
    maps = rng.random((4, 32, 32)).astype(np.float32)
    return images, parse, maps


def test_patch_gallery_array_and_callable(tmp_path):
    images, parse, maps = _gallery_inputs()
    top = tp.top_patches(maps, parse, np.array([3, 2, 1, 0]), k=5, patch_size=8)
    calls = []

    def fetch(image_id):
        calls.append(image_id)
        return images[image_id]

    path_a, path_b = tmp_path / "a.png", tmp_path / "b.png"
    figures.plot_patch_gallery(images, top, 8, regions=["u_lip", "skin", "hat"], path=str(path_a))
    fig = figures.plot_patch_gallery(fetch, top, 8, path=str(path_b))
    assert _is_png(path_a) and _is_png(path_b)
    assert len(calls) == len(set(calls))  # each image fetched once
    labels = [t for t in _texts(fig) if t in ("background", "skin", "upper lip")]
    assert set(labels) == {"background", "skin", "upper lip"}  # regions with patches
    with pytest.raises(ValueError, match="unknown region"):
        figures.plot_patch_gallery(images, top, 8, regions=["lips"])
    empty = tp.TopPatchAccumulator.finalize(tp.TopPatchAccumulator.init(3))
    figures.plot_patch_gallery(images, empty, 8, path=str(tmp_path / "empty.png"))
    assert _is_png(tmp_path / "empty.png")


def test_cam_overlays_and_comparison(tmp_path):
    images, _, maps = _gallery_inputs()
    figures.plot_cam_overlays(images, maps, [f"i{i}" for i in range(4)],
                              path=str(tmp_path / "o.png"), ncols=3)
    assert _is_png(tmp_path / "o.png")
    with pytest.raises(ValueError, match="3 titles for 4 images"):
        figures.plot_cam_overlays(images, maps, ["a", "b", "c"])
    a = np.linspace(0, 0.5, NUM_REGIONS)
    b = a[::-1].copy()
    a[REGION_ID["hat"]] = np.nan
    fig = figures.plot_ior_comparison(a, b, ("vanilla", "mitigated"),
                                      path=str(tmp_path / "c.png"))
    assert _is_png(tmp_path / "c.png")
    assert "n/a" in _texts(fig)
    figures.plot_ior_comparison(np.full(NUM_REGIONS, np.nan), np.full(NUM_REGIONS, np.nan),
                                path=str(tmp_path / "nan.png"))
    assert _is_png(tmp_path / "nan.png")


def test_write_report(tmp_path):
    values = np.linspace(0.1, 0.9, NUM_REGIONS)
    values[REGION_ID["hat"]] = np.nan
    counts = np.arange(NUM_REGIONS)
    counts[REGION_ID["hat"]] = 0
    proto = tmp_path / "figs" / "prototype.png"
    proto.parent.mkdir()
    prototype.plot_prototype_heatmap(values, path=str(proto))
    ranking = ior_lib.rank_regions(values)
    paths = figures.write_report(str(tmp_path / "run"), values, counts, ranking,
                                 {"prototype": str(proto)},
                                 {"accuracy": 0.875, "rp": [1, None], "loss": float("nan")})
    results = json.loads(open(paths["results"]).read())  # strict JSON: no NaN tokens
    assert results["ior"]["hat"] is None
    assert results["ior"]["cloth"] == pytest.approx(0.9)
    assert results["counts"]["hat"] == 0
    assert results["ranking"][0] == {"rank": 1, "region": "cloth", "ior": pytest.approx(0.9)}
    assert len(results["ranking"]) == NUM_REGIONS - 2  # background excluded, hat absent
    assert results["extra"] == {"accuracy": 0.875, "rp": [1, None], "loss": None}
    assert results["figures"]["prototype"] == "../figs/prototype.png"
    report = open(paths["report"]).read()
    assert "![prototype](../figs/prototype.png)" in report
    assert "| 1 | cloth (`cloth`) | 0.9000 |" in report
    assert "Absent from every explained image (no IoR): hat." in report
    with pytest.raises(ValueError, match="must both be"):
        figures.write_report(str(tmp_path), values[:3], counts)
    assert REGIONS[0] == "background"
