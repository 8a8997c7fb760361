"""bench.kernels on the CPU interpreter: a partial run (some patterns, some row counts) checks each
fused kernel against its reference and writes its own result files."""
import csv

import pytest

from bench import kernels


def test_a_partial_run_takes_the_rows_asked_for(tmp_path, monkeypatch):
    monkeypatch.setattr(kernels, "RESULTS", tmp_path)
    kernels.main(["--quick", "--no-compile", "--only", "rms_norm", "add_rms_norm", "--rows", "3,6"])
    [path] = tmp_path.glob("kernels-*-rms_norm-add_rms_norm-rows3-6.csv")
    with path.open() as f:
        rows = list(csv.DictReader(f))
    assert {(r["pattern"], r["shape"]) for r in rows} == {
        (p, f"{n}x256") for p in ("rms_norm", "add_rms_norm") for n in (3, 6)}
    assert all(r["checked"] == "ok" for r in rows) and {r["provider"] for r in rows} == {"fused", "eager"}
    assert path.with_suffix(".json").exists() and path.with_suffix(".png").exists()


@pytest.mark.parametrize("rows", ["0", "32,x"])
def test_bad_row_counts_are_refused(rows):
    with pytest.raises(SystemExit):
        kernels.main(["--quick", "--rows", rows])


def test_rotated_copies_keep_the_layout_of_views():
    import torch

    qkv = torch.randn(1, 6, 9, 4)
    k = qkv[:, :, 3:6]  # a column slice, as a step's keys: strides with gaps
    sets = kernels.rotated_inputs((k, 0.5), min_bytes=3 * k.numel() * k.element_size())
    assert len(sets) == 3
    for copy, scale in sets[1:]:
        assert copy.stride() == k.stride() and torch.equal(copy, k) and scale == 0.5
        assert copy.untyped_storage().data_ptr() != k.untyped_storage().data_ptr()
