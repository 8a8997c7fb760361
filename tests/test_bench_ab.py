"""bench.ab on the CPU: settings parse into environment variables and module constants, every
setting runs in its own process per round, and a setting that cannot run is reported, not hidden."""
import argparse

import pytest

from bench import ab


def test_settings_split_into_environment_and_module_constants():
    assert ab.parse_setting("DIFUSE_PDL=0 difuse.patterns.linear.BLOCK_K=64 x.y.FLAG=True x.y.R=0.5") == (
        {"DIFUSE_PDL": "0"}, {"difuse.patterns.linear.BLOCK_K": 64, "x.y.FLAG": True, "x.y.R": 0.5})
    assert ab.parse_setting("") == ({}, {})
    for bad in ("lower=1", "NO_VALUE", "=3"):
        with pytest.raises(argparse.ArgumentTypeError):
            ab.parse_setting(bad)


def test_ab_runs_each_setting_each_round_and_writes_the_table(tmp_path, capsys):
    ab.main(["", "difuse.patterns.linear.BLOCK_K=64", "difuse.patterns.linear.NO_SUCH=1", "--quick",
             "--config", "eager", "--rounds", "1", "--iters", "2", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "linear has no constant NO_SUCH" in printed
    table = (tmp_path / "ab-llada-8b-b1-eager.log").read_text().splitlines()
    rounds = [line for line in table if line.startswith("round 0")]
    assert len(rounds) == 3 and rounds[-1].split()[-2] == "nan"
    assert all(float(line.split()[-2]) > 0 for line in rounds[:2])
    assert table[-3].split()[-1] == "1.000x"
    assert (tmp_path / "ab-llada-8b-b1-eager.png").stat().st_size > 0
