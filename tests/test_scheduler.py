import json
import os
import subprocess
import sys
import time

import pytest
import torch

from difuse.fusion import FusionConfig, FusionHeuristics, FusionScheduler, Match, Pattern, record
from difuse.fusion import codegen_triton
from difuse.patterns.rms_norm import rms_norm
from tiny_block import MASK_ID, TinyBlock, decode_step, rope_tables


class AddMul(Pattern):
    """Test-local pattern: (a + b) * c, with an injectable kernel."""

    name = "test_add_mul"
    priority = 10

    def __init__(self, kernel=None):
        self._kernel = kernel

    def match(self, graph):
        found = []
        for i, node in enumerate(graph.nodes):
            if node.op != "aten.mul.Tensor":
                continue
            p = graph.producer(node.inputs[0])
            if p is None or graph.nodes[p].op != "aten.add.Tensor" or len(graph.users(node.inputs[0])) != 1:
                continue
            add = graph.nodes[p]
            found.append(Match(self.name, (p, i), (add.inputs[0], add.inputs[1], node.inputs[1]), (node.outputs[0],)))
        return found

    def reference(self, a, b, c):
        return (a + b) * c

    def kernel(self, a, b, c):
        return self._kernel(a, b, c) if self._kernel else self.reference(a, b, c)

    def bytes_moved(self, a, b, c):
        return 4 * a.numel() * a.element_size()


def add_mul_then_norm(a, b, c, w, eps: float):
    return rms_norm((a + b) * c, w, eps)


def _args():
    return torch.randn(4, 24), torch.randn(4, 24), torch.randn(24), torch.randn(24), 1e-6


def _step_inputs(t=6):
    h = torch.randn(1, t, 32)
    cos, sin = rope_tables(t)
    tokens = torch.full((1, t), MASK_ID)
    tokens[0, 2] = 7
    return h, cos, sin, torch.arange(2, 2 + t), tokens


@pytest.mark.gpu
def test_fused_decode_step_equals_eager(tmp_path, device):
    module = TinyBlock().to(device)
    step = decode_step(module)
    h, cos, sin, positions, tokens = (t.to(device) for t in _step_inputs())
    initial_cache = module.k_cache.clone()
    graph = record(step, h, cos, sin, positions, tokens.clone(), 1e-5, 0.05, MASK_ID)
    scheduler = FusionScheduler(FusionConfig(cache_dir=tmp_path, debug_mode=True), patterns=[])

    for threshold in (0.05, 0.01):  # first call compiles (reference replay), second runs the Program
        module.k_cache.copy_(initial_cache)
        eager_tokens = tokens.clone()
        expected = step(h, cos, sin, positions, eager_tokens, 1e-5, threshold, MASK_ID)
        eager_cache = module.k_cache.clone()
        module.k_cache.copy_(initial_cache)
        fused_tokens = tokens.clone()
        out = scheduler.dispatch(graph, h, cos, sin, positions, fused_tokens, 1e-5, threshold, MASK_ID)
        torch.testing.assert_close(out["hidden"], expected["hidden"], rtol=1e-5, atol=1e-5)
        assert torch.equal(out["accepted"], expected["accepted"]) and torch.equal(fused_tokens, eager_tokens)
        torch.testing.assert_close(module.k_cache, eager_cache, rtol=1e-5, atol=1e-5)  # fused RoPE

    report = scheduler.report()
    fused = [g for g in report.groups if g.decision]
    assert len(fused) >= 5 and all(g.name == "generic" for g in fused)
    program = scheduler.program(graph)
    assert program.source.count("_fused") >= 5 and "for " not in program.source


def test_pattern_match_replaces_its_nodes_and_generic_fuses_the_rest(tmp_path):
    graph = record(add_mul_then_norm, *_args())
    scheduler = FusionScheduler(FusionConfig(cache_dir=tmp_path), patterns=[AddMul()])
    program = scheduler.compile(graph)
    kinds = sorted((g.kind, g.fused) for g in program.groups)
    assert kinds == [("generic", True), ("pattern", True)]
    args = _args()
    torch.testing.assert_close(program(*args), add_mul_then_norm(*args))


