"""bench.step in quick mode on the CPU: every configuration is either measured or recorded as
skipped/failed with its reason, the outputs are written, and the roofline accounting (weight
bytes, FLOPs, routed experts) matches counts made here from the parameter shapes."""
import csv
import json
import time

import pytest
import torch

from bench import step
from bench.step_model import TINY_OF, StepGeometry, build_random_model, step_accounting


@pytest.fixture(autouse=True)
def _private_kernel_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFUSE_CACHE_DIR", str(tmp_path / "kernels"))


def run_quick(tmp_path, *extra):
    out = tmp_path / "results"
    code = step.main(["--quick", "--device", "cpu", "--out", str(out), *extra])
    return code, out


def read_rows(out, stem):
    with (out / f"{stem}.csv").open() as f:
        return list(csv.DictReader(f))


def test_quick_run_measures_or_explains_every_configuration(tmp_path, capsys):
    threads = torch.get_num_threads()
    code, out = run_quick(tmp_path, "--model", "tiny", "--batch", "1,2")
    assert code == 0
    assert torch.get_num_threads() == threads
    rows = read_rows(out, "step-tiny-cpu")
    result = json.loads((out / "step-tiny-cpu.json").read_text())
    ceilings = result["ceilings"]
    assert sorted((int(r["batch"]), r["config"]) for r in rows) == sorted(
        (b, c) for b in (1, 2) for c in step.CONFIGS)
    by = {(int(r["batch"]), r["config"]): r for r in rows}
    for batch in (1, 2):
        for name in ("eager", "fused_graph"):
            row = by[(batch, name)]
            assert row["status"] == "ok", row["error"]
            median, floor = float(row["median_ms"]), float(row["weight_floor_ms"])
            assert median > 0 and floor > 0
            assert float(row["x_weight_floor"]) == pytest.approx(median / floor)
            assert float(row["block_tokens_per_s"]) == pytest.approx(batch * 8 / (median / 1e3))
            assert float(row["tokens_per_s"]) == pytest.approx(batch * 3 / (median / 1e3))
            # one FLOP count over two ceilings: the fractions stand in the ratio of the rates
            ratio = float(row["matmul_fraction"]) / float(row["matmul_fraction_sustained"])
            assert ratio == pytest.approx(ceilings["matmul_flops_sustained"] / ceilings["matmul_flops"])
        for name in ("graph", "compile"):
            assert by[(batch, name)]["status"] == "skipped" and "CUDA" in by[(batch, name)]["error"]
    assert result["environment"]["torch"] == torch.__version__
    assert ceilings["copy_bandwidth_Bps"] > 0
    assert ceilings["matmul_flops"] > 0 and ceilings["matmul_flops_sustained"] > 0
    assert ceilings["matmul_clock_samples"] == 0  # no nvidia-smi sampling on the CPU
    assert set(result["fusion_reports"]) == {"1", "2"}
    assert result["fusion_reports"]["1"]["report"]["groups"]
    assert (out / "step-tiny-cpu.png").stat().st_size > 0
    assert (out / "step-tiny-cpu-fusion-b1.txt").read_text().startswith("FusionReport")
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1].lstrip().startswith("2 compile") and "SKIPPED" in printed[-1]


def test_moe_run_counts_routed_experts(tmp_path):
    code, out = run_quick(tmp_path, "--model", "llada-moe-7b", "--batch", "2", "--configs", "eager")
    assert code == 0
    (row,) = read_rows(out, "step-llada-moe-7b-tiny-cpu")
    assert row["status"] == "ok"
    routed = float(row["routed_experts_per_layer"])
    assert 2 <= routed <= 8  # at least top-k, at most all experts of the tiny config


def test_a_failing_configuration_is_recorded_and_the_rest_still_runs(tmp_path, monkeypatch):
    import difuse.fusion

    def broken(*args, **kwargs):
        raise RuntimeError("injected scheduler failure")

    monkeypatch.setattr(difuse.fusion.FusionScheduler, "__init__", broken)
    code, out = run_quick(tmp_path, "--model", "llada2-mini", "--batch", "1,2", "--configs", "fused_graph,eager")
    assert code == 0
    rows = {(r["batch"], r["config"]): r for r in read_rows(out, "step-llada2-mini-tiny-cpu")}
    for batch in ("1", "2"):
        assert rows[(batch, "fused_graph")]["status"] == "error"
        assert "injected scheduler failure" in rows[(batch, "fused_graph")]["error"]
        assert rows[(batch, "eager")]["status"] == "ok"
    traceback = json.loads((out / "step-llada2-mini-tiny-cpu.json").read_text())["rows"][0]["traceback"]
    assert "broken" in traceback


