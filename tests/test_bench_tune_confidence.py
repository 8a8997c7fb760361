"""bench.tune_confidence on the CPU interpreter: a --grid sweeps constants of
patterns/confidence.py and restores them, and every timed call starts from a fully masked block."""
import pytest

from bench import tune_confidence
from difuse.patterns import confidence


def test_a_grid_is_swept_and_the_defaults_come_back(capsys):
    default = confidence.TILE_ROWS
    tune_confidence.main(["--quick", "--default-plan-only", "--grid", "TILE_ROWS=1,2"])
    printed = capsys.readouterr().out
    assert "TILE_ROWS=1" in printed and "TILE_ROWS=2" in printed
    assert confidence.TILE_ROWS == default


def test_a_grid_naming_an_unknown_constant_stops_with_its_name():
    with pytest.raises(SystemExit, match="NO_SUCH_KNOB"):
        tune_confidence.main(["--quick", "--grid", "NO_SUCH_KNOB=1"])


def test_every_call_sees_the_block_masked_again(monkeypatch):
    seen = []

    def spy(logits, block, mask_id, *args, **kwargs):
        seen.append(bool((block == mask_id).all()))
        block.fill_(0)  # as an accepting selection writes tokens over the masks

    monkeypatch.setattr(confidence, "confidence_threshold_select", spy)
    tune_confidence.main(["--quick"])
    assert seen and all(seen)
