"""The OpenAI-compatible server as a real process on loopback, driven by the official `openai`
client (and raw HTTP for malformed requests): completions and chat, plain and streamed,
concurrent requests batched yet identical to each served alone, bad input, queue overflow,
timeouts and a client that disconnects mid-stream. Fusion is off to keep CPU time low."""
import concurrent.futures
import http.client
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from difuse.models import make_tiny_checkpoint  # noqa: E402

HOST = "127.0.0.1"
MODEL = "tiny-llada"
MAX_QUEUE = 40


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def _python_path() -> str:
    """The subprocess imports the same difuse as the tests: with a source shim on sys.path
    (.shim/difuse/* -> worktree folders) pass that folder on; an installed difuse needs nothing."""
    import difuse.runtime

    shim = Path(difuse.runtime.__file__).parent.parent.parent
    paths = [str(shim)] if (shim / "difuse" / "runtime").is_dir() else []
    return os.pathsep.join(paths + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    checkpoint = make_tiny_checkpoint(tmp_path_factory.mktemp("served") / MODEL, kind="llada")
    port = _free_port()
    log = tmp_path_factory.mktemp("log") / "server.log"
    command = [sys.executable, "-m", "difuse.runtime", "serve", "--model", str(checkpoint), "--host", HOST,
               "--port", str(port), "--no-fusion", "--device", "cpu", "--gen-length", "16", "--block-length", "8",
               "--threads", "1", "--max-batch-size", "8", "--max-queue", str(MAX_QUEUE), "--log-level", "warning"]
    env = dict(os.environ, PYTHONPATH=_python_path())
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the server did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)


def _post(url: str, path: str, body: bytes | dict, timeout: float = 60) -> tuple[int, dict]:
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    connection.request("POST", path, payload, {"Content-Type": "application/json"})
    response = connection.getresponse()
    status, data = response.status, json.loads(response.read() or b"null")
    connection.close()
    return status, data


def _metric(url: str, name: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def _assert_openai_error(body: dict, param: str | None = None, code: str | None = None) -> None:
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error


def test_models_health_and_metrics(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    with urllib.request.urlopen(f"{server}/health", timeout=10) as response:
        assert json.loads(response.read())["status"] == "ok"
    client.completions.create(model=MODEL, prompt="warm up", max_tokens=8)
    with urllib.request.urlopen(f"{server}/metrics", timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    for name in ("difuse_requests_total", "difuse_generated_tokens_total", "difuse_denoise_steps_total",
                 "difuse_tokens_per_step_bucket", "difuse_step_latency_seconds_bucket", "difuse_queue_depth"):
        assert f"\n{name}" in text, name
    assert _metric(server, 'difuse_requests_total{endpoint="/v1/completions",status="200"}') >= 1


def test_completion_plain_and_streamed_agree(client):
    plain = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=16)
    choice = plain.choices[0]
    assert plain.object == "text_completion" and choice.finish_reason == "length"
    assert plain.usage.completion_tokens == 16 and plain.usage.prompt_tokens > 0
    chunks = list(client.completions.create(model=MODEL, prompt="The sky is", max_tokens=16, stream=True))
    texts = [c.choices[0].text for c in chunks]
    assert "".join(texts) == choice.text
    assert len([t for t in texts if t]) == 2  # one delta per committed block (16 tokens, blocks of 8)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_plain_and_streamed_agree_with_extra_settings(client):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    settings = {"gen_length": 24, "cache": "dual", "threshold": 0.5}
    plain = client.chat.completions.create(model=MODEL, messages=messages, extra_body=settings)
    answer = plain.choices[0]
    assert plain.object == "chat.completion" and answer.message.role == "assistant"
    assert plain.usage.completion_tokens + plain.usage.prompt_tokens == plain.usage.total_tokens
    stream = client.chat.completions.create(model=MODEL, messages=messages, stream=True, extra_body=settings,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer.message.content
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == answer.finish_reason


def _request(client, index: int):
    # different prompt lengths, generation lengths and settings, so rows join and leave mid-batch
    extra = {"cache": "dual"} if index % 4 == 3 else {}
    response = client.completions.create(model=MODEL, prompt=f"request {index} " + "x" * (index % 7),
                                         max_tokens=8 * (1 + index % 3), extra_body=extra)
    return response.choices[0].text, response.model_extra["difuse"]["tokens"][0]


def test_concurrent_requests_are_batched_and_match_each_served_alone(server, client):
    steps_before = _metric(server, "difuse_denoise_steps_total")
    alone = [_request(client, i) for i in range(32)]
    steps_alone = _metric(server, "difuse_denoise_steps_total") - steps_before
    with concurrent.futures.ThreadPoolExecutor(max_workers=32) as pool:
        together = list(pool.map(lambda i: _request(client, i), range(32)))
    steps_together = _metric(server, "difuse_denoise_steps_total") - steps_before - steps_alone
    assert together == alone
    assert steps_together < 0.5 * steps_alone  # rows shared their denoise steps


def test_bad_input_gets_an_openai_error_and_the_server_keeps_serving(server, client):
    status, body = _post(server, "/v1/completions", b'{"model": "tiny-llada", "prompt": ')
    assert status == 400
    _assert_openai_error(body, code="invalid_json")
    status, body = _post(server, "/v1/completions", {"model": MODEL})
    assert status == 422
    _assert_openai_error(body, param="prompt")
    status, body = _post(server, "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": "5"})
    assert status == 422
    _assert_openai_error(body, param="max_tokens")
    status, body = _post(server, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user"}]})
    assert status == 422
    _assert_openai_error(body)
    status, body = _post(server, "/v1/completions", [1, 2])
    assert status == 422
    _assert_openai_error(body)
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=MODEL, prompt="hi", extra_body={"gen_length": 20})
    _assert_openai_error({"error": error.value.body}, param="gen_length", code="invalid_generation_settings")
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=MODEL, prompt="hi", extra_body={"decoder": "fixed", "steps": 3})
    _assert_openai_error({"error": error.value.body}, param="steps", code="invalid_generation_settings")
    fixed = client.completions.create(model=MODEL, prompt="hi", max_tokens=16, extra_body={"decoder": "fixed"})
    assert fixed.model_extra["difuse"]["steps"] == 16  # default schedule: one token per step
    with pytest.raises(openai.UnprocessableEntityError):
        client.completions.create(model=MODEL, prompt="hi", extra_body={"decoder": "nonsense"})
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=MODEL, prompt="x" * 600)
    assert "maximum context length" in str(error.value)
    status, body = _post(server, "/v1/completions", {"model": MODEL, "prompt": [99999]})
    assert status == 400
    _assert_openai_error(body, param="prompt")
    with pytest.raises(openai.BadRequestError, match="logprobs is not supported"):
        client.completions.create(model=MODEL, prompt="hi", logprobs=2)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="hi")
    assert client.completions.create(model=MODEL, prompt="still here", max_tokens=8).choices[0].text is not None