def test_slower_fused_kernel_is_rejected_by_profiling_and_the_decision_persists(tmp_path):
    def sleepy(a, b, c):
        time.sleep(0.004)
        return (a + b) * c

    config = FusionConfig(cache_dir=tmp_path, profile=True, op_whitelist=frozenset())  # only the pattern
    scheduler = FusionScheduler(config, patterns=[AddMul(sleepy)])
    args = _args()
    out = scheduler.dispatch(record(add_mul_then_norm, *args), *args)
    torch.testing.assert_close(out, add_mul_then_norm(*args))
    [group] = scheduler.report().groups
    assert not group.decision and group.decided_by == "profiled" and "measured" in group.reason
    assert group.t_fused > group.t_fallback

    again = FusionScheduler(config, patterns=[AddMul(sleepy)])  # a new process would see the same file
    again.dispatch(record(add_mul_then_norm, *args), *args)
    [group] = again.report().groups
    assert not group.decision and group.decided_by == "disk"


class MulOnly(Pattern):
    """Test-local pattern: a multiply of a sum, kept by the profile rule unless 1000x slower;
    remembers the sum of every call."""

    name = "test_mul"
    priority = 5
    profile_ratio = 1000.0

    def __init__(self):
        self.seen = []

    def match(self, graph):
        return [Match(self.name, (i,), tuple(node.inputs), (node.outputs[0],))
                for i, node in enumerate(graph.nodes) if node.op == "aten.mul.Tensor" and len(node.inputs) == 2
                and getattr(graph.producer_node(node.inputs[0]), "op", None) == "aten.add.Tensor"]

    def reference(self, x, c):
        return x * c

    def kernel(self, x, c):
        self.seen.append(x.clone())
        return x * c

    def bytes_moved(self, x, c):
        return 3 * x.numel() * x.element_size()


def test_a_pattern_turned_down_leaves_its_ops_to_the_patterns_below_it(tmp_path):
    def sleepy(a, b, c):
        time.sleep(0.004)
        return (a + b) * c

    mul = MulOnly()
    config = FusionConfig(cache_dir=tmp_path, profile=True, op_whitelist=frozenset())  # no generic groups
    scheduler = FusionScheduler(config, patterns=[AddMul(sleepy), mul])
    args = _args()
    graph = record(add_mul_then_norm, *args)
    torch.testing.assert_close(scheduler.dispatch(graph, *args), add_mul_then_norm(*args))
    groups = {g.name: g for g in scheduler.report().groups}
    assert not groups["test_add_mul"].decision and "went back" in groups["test_add_mul"].reason
    assert groups["test_mul"].decision and groups["test_mul"].decided_by == "profiled"
    # decided on the sum the recorded add computed from the real inputs (no second replay of the step)
    assert torch.equal(mul.seen[0], args[0] + args[1])
    again = _args()
    torch.testing.assert_close(scheduler.dispatch(graph, *again), add_mul_then_norm(*again))
    assert [g.name for g in scheduler.program(graph).groups if g.fused] == ["test_mul"]


def test_a_pattern_turned_down_leaves_its_ops_to_generic_fusion(tmp_path):
    def broken(a, b, c):
        raise RuntimeError("kernel exploded")

    scheduler = FusionScheduler(FusionConfig(cache_dir=tmp_path), patterns=[AddMul(broken)])
    args = _args()
    graph = record(add_mul_then_norm, *args)
    torch.testing.assert_close(scheduler.dispatch(graph, *args), add_mul_then_norm(*args))
    program = scheduler.program(graph)
    [turned_down] = [g for g in program.groups if g.kind == "pattern"]
    assert not turned_down.fused
    assert any(g.kind == "generic" and g.fused and g.nodes == turned_down.nodes for g in program.groups)
    again = _args()
    torch.testing.assert_close(program(*again), add_mul_then_norm(*again))


