"""Load generator for `difuse serve`: requests/s, completion tokens/s and latency percentiles.

    python -m bench.load --url http://127.0.0.1:8000 --concurrency 32 --requests 256
    python -m bench.load --tiny --concurrency 8 --requests 32    # starts a tiny CPU server itself

`--concurrency` workers send `--requests` completions in total (each waits for its answer before
the next), stopping early at `--max-seconds`. With `--stream` the latency to the first committed
block is measured too. Only loopback servers are accepted: this is a benchmark, not a load test
of somebody else's host. Prints a table, or one JSON object with `--json`.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import ipaddress
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass


@dataclass
class Outcome:
    status: int
    seconds: float
    first_block_seconds: float | None
    completion_tokens: int


def loopback_address(url: str) -> tuple[str, int]:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or not parts.hostname or parts.port is None:
        raise ValueError(f"--url must look like http://127.0.0.1:PORT, got {url!r}")
    try:  # no name lookups: a loopback IP literal, or localhost
        loopback = parts.hostname == "localhost" or ipaddress.ip_address(parts.hostname).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"{parts.hostname} is not a loopback address: bench.load only targets local servers")
    return parts.hostname, parts.port


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


def send(host: str, port: int, body: dict, timeout: float) -> Outcome:
    start = time.perf_counter()
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        first, tokens = None, 0
        if response.status == 200 and body.get("stream"):
            for line in iter(response.readline, b""):
                if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if first is None and chunk.get("choices") and chunk["choices"][0].get("text"):
                    first = time.perf_counter() - start
                tokens = chunk.get("usage", {}).get("completion_tokens", tokens) if chunk.get("usage") else tokens
        else:
            answer = json.loads(response.read() or b"{}")
            tokens = answer.get("usage", {}).get("completion_tokens", 0) if response.status == 200 else 0
        return Outcome(response.status, time.perf_counter() - start, first, tokens)
    except (OSError, http.client.HTTPException):
        return Outcome(0, time.perf_counter() - start, None, 0)
    finally:
        connection.close()


def run(url: str, model: str | None, concurrency: int, requests: int, max_seconds: float, body: dict,
        timeout: float) -> dict:
    host, port = loopback_address(url)
    if model is None:
        with urllib.request.urlopen(f"http://{host}:{port}/v1/models", timeout=timeout) as response:
            model = json.loads(response.read())["data"][0]["id"]
    body = {"model": model, **body}
    if body.get("stream"):
        body["stream_options"] = {"include_usage": True}
    issued, lock, outcomes = 0, threading.Lock(), []
    deadline = time.perf_counter() + max_seconds

    def worker():
        nonlocal issued
        while True:
            with lock:
                if issued >= requests or time.perf_counter() > deadline:
                    return
                issued += 1
            outcome = send(host, port, body, timeout)
            with lock:
                outcomes.append(outcome)

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=concurrency) as pool:
        for future in [pool.submit(worker) for _ in range(concurrency)]:
            future.result()
    wall = time.perf_counter() - start
    ok = [o for o in outcomes if o.status == 200]
    statuses: dict[str, int] = {}
    for outcome in outcomes:
        statuses[str(outcome.status)] = statuses.get(str(outcome.status), 0) + 1
    summary = {"url": f"http://{host}:{port}", "model": model, "concurrency": concurrency, "sent": len(outcomes),
               "ok": len(ok), "statuses": statuses, "wall_s": wall, "requests_per_s": len(ok) / wall,
               "completion_tokens_per_s": sum(o.completion_tokens for o in ok) / wall}
    if ok:
        latencies = [o.seconds for o in ok]
        summary |= {f"latency_p{q}_s": percentile(latencies, q) for q in (50, 90, 99)}
        firsts = [o.first_block_seconds for o in ok if o.first_block_seconds is not None]
        if firsts:
            summary |= {f"first_block_p{q}_s": percentile(firsts, q) for q in (50, 90, 99)}
    return summary


def start_tiny_server(threads: int, folder: str) -> tuple[subprocess.Popen, str]:
    """A tiny random checkpoint (written into `folder`) served on a free loopback port, fusion
    off: a CPU smoke run of the whole path."""
    from difuse.models import make_tiny_checkpoint

    checkpoint = make_tiny_checkpoint(os.path.join(folder, "tiny-llada"), kind="llada")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "difuse.runtime", "serve", "--model", str(checkpoint), "--port", str(port),
               "--no-fusion", "--device", "cpu", "--threads", str(threads), "--gen-length", "32",
               "--block-length", "8", "--max-batch-size", "32", "--max-queue", "256", "--log-level", "warning"]
    process = subprocess.Popen(command, env=dict(os.environ))
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return process, url
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError("the tiny server did not start") from None
            time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.split("\n")[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000 (loopback only)")
    target.add_argument("--tiny", action="store_true", help="start a tiny CPU server for a smoke run")
    parser.add_argument("--model", help="model id to request (default: the server's first)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--max-seconds", type=float, default=300.0, help="stop issuing requests after this")
    parser.add_argument("--prompt", default="Write a short story about a robot.")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--setting", action="append", default=[], metavar="NAME=JSON",
                        help="extra body field, e.g. --setting cache='\"dual\"' --setting threshold=0.8")
    parser.add_argument("--stream", action="store_true", help="stream, and measure latency to the first block")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    parser.add_argument("--threads", type=int, default=1, help="--tiny: the server's torch threads")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.concurrency < 1 or args.requests < 1 or args.max_seconds <= 0:
        parser.error("--concurrency and --requests must be >= 1 and --max-seconds > 0")
    body = {"prompt": args.prompt, "max_tokens": args.max_tokens, "stream": args.stream}
    for setting in args.setting:
        name, _, value = setting.partition("=")
        try:
            body[name] = json.loads(value)
        except json.JSONDecodeError:
            body[name] = value
    process, scratch = None, tempfile.TemporaryDirectory(prefix="difuse-load-")
    try:
        if args.tiny:
            process, url = start_tiny_server(args.threads, scratch.name)
        else:
            url = args.url
        summary = run(url, args.model, args.concurrency, args.requests, args.max_seconds, body, args.timeout)
    except ValueError as error:
        parser.error(str(error))
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=30)
        scratch.cleanup()
    if args.json:
        print(json.dumps(summary))
    else:
        for key, value in summary.items():
            print(f"{key:>26}  {value:.4g}" if isinstance(value, float) else f"{key:>26}  {value}")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
