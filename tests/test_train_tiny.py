"""The built-in model's pipeline on CPU: task batches, held-out split, a few training steps,
the saved checkpoint loading through the ordinary LLaDA path, and the quality benchmark."""
import json
import random

import pytest
import torch
from transformers import AutoTokenizer

from bench import arith_task, quality, train_tiny
from difuse.models import default, encode_prompt, generation_defaults, load_model, save_llada_checkpoint
from difuse.models.char_tokenizer import save_char_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("char-tokenizer")
    save_char_tokenizer(folder, model_max_length=64)
    return AutoTokenizer.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("builtin")
    settings = train_tiny.Settings(size="test", batch_size=64, lr=1e-2, warmup_steps=1, steps=40,
                                   minutes=5, eval_every_s=1e9)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 30k-parameter model only loses to thread start-up and contention
    try:
        record = train_tiny.train(out, settings, "cpu", log=lambda line: None)
    finally:
        torch.set_num_threads(threads)
    return out, settings, record


def test_batches_match_the_tokenizer(tokenizer):
    batcher = arith_task.TaskBatcher(tokenizer, gen_length=8, device="cpu")
    rng = random.Random(0)
    problems = [(1, 0, 999), (0, 999, 999), (1, 5, 5), (0, 0, 0), (1, 10, 100)]
    problems += [(rng.randrange(2), rng.randrange(1000), rng.randrange(1000)) for _ in range(200)]
    op, a, b = (torch.tensor(column) for column in zip(*problems))
    prompts, valid = batcher.prompts(op, a, b)
    answers = batcher.answers(op, a, b)
    assert prompts.shape == (len(problems), batcher.prompt_length) and answers.shape == (len(problems), 8)
    for i, problem in enumerate(problems):
        expected = encode_prompt(tokenizer, arith_task.question(*problem))
        assert prompts[i, -len(expected):].tolist() == expected  # left padding only
        assert valid[i].sum() == len(expected) and (prompts[i][~valid[i]] == tokenizer.pad_token_id).all()
        text = tokenizer.decode(answers[i].tolist(), skip_special_tokens=True)
        assert text == str(arith_task.solution(*problem))
        assert answers[i, len(text):].eq(tokenizer.eos_token_id).all()


def test_held_out_split_is_disjoint_from_training():
    problems = arith_task.held_out_problems(1000)
    assert len(set(problems)) == 1000 and problems == arith_task.held_out_problems(1000)
    assert all(arith_task.is_held_out(*p) for p in problems)
    op, a, b = arith_task.sample_training_problems(50_000, torch.Generator().manual_seed(0), "cpu")
    assert not arith_task.is_held_out(op, a, b).any()
    drawn = set(zip(op.tolist(), a.tolist(), b.tolist()))
    assert drawn.isdisjoint(problems)
    # The tensor hash and the Python-int hash agree, and the split holds about 1/64 of all problems.
    grid_a, grid_b = torch.meshgrid(torch.arange(1000), torch.arange(1000), indexing="ij")
    held = arith_task.is_held_out(torch.ones_like(grid_a), grid_a, grid_b)
    assert abs(held.float().mean().item() - 1 / 64) < 0.002
    assert held[123, 456].item() == arith_task.is_held_out(1, 123, 456)


def test_parse_answer():
    assert arith_task.parse_answer("-42") == -42 and arith_task.parse_answer(" 7 ") == 7
    assert arith_task.parse_answer("4 2") is None and arith_task.parse_answer("") is None


def test_training_reduces_the_loss(trained, tokenizer):
    out, settings, record = trained
    assert record["steps"] == settings.steps
    config = train_tiny.model_config(settings.size)
    torch.manual_seed(settings.seed)
    initial = train_tiny.LLaDAModel(config)
    train_tiny.init_weights(initial)
    final = load_model(out, "cpu", torch.float32)
    batcher = arith_task.TaskBatcher(tokenizer, train_tiny.GEN_LENGTH, "cpu")
    op, a, b = arith_task.sample_training_problems(256, torch.Generator().manual_seed(1), "cpu")
    prompt, valid = batcher.prompts(op, a, b)

    def loss(model):
        with torch.no_grad():
            return train_tiny.diffusion_loss(model, prompt, valid, batcher.answers(op, a, b), True,
                                             torch.Generator().manual_seed(2)).item()

    before, after = loss(initial), loss(final)
    assert after < 0.7 * before, (before, after)


