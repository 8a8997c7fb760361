"""Strict checkpoint loading, sharding, the tiny-checkpoint maker and the tokenizer."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from difuse.models import CheckpointError, encode_prompt, load_model, load_tokenizer, make_tiny_checkpoint


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("pristine"), kind="llada")


@pytest.fixture
def checkpoint(pristine, tmp_path):
    """A private copy that a test may damage."""
    return shutil.copytree(pristine, tmp_path / "ckpt")


def rewrite(path, change):
    weights = load_file(path / "model.safetensors")
    change(weights)
    save_file(weights, path / "model.safetensors")


def test_missing_tensor_is_named(checkpoint):
    rewrite(checkpoint, lambda w: w.pop("model.transformer.blocks.1.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors: model\.transformer\.blocks\.1\.up_proj\.weight"):
        load_model(checkpoint)


def test_unexpected_tensor_is_named(checkpoint):
    rewrite(checkpoint, lambda w: w.update({"model.transformer.blocks.0.q_bias": torch.zeros(64)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensors: model\.transformer\.blocks\.0\.q_bias"):
        load_model(checkpoint)


def test_misshaped_tensor_is_named(checkpoint):
    rewrite(checkpoint, lambda w: w.update({"model.transformer.blocks.0.k_proj.weight": torch.zeros(32, 64)}))
    with pytest.raises(CheckpointError, match=r"blocks\.0\.k_proj\.weight \(32, 64\) \(expected \(64, 64\)\)"):
        load_model(checkpoint)


def test_integer_tensor_is_refused(checkpoint):
    rewrite(checkpoint, lambda w: w.update({"model.transformer.ln_f.weight": torch.ones(64, dtype=torch.int8)}))
    with pytest.raises(CheckpointError, match=r"ln_f\.weight has dtype I8, not floating point"):
        load_model(checkpoint)


def test_truncated_file_is_named(checkpoint):
    data = (checkpoint / "model.safetensors").read_bytes()
    (checkpoint / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unreadable"):
        load_model(checkpoint)


def test_bad_config_is_reported(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps(config | {"weight_tying": True}))
    with pytest.raises(CheckpointError, match="weight_tying=True"):
        load_model(checkpoint)
    (checkpoint / "config.json").write_text(json.dumps(config | {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match="unsupported model"):
        load_model(checkpoint)
    (checkpoint / "config.json").write_text(json.dumps(config))
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="neither model.safetensors"):
        load_model(checkpoint)


def test_sharded_equals_single_file(pristine, tmp_path):
    sharded = make_tiny_checkpoint(tmp_path / "sharded", kind="llada", shards=3)
    assert len(list(sharded.glob("model-*-of-00003.safetensors"))) == 3
    single_state = load_model(pristine, dtype=torch.float32).state_dict()
    sharded_state = load_model(sharded, dtype=torch.float32).state_dict()
    assert single_state.keys() == sharded_state.keys()
    for name in single_state:
        assert torch.equal(single_state[name], sharded_state[name]), name


def test_shard_problems_are_named(tmp_path):
    sharded = make_tiny_checkpoint(tmp_path / "sharded", kind="llada", shards=2)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    key, shard = next(iter(index["weight_map"].items()))
    other = next(name for name in index["weight_map"].values() if name != shard)
    index["weight_map"][key] = other  # the index points at the wrong shard
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"{other}: lacks tensors the index assigns to it: \['{key}'\]"):
        load_model(sharded)
    (sharded / other).unlink()
    with pytest.raises(CheckpointError, match=rf"{other}: missing checkpoint file"):
        load_model(sharded)


def test_load_casts_and_freezes(pristine):
    with pytest.raises(ValueError, match="floating-point torch dtype"):
        load_model(pristine, "cpu", "int8")
    assert load_model(pristine, "cpu", "float32").dtype == torch.float32
    model = load_model(pristine, "cpu", torch.float16)
    assert all(p.dtype == torch.float16 and p.device.type == "cpu" and not p.requires_grad for p in model.parameters())
    assert not model.training
    assert (model.config.mask_token_id, model.config.eos_token_id) == (258, 257)


def test_tiny_checkpoint_is_deterministic(tmp_path):
    a = make_tiny_checkpoint(tmp_path / "a", seed=3)
    b = make_tiny_checkpoint(tmp_path / "b", seed=3)
    c = make_tiny_checkpoint(tmp_path / "c", seed=4)
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    assert json.loads((a / "config.json").read_text())["n_layers"] == 2
    assert json.loads(make_tiny_checkpoint(tmp_path / "d", n_layers=3).joinpath("config.json").read_text())["n_layers"] == 3


def test_tokenizer_round_trip_and_chat_template(pristine):
    tokenizer = load_tokenizer(pristine)
    config = json.loads((pristine / "config.json").read_text())
    assert tokenizer.mask_token_id == config["mask_token_id"] == 258
    assert tokenizer.eos_token_id == config["eos_token_id"] == 257
    assert len(tokenizer) <= config["vocab_size"]

    text = "Hello, wörld! 1+1=2 \t 日本"
    plain = encode_prompt(tokenizer, text, chat=False)
    assert plain == list(text.encode("utf-8"))  # byte-level ids are the byte values
    assert tokenizer.decode(plain) == text

    chat = encode_prompt(tokenizer, "  Hi  ")
    expected = "<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    assert tokenizer.decode(chat) == expected
    special = tokenizer.convert_tokens_to_ids(["<|startoftext|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
    assert chat[:2] == special[:2] and chat.count(special[3]) == 1 and chat.count(256) == 1


@pytest.mark.parametrize("kind", ["llada_moe", "llada2"])
def test_ling_tokenizer_and_chat_template(tmp_path, kind):
    path = make_tiny_checkpoint(tmp_path, kind=kind)
    tokenizer = load_tokenizer(path)
    config = json.loads((path / "config.json").read_text())
    assert tokenizer.convert_ids_to_tokens([config["mask_token_id"], config["eos_token_id"]]) == ["<|mask|>", "<|endoftext|>"]
    chat = encode_prompt(tokenizer, "2+2?")
    assert tokenizer.decode(chat) == "<role>HUMAN</role>2+2?<|role_end|><role>ASSISTANT</role>"
    assert chat[0] == tokenizer.convert_tokens_to_ids("<role>")
    assert tokenizer.decode(encode_prompt(tokenizer, "x y", chat=False)) == "x y"