def test_a_full_queue_answers_503_and_every_accepted_request_completes(server):
    body = {"model": MODEL, "prompt": "flood", "gen_length": 64}
    with concurrent.futures.ThreadPoolExecutor(max_workers=64) as pool:
        answers = list(pool.map(lambda _: _post(server, "/v1/completions", body), range(64)))
    statuses = [status for status, _ in answers]
    assert set(statuses) <= {200, 503} and 503 in statuses and 200 in statuses
    for status, answer in answers:
        if status == 503:
            _assert_openai_error(answer, code="queue_full")
        else:
            assert answer["usage"]["completion_tokens"] == 64


def test_a_request_past_its_timeout_gets_504(server, client):
    status, body = _post(server, "/v1/completions",
                         {"model": MODEL, "prompt": "slow", "gen_length": 256, "timeout": 0.05})
    assert status == 504
    _assert_openai_error(body, code="request_timeout")
    assert client.completions.create(model=MODEL, prompt="after timeout", max_tokens=8).choices


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server, client):
    cancelled_before = _metric(server, 'difuse_finished_sequences_total{reason="cancelled"}')
    host, port = server.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    body = {"model": MODEL, "prompt": "a long story", "gen_length": 480, "block_length": 8, "stream": True}
    connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200
    assert response.readline().startswith(b"data: {")  # the first committed block arrived
    connection.sock.shutdown(socket.SHUT_RDWR)
    connection.close()
    deadline = time.monotonic() + 20
    while _metric(server, 'difuse_finished_sequences_total{reason="cancelled"}') == cancelled_before:
        assert time.monotonic() < deadline, "the disconnected stream's sequence was never dropped"
        time.sleep(0.1)
    while True:  # the worker publishes its running count after the block that dropped the row
        with urllib.request.urlopen(f"{server}/health", timeout=10) as health:
            if json.loads(health.read())["running"] == 0:
                break
        assert time.monotonic() < deadline, "the disconnected stream's row stayed in the batch"
        time.sleep(0.1)
    assert client.completions.create(model=MODEL, prompt="after disconnect", max_tokens=8).choices


def test_load_bench_counts_every_request_and_reports_percentiles(server):
    load = pytest.importorskip("bench.load")
    summary = load.run(server, None, concurrency=4, requests=12, max_seconds=60, timeout=60,
                       body={"prompt": "load", "max_tokens": 8, "stream": True})
    assert summary["sent"] == summary["ok"] == 12 and summary["model"] == MODEL
    assert 0 < summary["latency_p50_s"] <= summary["latency_p90_s"] <= summary["latency_p99_s"]
    assert 0 < summary["first_block_p50_s"] <= summary["latency_p99_s"]
    assert summary["completion_tokens_per_s"] > 0
    for remote in ("http://10.1.2.3:80", "http://example.com:80", "https://127.0.0.1:1"):
        with pytest.raises(ValueError):
            load.loopback_address(remote)