def test_checkpoint_is_a_real_llada_checkpoint(trained):
    out, settings, record = trained
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llada" and config["architectures"] == ["LLaDAModelLM"]
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert tokenizer.mask_token_id == config["mask_token_id"] < config["vocab_size"]
    assert tokenizer.eos_token_id == config["eos_token_id"] < config["vocab_size"]
    assert len(tokenizer) == config["vocab_size"]
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 1 + 2?"}],
                                           add_generation_prompt=True, tokenize=False)
    assert prompt.startswith("<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nWhat is 1 + 2?<|eot_id|>")
    assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert generation_defaults(out) == {"gen_length": 8, "block_length": 4, "steps": 8}
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "loss_curve.png",
                 "training_log.json"):
        assert (out / name).is_file(), name
    assert 0.0 <= record["final_accuracy"] <= 1.0 and len(record["history"]) >= 2


def test_export_round_trips_exactly(tmp_path):
    model = train_tiny.LLaDAModel(train_tiny.model_config("test"))
    save_llada_checkpoint(model, tmp_path, dtype=torch.float32)
    loaded = load_model(tmp_path, "cpu", torch.float32)
    tokens = torch.randint(0, model.config.vocab_size, (2, 11))
    positions = torch.arange(11).expand(2, 11)
    with torch.no_grad():
        torch.testing.assert_close(loaded.compute_logits(loaded(tokens, positions)),
                                   model.compute_logits(model(tokens, positions)), rtol=0, atol=0)


def test_quality_bench_runs(trained, tmp_path):
    out, _, _ = trained
    rows = quality.run(out, n=6, device="cpu", enable_fusion=False, decoders=["fixed", "hierarchy"],
                       caches=["none", "dual"], batch_size=4, gen_length=None, block_length=None)
    assert [(r["decoder"], r["cache"]) for r in rows] == [
        ("fixed", "none"), ("fixed", "dual"), ("hierarchy", "none"), ("hierarchy", "dual")]
    fixed = rows[0]
    assert fixed["tokens_per_step"] == pytest.approx(1.0) and 0 <= fixed["accuracy"] <= 1
    quality.write_csv(rows, tmp_path / "quality-cpu.csv", {"device": "cpu", "model": "test", "problems": 6})
    quality.plot(rows, tmp_path / "quality-cpu.png", "test")
    assert len((tmp_path / "quality-cpu.csv").read_text().splitlines()) == 1 + len(rows)
    assert (tmp_path / "quality-cpu.png").stat().st_size > 0


def test_default_model_path_needs_a_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(default, "BUILTIN_FOLDER", tmp_path)
    with pytest.raises(FileNotFoundError, match="built-in model is missing"):
        default.default_model_path()
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert default.default_model_path() == tmp_path
    assert generation_defaults(tmp_path) == {}
    (tmp_path / "generation_config.json").write_text('{"gen_length": 8, "block_length": 4, "eos_token_id": 0}')
    assert generation_defaults(tmp_path) == {"gen_length": 8, "block_length": 4}


def test_builtin_model_solves_held_out_problems():
    """The shipped model, loaded by the Engine when no model is named, with the fixed schedule."""
    from difuse.runtime import Engine, GenerationConfig

    engine = Engine.from_pretrained(None, "cpu", torch.float32, enable_fusion=False)
    problems = arith_task.held_out_problems(64)
    config = GenerationConfig(gen_length=8, block_length=4, decoder="fixed", steps=8)
    results = engine.generate([arith_task.question(*problem) for problem in problems], config)
    correct = [arith_task.parse_answer(r.text) == arith_task.solution(*p) for r, p in zip(results, problems)]
    assert sum(correct) / len(correct) >= 0.95
