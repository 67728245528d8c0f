"""viz.report (tables, figures), keys (named run keys) and config_args.parse_arg."""

import math

import jax
import numpy as np
import pytest
from matplotlib.figure import Figure

from faceaudit_jax import keys
from faceaudit_jax.config_args import parse_arg
from faceaudit_jax.viz import report


def test_fmt_cells():
    assert report.fmt(0.12345) == "0.123"
    assert report.fmt(np.float32(2.5), ".1f") == "2.5"
    assert report.fmt(7) == "7" and report.fmt(np.int64(3)) == "3"
    assert report.fmt(None) == "n/a" and report.fmt(math.nan) == "n/a"
    assert report.fmt(float("inf"), missing="-") == "-"
    assert report.fmt("text") == "text" and report.fmt(True) == "True"


def test_markdown_table_layout_and_errors():
    table = report.markdown_table(["a", "b"], [["x", 0.5], ["y", None]], align="lr")
    assert table.splitlines() == ["| a | b |", "|:---|---:|", "| x | 0.500 |", "| y | n/a |"]
    with pytest.raises(ValueError, match="row 1 has 1 cells, expected 2"):
        report.markdown_table(["a", "b"], [["x", 1], ["y"]])
    with pytest.raises(ValueError, match="align"):
        report.markdown_table(["a"], [[1]], align="z")


def test_save_figure_writes_png(tmp_path):
    fig = Figure()
    fig.add_subplot().plot([0, 1], [1, 0])
    path = report.save_figure(fig, tmp_path / "sub" / "f.png", dpi=40)
    assert path.endswith("f.png")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert report.save_figure(fig, None) is None


def test_run_keys_are_stable_distinct_and_independent_of_other_names():
    a = keys.run_key(0, "biased", 1)
    assert np.array_equal(jax.random.key_data(a), jax.random.key_data(keys.run_key(0, "biased", 1)))
    assert not np.array_equal(jax.random.key_data(a), jax.random.key_data(keys.run_key(0, "biased", 2)))
    assert not np.array_equal(jax.random.key_data(a), jax.random.key_data(keys.run_key(1, "biased", 1)))
    # Passing a key folds into that key, the same as passing its seed.
    assert np.array_equal(jax.random.key_data(keys.run_key(jax.random.key(0), "biased", 1)),
                          jax.random.key_data(a))
    assert keys.name_hash("a", "b") == keys.name_hash("a/b") < 2 ** 31
    assert keys.run_seed(0, "test") != keys.run_seed(0, "train") != keys.run_seed(1, "train")
    with pytest.raises(ValueError):
        keys.name_hash()


def test_parse_arg_words_values_and_errors():
    a = parse_arg("celeba, smoke,res=96", smoke=False, celeba=False, res=128, name="x")
    assert (a.smoke, a.celeba, a.res, a.name) == (True, True, 96, "x")
    assert parse_arg("", smoke=False).smoke is False
    assert parse_arg("smoke=false", smoke=True).smoke is False
    with pytest.raises(ValueError, match="unknown config variant 'smok'.*smoke"):
        parse_arg("smok", smoke=False)
    with pytest.raises(ValueError, match="res='big'; expected a int"):
        parse_arg("res=big", res=128)
    with pytest.raises(ValueError, match="needs a value"):
        parse_arg("res", res=128)
