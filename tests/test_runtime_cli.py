"""The CLI end to end, as a user runs it: `python -m difuse.runtime generate ... --json`."""
import json
import os
import subprocess
import sys
from pathlib import Path

SHIM = Path(__file__).resolve().parents[1] / ".shim"


def cli(*args, env_extra=None):
    env = dict(os.environ, PYTHONPATH=str(SHIM)) | (env_extra or {})
    return subprocess.run([sys.executable, "-m", "difuse.runtime", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def generate_json(tiny_path, *extra):
    done = cli("generate", "--model", str(tiny_path), "--prompt", "hello", "--gen-length", "8", "--block-length",
               "4", "--decoder", "threshold", "--threshold", "0.05", "--cache", "dual", "--json", *extra)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_fused_and_eager_cli_print_json_with_identical_tokens(tiny_path):
    fused, eager = generate_json(tiny_path), generate_json(tiny_path, "--no-fusion")
    for out in (fused, eager):
        assert set(out) >= {"text", "tokens", "steps", "tokens_per_step", "ms_per_step", "cache_refreshes"}
        assert 1 <= out["steps"] <= 8 and out["cache_refreshes"] == 2
    assert (fused["fusion"], eager["fusion"]) == (True, False)
    assert fused["tokens"] == eager["tokens"] and fused["text"] == eager["text"]


def test_report_prints_the_fusion_table_and_writes_pictures(tiny_path, tmp_path):
    html, png = tmp_path / "report.html", tmp_path / "report.png"
    done = cli("report", "--model", str(tiny_path), "--prompt", "hi", "--gen-length", "4", "--block-length", "4",
               "--html", str(html), "--png", str(png))
    assert done.returncode == 0, done.stderr
    assert "FusionReport" in done.stdout and html.stat().st_size > 0 and png.stat().st_size > 0


def test_bad_settings_exit_with_a_message(tiny_path):
    done = cli("generate", "--model", str(tiny_path), "--prompt", "hi", "--gen-length", "10", "--block-length", "4")
    assert done.returncode == 2 and "multiple of block_length" in done.stderr


def test_without_model_the_builtin_model_answers():
    done = cli("generate", "--prompt", "What is 347 + 589?", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["text"] == "936"


def test_block_causal_models_decode_with_block_diffusion_unless_told_otherwise(tmp_path):
    """LLaDA2 left to the defaults gets its own decoding (block diffusion, prefix cache): the tokens
    of Engine.generate with those settings and no warning. An explicit --iteration blockwise, or a
    cache only blockwise decoding has, runs with a warning that the model never attended that way."""
    import torch

    from difuse.models import generation_defaults, make_tiny_checkpoint
    from difuse.runtime import Engine, GenerationConfig

    path = make_tiny_checkpoint(tmp_path, kind="llada2", dtype=torch.float32)
    assert generation_defaults(path)["iteration"] == "block_diffusion"
    settings = ("--prompt", "hello", "--gen-length", "8", "--block-length", "4", "--no-fusion", "--json")
    default = cli("generate", "--model", str(path), *settings)
    assert default.returncode == 0, default.stderr
    assert "block-causal" not in default.stderr
    config = GenerationConfig(gen_length=8, block_length=4, iteration="block_diffusion", cache="prefix")
    [expected] = Engine.from_pretrained(str(path), enable_fusion=False).generate(["hello"], config)
    assert json.loads(default.stdout)["tokens"] == expected.tokens
    for choice in (("--iteration", "blockwise"), ("--cache", "dual")):
        bidirectional = cli("generate", "--model", str(path), *settings, *choice)
        assert bidirectional.returncode == 0, bidirectional.stderr
        assert "trained with block-causal attention" in bidirectional.stderr
