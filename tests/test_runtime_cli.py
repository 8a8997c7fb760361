"""The CLI end to end, as a user runs it: `python -m difuse.runtime generate ... --json`."""
import json
import os
import subprocess
import sys
from pathlib import Path

from runtime_fixtures import tiny_path  # noqa: F401 - fixture

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


def test_generate_prints_json(tiny_path):
    out = generate_json(tiny_path, "--no-fusion")
    assert set(out) >= {"text", "tokens", "steps", "tokens_per_step", "ms_per_step", "cache_refreshes"}
    assert out["fusion"] is False and 1 <= out["steps"] <= 8 and out["cache_refreshes"] == 2


def test_bad_settings_exit_with_a_message(tiny_path):
    done = cli("generate", "--model", str(tiny_path), "--prompt", "hi", "--gen-length", "10", "--block-length", "4")
    assert done.returncode == 2 and "multiple of block_length" in done.stderr


def test_without_model_a_tiny_checkpoint_is_made_and_announced(tmp_path):
    done = cli("generate", "--prompt", "hi", "--gen-length", "4", "--block-length", "4", "--no-fusion",
               env_extra={"XDG_CACHE_HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert "tiny random LLaDA checkpoint" in done.stderr and (tmp_path / "difuse" / "tiny-llada" / "config.json").is_file()
