"""Tensor and expert parallelism on CPU: two gloo processes (torch.multiprocessing spawn on a free
loopback port) must give the logits and the greedy generation of one process's full model, for
dense LLaDA (TP), LLaDA-MoE and LLaDA2 (TP, EP, both). All cases share one spawn, since starting
processes dominates. The CLI under torchrun must print the tokens of a single process."""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from difuse.models import ParallelConfig, load_model, make_tiny_checkpoint
from difuse.models.packing import Cat, Shard, Stack, assemble

WORLD = 2
# name -> (kind, checkpoint overrides, shards, tensor_parallel, expert_parallel)
CASES = {
    "llada_tp_replicated_kv": ("llada", dict(n_kv_heads=1), 2, True, False),
    "llada_tp_split_kv": ("llada", dict(n_kv_heads=2), 1, True, False),
    "llada_moe_tp": ("llada_moe", dict(moe_layer_freq=[0, 1], shared_expert_intermediate_size=48), 1, True, False),
    "llada_moe_ep": ("llada_moe", dict(moe_layer_freq=[0, 1], shared_expert_intermediate_size=48), 2, False, True),
    "llada_moe_tp_ep": ("llada_moe", {}, 1, True, True),
    "llada2_tp": ("llada2", {}, 1, True, False),
    "llada2_ep": ("llada2", {}, 1, False, True),
    "llada2_tp_ep": ("llada2", {}, 2, True, True),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, paths: dict, out_dir: str, device: str = "cpu") -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if device == "cuda":
        device = f"cuda:{rank}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", rank=rank, world_size=WORLD)
    from difuse.runtime.config import GenerationConfig
    from difuse.runtime.engine import Engine

    generation = GenerationConfig(gen_length=8, block_length=4, threshold=0.05, cache="dual")
    prompt = [[5, 17, 42, 99, 3]]
    results = {}
    for name, (kind, _, _, tp, ep) in CASES.items():
        full = load_model(paths[name], device, torch.float32)
        shard = load_model(paths[name], device, torch.float32, ParallelConfig(tensor_parallel=tp, expert_parallel=ep))
        input_ids = torch.randint(0, 320, (2, 9), generator=torch.Generator().manual_seed(7)).to(device)
        positions = torch.arange(9, device=device)[None]
        expected = full.compute_logits(full(input_ids, positions))
        got = shard.compute_logits(shard(input_ids, positions)[:, 2:6])  # the LM head on some rows only
        results[name] = dict(expected=expected[:, 2:6].cpu(), got=got.cpu(), kv_heads=shard.num_kv_heads,
                             params=sum(p.numel() for p in shard.parameters()),
                             full_params=sum(p.numel() for p in full.parameters()),
                             tokens=[Engine(m, enable_fusion=False).generate(prompt, generation)[0].sequence
                                     for m in (full, shard)])
    try:
        load_model(paths["llada_tp_split_kv"], device, torch.float32, ParallelConfig(False, True))
    except ValueError as error:
        results["dense_ep_error"] = str(error)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _run_spawned(root: Path, device: str) -> list[dict]:
    paths = {name: str(make_tiny_checkpoint(root / name, kind, seed=3, shards=shards, dtype=torch.float32, **overrides))
             for name, (kind, overrides, shards, _, _) in CASES.items()}
    mp.spawn(_worker, args=(_free_port(), paths, str(root), device), nprocs=WORLD)
    return [torch.load(root / f"rank{r}.pt") for r in range(WORLD)]


@pytest.fixture(scope="module")
def parallel_results(tmp_path_factory):
    return _run_spawned(tmp_path_factory.mktemp("parallel"), "cpu")


@pytest.mark.parametrize("name", sorted(CASES))
def test_sharded_logits_match_full_model(parallel_results, name):
    _check_case(parallel_results, name)


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < WORLD, reason=f"needs {WORLD} GPUs")
def test_nccl_sharded_logits_match_full_model(tmp_path):
    """The same cases on two GPUs over NCCL, with the fused MoE kernels (the CUDA default)."""
    results = _run_spawned(tmp_path, "cuda")
    for name in CASES:
        _check_case(results, name)


