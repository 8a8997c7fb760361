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