def test_ops_handed_back_without_example_args_are_decided_on_random_inputs(tmp_path):
    def broken(a, b, c):
        raise RuntimeError("kernel exploded")

    mul = MulOnly()
    args = _args()
    config = FusionConfig(cache_dir=tmp_path, op_whitelist=frozenset())
    scheduler = FusionScheduler(config, patterns=[AddMul(broken), mul])
    program = scheduler.compile(record(add_mul_then_norm, *args))  # no example args: random values
    assert [g.name for g in program.groups if g.fused] == ["test_mul"] and len(mul.seen) == 1
    torch.testing.assert_close(program(*args), add_mul_then_norm(*args))


def test_failing_pattern_kernel_falls_back_or_raises(tmp_path):
    def broken(a, b, c):
        raise RuntimeError("kernel exploded")

    args = _args()
    scheduler = FusionScheduler(FusionConfig(cache_dir=tmp_path), patterns=[AddMul(broken)])
    out = scheduler.dispatch(record(add_mul_then_norm, *args), *args)
    torch.testing.assert_close(out, add_mul_then_norm(*args))
    pattern_group = next(g for g in scheduler.report().groups if g.kind == "pattern")
    assert not pattern_group.decision and "kernel exploded" in pattern_group.reason

    strict = FusionScheduler(FusionConfig(cache_dir=tmp_path, fallback_on_error=False), patterns=[AddMul(broken)])
    with pytest.raises(RuntimeError, match="kernel exploded"):
        strict.dispatch(record(add_mul_then_norm, *args), *args)


def test_wrong_kernel_is_caught_by_debug_mode(tmp_path):
    args = _args()
    wrong = AddMul(lambda a, b, c: (a + b) * c + 1)
    scheduler = FusionScheduler(FusionConfig(cache_dir=tmp_path, debug_mode=True), patterns=[wrong])
    out = scheduler.dispatch(record(add_mul_then_norm, *args), *args)
    torch.testing.assert_close(out, add_mul_then_norm(*args))
    group = next(g for g in scheduler.report().groups if g.kind == "pattern")
    assert not group.decision and "not close" in group.reason


def test_generic_kernel_that_fails_to_compile_falls_back_or_raises(tmp_path, monkeypatch):
    monkeypatch.setattr(codegen_triton, "generate", lambda *a, **k: "def broken(:\n")
    args = _args()
    scheduler = FusionScheduler(FusionConfig(cache_dir=tmp_path), patterns=[])
    out = scheduler.dispatch(record(add_mul_then_norm, *args), *args)
    torch.testing.assert_close(out, add_mul_then_norm(*args))
    [group] = scheduler.report().groups
    assert not group.decision and "compile failed" in group.reason
    strict = FusionScheduler(FusionConfig(cache_dir=tmp_path / "strict", fallback_on_error=False), patterns=[])
    with pytest.raises(Exception, match="does not import"):
        strict.dispatch(record(add_mul_then_norm, *args), *args)


def test_invalid_and_overlapping_matches_are_rejected(tmp_path):
    class Greedy(AddMul):
        name = "greedy"
        priority = 5

        def match(self, graph):  # claims the add but not the mul, and forgets the escaping sum
            return [Match(self.name, (0,), (graph.nodes[0].inputs[0], graph.nodes[0].inputs[1]), ())]

    graph = record(add_mul_then_norm, *_args())
    program = FusionScheduler(FusionConfig(cache_dir=tmp_path), patterns=[AddMul(), Greedy()]).compile(graph)
    assert [g.name for g in program.groups if g.kind == "pattern"] == ["test_add_mul"]


def test_disabled_fusion_replays_unfused(tmp_path):
    args = _args()
    graph = record(add_mul_then_norm, *args)
    scheduler = FusionScheduler(FusionConfig(cache_dir=tmp_path, enable_fusion=False), patterns=[AddMul()])
    program = scheduler.compile(graph)
    assert not program.groups and "_fused" not in program.source
    torch.testing.assert_close(program(*args), add_mul_then_norm(*args))