def _check_case(parallel_results, name):
    kind, overrides, _, tp, ep = CASES[name]
    for rank in range(WORLD):
        result = parallel_results[rank][name]
        torch.testing.assert_close(result["got"], result["expected"], atol=1e-5, rtol=1e-5)
        assert torch.equal(result["got"].argmax(-1), result["expected"].argmax(-1))
        assert result["params"] < result["full_params"]  # each rank really holds less
    torch.testing.assert_close(parallel_results[0][name]["got"], parallel_results[1][name]["got"], atol=0, rtol=0)
    for rank in range(WORLD):
        full_tokens, shard_tokens = parallel_results[rank][name]["tokens"]
        assert shard_tokens == full_tokens
    kv_heads = {"llada_tp_replicated_kv": 1, "llada_tp_split_kv": 1, "llada_moe_ep": 4, "llada2_ep": 2}
    if name in kv_heads:
        assert parallel_results[0][name]["kv_heads"] == kv_heads[name]


def test_expert_parallel_refuses_dense_model(parallel_results):
    assert "needs a mixture-of-experts model" in parallel_results[0]["dense_ep_error"]


def test_parallel_sizes_need_a_process_group():
    assert ParallelConfig.from_sizes(1, 1) is None
    with pytest.raises(ValueError, match="torchrun"):
        ParallelConfig.from_sizes(tensor_parallel=2)


def test_assemble_reads_only_the_shard():
    full = {"q": torch.arange(12.).view(6, 2), "k": torch.arange(12., 20.).view(4, 2),
            "e0": torch.arange(6.).view(3, 2), "e1": torch.arange(6., 12.).view(3, 2)}
    read_log = []

    def read(key, shard):
        read_log.append((key, shard))
        t = full[key]
        if shard is None:
            return t
        return torch.cat([t.narrow(shard.dim, a, b - a) for a, b in shard.ranges], dim=shard.dim)

    qk = Cat(("q", "k"), (6, 4))
    rows = Shard(0, ((1, 3), (5, 8)))  # spans the q/k boundary
    whole = torch.cat((full["q"], full["k"]))
    torch.testing.assert_close(assemble(qk, read, rows), torch.cat((whole[1:3], whole[5:8])))
    assert all(key != "k" or shard == Shard(0, ((0, 2),)) for key, shard in read_log)
    torch.testing.assert_close(assemble(qk, read, Shard(1, ((1, 2),))), whole[:, 1:2])
    experts = Stack(("e0", "e1"))
    stacked = torch.stack((full["e0"], full["e1"]))
    torch.testing.assert_close(assemble(experts, read, Shard(0, ((1, 2),))), stacked[1:2])
    torch.testing.assert_close(assemble(experts, read, Shard(1, ((0, 1), (2, 3)))), stacked[:, [0, 2]])


SHIM = Path(__file__).resolve().parents[1] / ".shim"


def test_torchrun_cli_generates_the_tokens_of_one_process(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "llada2", "llada2", seed=3, dtype=torch.float32)
    args = ["-m", "difuse.runtime", "generate", "--model", str(path), "--prompt", "hello", "--gen-length", "8",
            "--block-length", "4", "--threshold", "0.05", "--no-fusion", "--json"]  # LLaDA2: block diffusion
    torchrun = shutil.which("torchrun")
    launcher = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    env = dict(os.environ, PYTHONPATH=str(SHIM), OMP_NUM_THREADS="1")
    single = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=300)
    assert single.returncode == 0, single.stderr
    parallel = subprocess.run([*launcher, "--nproc-per-node", str(WORLD), "--master-port", str(_free_port()),
                               *args, "--tp", "2", "--ep", "2"], capture_output=True, text=True, env=env, timeout=300)
    assert parallel.returncode == 0, parallel.stderr
    lines = parallel.stdout.strip().splitlines()
    assert len(lines) == 1  # rank 0 alone prints
    assert json.loads(lines[0])["tokens"] == json.loads(single.stdout)["tokens"]