def test_budget_skips_only_the_costly_configurations(tmp_path):
    code, out = run_quick(tmp_path, "--model", "tiny", "--batch", "1", "--configs", "eager,fused_graph",
                          "--budget-s", "0")
    assert code == 0
    rows = {r["config"]: r for r in read_rows(out, "step-tiny-cpu")}
    assert rows["eager"]["status"] == "ok"
    assert rows["fused_graph"]["status"] == "skipped" and "budget" in rows["fused_graph"]["error"]


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit):
        step.parse_args(["--model", "llada-8b", "--device", "cpu"])  # real shapes need CUDA
    with pytest.raises(SystemExit):
        step.parse_args(["--quick", "--configs", "eager,warp"])
    with pytest.raises(SystemExit):
        step.parse_args(["--quick", "--batch", "1,x"])


@pytest.mark.parametrize("family", ["tiny", "llada-moe-7b", "llada2-mini"])
def test_accounting_matches_a_count_from_the_parameter_shapes(family):
    spec = TINY_OF[family]
    model = build_random_model(spec, torch.device("cpu"), torch.float32)
    geometry = StepGeometry(batch=3, query=8, block=8, keys=40, cache_length=48)
    experts = [m for m in model.modules() if isinstance(m, step.Experts)]
    union = [m.w13.shape[0] - 1 for m in experts] or None  # all experts but one, per layer
    a = step_accounting(model, geometry, union)

    named = dict(model.named_parameters())
    vocab, hidden = named["lm_head.weight"].shape
    expert_names = [n for n in named if ".experts." in n]
    per_expert = {n.rsplit(".", 1)[0]: 0 for n in expert_names}
    for n in expert_names:
        per_expert[n.rsplit(".", 1)[0]] += named[n][0].numel()
    dense = sum(p.numel() for n, p in named.items() if n not in expert_names and n != "embed_tokens.weight")
    routed = sum((count - 1) * per_expert[prefix] for prefix, count in
                 ((p, named[p + ".w13"].shape[0]) for p in per_expert))
    tokens = 3 * 8
    assert a["weight_bytes"] == 4 * (dense + routed + tokens * hidden)

    cfg = spec.config
    layers = len(model.layers)
    heads, head_dim = model.layers[0].attn.n_heads, model.layers[0].attn.head_dim
    kv_heads = model.layers[0].attn.n_kv_heads
    top_k = getattr(cfg, "num_experts_per_tok", 0)
    body = dense - vocab * hidden
    expected_flops = (2 * (body + top_k * sum(per_expert.values())) * tokens + 2 * vocab * hidden * tokens
                      + 4 * 3 * layers * heads * 8 * 40 * head_dim)
    assert a["flops"] == expected_flops
    assert a["kv_bytes"] == 3 * (40 + 8) * 2 * layers * kv_heads * head_dim * 4


def test_the_eager_census_counts_every_linear_call_by_shape():
    model = build_random_model(TINY_OF["tiny"], torch.device("cpu"), torch.float32)
    state = step.StepState(model, 2, 8, 8, 4, False, torch.device("cpu"), torch.float32)
    union, calls = step.eager_census(model, state)
    assert union is None
    layer = model.layers[0]
    rows, layers = 2 * state.geometry.query, len(model.layers)
    expected = {}  # two projections may share a shape (the tiny model's QKV and gate_up do)
    for linear, count in [(layer.attn.qkv, layers), (layer.attn.out, layers), (layer.ffn.gate_up, layers),
                          (layer.ffn.down, layers), (model.lm_head, 1)]:
        key = (rows, linear.in_features, linear.out_features, torch.float32)
        expected[key] = expected.get(key, 0) + count
    assert calls == expected


@pytest.mark.cuda
def test_cublas_gemm_time_adds_up_the_calls():
    calls = {(32, 256, 512, torch.bfloat16): 3, (32, 512, 256, torch.bfloat16): 1}
    one = step.cublas_gemm_ms({(32, 256, 512, torch.bfloat16): 1}, torch.device("cuda"))
    total = step.cublas_gemm_ms(calls, torch.device("cuda"))
    assert 0 < one < total


def test_the_sustained_matmul_rate_runs_its_seconds_and_times_the_second_half():
    from bench.ceilings import matmul_rates

    begin = time.perf_counter()
    burst, sustained = matmul_rates(torch.device("cpu"), 256, torch.float32, iters=5, sustain_s=0.4)
    assert time.perf_counter() - begin >= 0.2  # the burst's time per product sets the count: ~0.4 s of products
    assert burst > 0 and sustained > 0
