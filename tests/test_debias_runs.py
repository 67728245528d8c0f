"""The debiasing run grid: run ids, their inverse, repeats, and the runs a config plans."""

from pathlib import Path

import pytest

from faceaudit_jax import cli
from faceaudit_jax.mitigation.debias_runs import (parse_run_name, planned_runs, repeat_stem,
                                                  run_name)

ROOT = Path(__file__).resolve().parents[1]


def get_config(variant=""):
    return cli.load_config(f"{ROOT / 'configs' / 'debias_noise.py'}:{variant}")


def test_planned_runs_cover_table_and_sweep():
    config = get_config("smoke")
    runs = planned_runs(config, "Blond_Hair")
    assert runs[:2] == ["original", "balanced"]
    assert set(runs) == {"original", "balanced", "general_noise_q0.7", "general_mask_q0.7",
                         "specific_noise_q0.7", "specific_mask_q0.7", "general_noise_q0.95"}
    # The sweep's q = 0.7 is the main table's run, not a second one.
    assert len(runs) == len(set(runs)) == 7
    assert len(planned_runs(config, "Wearing_Hat")) == 6
    for name in runs:
        method, q = parse_run_name(name)
        assert run_name(method, q) == name
    # Quantiles round-trip exactly through the file names.
    for q in (0.6, 0.975, 1.0, 0.123456789):
        assert parse_run_name(run_name("specific_mask", q)) == ("specific_mask", q)
    with pytest.raises(ValueError, match="takes no quantile"):
        run_name("original", 0.7)
    with pytest.raises(ValueError, match="unknown debiasing method"):
        parse_run_name("blur_q0.7")
    assert repeat_stem("general_noise_q0.7", 0) == "general_noise_q0.7"
    assert repeat_stem("general_noise_q0.7", 2) == "general_noise_q0.7.rep2"
