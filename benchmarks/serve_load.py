"""Load test of `lab serve`: concurrent streaming clients over loopback against a gpt_small run.

    python benchmarks/serve_load.py                      # random weights, gpt_small's shape: 16 clients, 60 s
    python benchmarks/serve_load.py --run runs/gpt_small # a trained run
    python benchmarks/serve_load.py --max-batch 1        # the same load served one request at a time

It starts `lab serve` in a subprocess on a free port, and each client thread asks for streamed
completions one after another until the time is up. Client k's prompt has its own length: 16
clients, 16 lengths (5, 12, ... 110 GPT-2 tokens of tinyshakespeare), so requests of every length
share the running batch. A warm-up (--warmup seconds of the same load, not counted) lets the
server compile its decoding step for the buckets the load uses. It reports errors, completed
requests, time to first token (p50, p99), aggregate new tokens/s (from the usage each stream ends
with), and the server's resident memory at start, after the model loaded, at its peak (VmHWM) and at
the end. Figures, not asserts: a loaded machine moves them, so compare variants run on the same
machine at the same time.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

from lab.engine.peak import processor_name

ROOT = Path(__file__).resolve().parent.parent
LENGTHS = [5 + 7 * k for k in range(16)]  # prompt tokens, client by client


def prompts(lengths=LENGTHS) -> list[str]:
    """Texts of exactly these GPT-2 token counts, cut from the tinyshakespeare that ships with lab."""
    from lab.plugins import registry

    corpus = ROOT / "plugins" / "components" / "lab_memmap" / "tinyshakespeare.txt"
    tokenizer = registry().get("tokenizer", "gpt2")
    tok = tokenizer.factory(tokenizer.Config())
    ids = tok.encode(corpus.read_text(encoding="utf-8")[:20000])
    out = []
    for k, n in enumerate(lengths):
        at = 97 * k
        while len(tok.encode(tok.decode(ids[at : at + n]))) != n:  # a cut that re-encodes to n tokens
            at += 1
        out.append(tok.decode(ids[at : at + n]))
    return out


def random_gpt_small(folder: Path) -> Path:
    """A gpt_small-shaped run folder with its initial (random) weights: what matters for speed is the
    shape."""
    from lab.model import GPT
    from lab.recipe import load_recipe
    from lab.runs.checkpoint import save

    recipe = load_recipe(ROOT / "recipes" / "gpt_small.toml")
    torch.manual_seed(0)
    save(folder, 0, GPT(recipe), recipe.to_toml(), {})
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    """The process's resident memory (VmRSS), or its peak so far (VmHWM), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def client(url, model, max_tokens, stop_at, results, lock, prompt):
    with httpx.Client(timeout=300) as http:
        i = 0
        while time.monotonic() < stop_at:
            body = {
                "model": model,
                "prompt": prompt,
                "max_tokens": max_tokens,
                "temperature": 0.8,
                "top_k": 200,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            i += 1
            started, first, tokens, ok = time.monotonic(), None, 0, False
            try:
                with http.stream("POST", url + "/v1/completions", json=body) as r:
                    if r.status_code != 200:
                        r.read()
                        raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
                    for line in r.iter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            ok = ok or line == "data: [DONE]"
                            continue
                        chunk = json.loads(line[6:])
                        if chunk.get("usage"):
                            tokens = chunk["usage"]["completion_tokens"]
                        elif first is None and chunk["choices"][0]["text"]:
                            first = time.monotonic()
                if not ok:
                    raise RuntimeError("stream ended without [DONE]")
                with lock:
                    results["done"].append((first - started if first else None, tokens, time.monotonic()))
            except Exception as e:  # noqa: BLE001 - counted, and the client goes on
                with lock:
                    results["errors"].append(f"{type(e).__name__}: {e}")


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))] if values else float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, help="a run folder (default: a random-init gpt_small-shaped one)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--warmup", type=float, default=30, help="seconds of the same load first, not counted")
    ap.add_argument("--no-compile", action="store_true", help="the server decodes eagerly")
    args = ap.parse_args(argv)
    texts = prompts()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the finally below stops the server

    tmp = tempfile.TemporaryDirectory()
    run = args.run or random_gpt_small(Path(tmp.name) / "gpt_small")
    model = run.resolve().name
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lab",
            "serve",
            str(run),
            "--port",
            str(port),
            "--max-batch",
            str(args.max_batch),
            "--max-queue",
            str(4 * args.clients),
            *(["--no-compile"] if args.no_compile else []),
        ],
        stderr=(log_file := open(Path(tmp.name) / "server.log", "w+")),  # a pipe unread could fill
        text=True,
    )
    print(f"lab serve started on {url}; {args.clients} clients for {args.seconds:.0f} s", flush=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                httpx.get(url + "/v1/models", timeout=1).raise_for_status()
                break
            except httpx.HTTPError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"lab serve did not start:\n{Path(log_file.name).read_text()}")
                time.sleep(0.2)
        mem_start = rss_mib(server.pid)
        httpx.post(
            url + "/v1/completions", json={"model": model, "prompt": "warm", "max_tokens": 2}, timeout=120
        ).raise_for_status()
        mem_loaded = rss_mib(server.pid)

        def load(seconds):
            results, lock = {"done": [], "errors": []}, threading.Lock()
            began = time.monotonic()
            stop_at = began + seconds
            threads = [
                threading.Thread(
                    target=client,
                    args=(url, model, args.max_tokens, stop_at, results, lock, texts[k % len(texts)]),
                )
                for k in range(args.clients)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            return results, time.monotonic() - began

        if args.warmup > 0:
            load(args.warmup)
        results, elapsed = load(args.seconds)
        mem_end, mem_peak = rss_mib(server.pid), rss_mib(server.pid, "VmHWM")
    finally:
        server.terminate()
        server.wait(timeout=30)
        log = Path(log_file.name).read_text()

    done = results["done"]
    ttft = [d[0] for d in done if d[0] is not None]
    tokens = sum(d[1] for d in done)
    cpu = processor_name()
    print(
        f"lab serve load test: {args.clients} streaming clients, {args.seconds:.0f} s, max_tokens "
        f"{args.max_tokens}, --max-batch {args.max_batch}, run {run} "
        f"({'given' if args.run else 'random init'}), "
        f"prompts of {len(set(LENGTHS[: args.clients]))} lengths ({min(LENGTHS)}-{max(LENGTHS)} tokens), "
        f"{'eager (--no-compile)' if args.no_compile else 'compiled'}, after {args.warmup:.0f} s of warm-up"
    )
    print(f"CPU: {cpu}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}")
    print(
        f"errors:              {len(results['errors'])}"
        + (f" (first: {results['errors'][0]})" if results["errors"] else "")
    )
    print(f"completed requests:  {len(done)} in {elapsed:.1f} s")
    print(f"time to first token: p50 {percentile(ttft, 50):.2f} s, p99 {percentile(ttft, 99):.2f} s")
    print(f"aggregate tokens/s:  {tokens / elapsed:.1f} ({tokens} new tokens)")
    print(
        f"server memory (RSS): {mem_start:.0f} MiB at start, {mem_loaded:.0f} MiB with the model loaded, "
        f"{mem_peak:.0f} MiB at the peak, {mem_end:.0f} MiB at the end"
    )
    compiled = [line for line in log.splitlines() if line.startswith("compiled the decoding step")]
    for line in compiled:
        print(f"server: {line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