def test_specialised_scalar_and_new_shapes_rerecord(tmp_path):
    def fn(x, n: int, eps: float):
        return rms_norm(x[:, :n], torch.ones(n), eps)

    x = torch.randn(3, 16)
    graph = record(fn, x, 8, 1e-6)
    assert graph.specialized == {1: 8} and graph.scalars == {2: float}
    scheduler = FusionScheduler(FusionConfig(cache_dir=tmp_path), patterns=[])
    for args in [(x, 8, 1e-6), (x, 8, 1e-3), (x, 12, 1e-6), (x, 12, 1e-6), (torch.randn(5, 20), 8, 1e-6)]:
        torch.testing.assert_close(scheduler.dispatch(graph, *args), fn(*args))
    assert len(scheduler._variants) == 2
    with pytest.raises(TypeError, match="3 positional args"):
        scheduler.dispatch(graph, x)


def _rms_norm_run(cache_dir):
    args = (torch.randn(4, 40), torch.randn(40), 1e-6)
    s = FusionScheduler(FusionConfig(cache_dir=cache_dir, profile=True), patterns=[])
    torch.testing.assert_close(s.dispatch(record(rms_norm, *args), *args), rms_norm(*args))
    return [[g.cache_hit, g.decided_by] for g in s.report().groups]


def test_second_process_reuses_the_disk_cache(tmp_path):
    assert _rms_norm_run(tmp_path) == [[None, "profiled"]]
    code = (f"import json, sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); import test_scheduler; "
            f"print(json.dumps(test_scheduler._rms_norm_run({str(tmp_path)!r})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [["disk", "disk"]]


def test_static_rules_give_reasons(tmp_path):
    graph = record(rms_norm, torch.randn(4, 24), torch.randn(24), 1e-6)
    nodes = list(range(len(graph.nodes)))
    h = FusionHeuristics(FusionConfig(cache_dir=tmp_path))
    assert h.static_rules(graph, nodes).fuse
    cases = [(dict(op_whitelist={"aten.mul.Tensor"}), "whitelist"), (dict(max_nodes=2), "max_nodes"),
             (dict(min_tensor_elements=10**6), "min_tensor_elements"), (dict(enable_fusion=False), "disabled")]
    for kwargs, reason in cases:
        d = FusionHeuristics(FusionConfig(cache_dir=tmp_path, **kwargs)).static_rules(graph, nodes)
        assert not d.fuse and reason in d.reason
    with pytest.raises(ValueError, match="backend"):
        FusionConfig(backend="cuda")


@pytest.mark.cuda
def test_program_is_cuda_graph_capturable(tmp_path):
    args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in _args())
    scheduler = FusionScheduler(FusionConfig(cache_dir=tmp_path), patterns=[AddMul()])
    program = scheduler.compile(record(add_mul_then_norm, *args), *args)
    program(*args)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = program(*args)
    args[0].add_(1)
    graph.replay()
    torch.testing.assert_close(out, add_mul_then_norm(*args))


@pytest.mark.cuda
def test_pattern_program_profiled_in_graph_mode_replays_in_a_cuda_graph(tmp_path):
    import difuse.patterns  # noqa: F401  (registers the patterns)

    step = decode_step(TinyBlock().cuda())
    h, cos, sin, positions, tokens = (t.cuda() for t in _step_inputs(5))
    call = lambda block: (h, cos, sin, positions, block, 1e-6, 0.5, MASK_ID)  # noqa: E731
    graph = record(step, *call(tokens.clone()))
    scheduler = FusionScheduler(FusionConfig(cache_dir=tmp_path, profile=True, fallback_on_error=False))
    program = scheduler.compile(graph, *call(tokens.clone()))
    assert {g.timing for g in scheduler.report().groups if g.t_fused} == {"graph"}
    block = tokens.clone()
    program(*call(block))  # warm-up outside the capture
    cuda_graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(cuda_graph):
        out = program(*call(block))
    h.copy_(torch.randn_like(h))  # new inputs in the captured buffers
    block.copy_(tokens)
    cuda_graph.replay()
    eager_block = tokens.clone()
    expected = step(*call(eager_block))
    torch.testing.assert_close(out["hidden"], expected["hidden"])
    assert torch.equal(out["accepted"], expected["accepted"]) and torch.equal(block, eager_block)
