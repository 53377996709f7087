"""Serving check: ``vllm serve <sparse24 dir> --quantization sparse24`` answers completions and
chat through the ``openai`` client, N concurrent clients (default 32), streaming, no errors;
reports TTFT and TPOT.

    python benchmarks/serve_check.py --out DIR [--model DIR] [--clients 32] [--max-tokens 64]

With no --model the tiny demo model (vllm_sparse24.demo.build_tiny_sparse24) is built first.
Each client sends one streamed completion and one streamed chat completion (``ignore_eos`` so
every answer has --max-tokens tokens), all clients at once. TTFT = time from sending to the
first content chunk; TPOT = (time of last chunk - time of first) / (completion tokens - 1),
completion tokens from the stream's usage chunk. Writes e2e-serve.json + e2e-serve-server.log
into --out; exits 1 on any error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def start_server(model: Path, port: int, dtype: str, log_path: Path, extra: list[str],
                 use_module: bool = False) -> subprocess.Popen:
    exe = None if use_module else shutil.which("vllm")
    base = [exe, "serve", str(model)] if exe else [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                                                    "--model", str(model)]
    cmd = base + ["--quantization", "sparse24", "--port", str(port), "--host", "127.0.0.1",
                  "--dtype", dtype, "--max-model-len", "512", "--gpu-memory-utilization", "0.3",
                  "--served-model-name", "sparse24-tiny", "--max-num-seqs", "64"] + extra
    print("server: " + " ".join(cmd), flush=True)
    log = open(log_path, "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                            start_new_session=False)


def wait_ready(proc: subprocess.Popen, port: int, timeout: float) -> float:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with rc={proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return time.time() - t0
        except Exception:
            pass
        time.sleep(1)
    raise TimeoutError(f"server not ready after {timeout:.0f}s")


async def one_stream(client, kind: str, i: int, max_tokens: int) -> dict:
    extra = {"ignore_eos": True}
    t0 = time.perf_counter()
    first = last = None
    text, usage = [], None
    if kind == "completion":
        stream = await client.completions.create(
            model="sparse24-tiny", prompt=f"the quick brown fox number {i} jumps over", max_tokens=max_tokens,
            temperature=0.0, stream=True, stream_options={"include_usage": True}, extra_body=extra)
    else:
        stream = await client.chat.completions.create(
            model="sparse24-tiny", messages=[{"role": "user", "content": f"where is paris? ({i})"}],
            max_tokens=max_tokens, temperature=0.0, stream=True, stream_options={"include_usage": True},
            extra_body=extra)
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if not chunk.choices:
            continue
        c = chunk.choices[0]
        piece = c.text if kind == "completion" else (c.delta.content or "")
        if piece:
            now = time.perf_counter()
            first = first or now
            last = now
            text.append(piece)
    n = usage.completion_tokens if usage is not None else len(text)
    if first is None:
        raise RuntimeError(f"{kind} {i}: no content streamed")
    return {"kind": kind, "client": i, "tokens": n, "ttft_s": first - t0,
            "tpot_s": (last - first) / max(n - 1, 1), "latency_s": last - t0, "text": "".join(text)}


def _sse_stream(port: int, kind: str, i: int, max_tokens: int) -> dict:
    """The same request as one_stream with http.client (fallback when ``openai`` cannot import)."""
    import http.client

    body = {"model": "sparse24-tiny", "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}
    if kind == "completion":
        body["prompt"], path = f"the quick brown fox number {i} jumps over", "/v1/completions"
    else:
        body["messages"], path = [{"role": "user", "content": f"where is paris? ({i})"}], "/v1/chat/completions"
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    t0 = time.perf_counter()
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"{kind} {i}: HTTP {resp.status}: {resp.read()[:300]!r}")
    first = last = None
    text, n = [], None
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data:") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[5:])
        if chunk.get("usage"):
            n = chunk["usage"]["completion_tokens"]
        for c in chunk.get("choices") or []:
            piece = c.get("text") if kind == "completion" else (c.get("delta") or {}).get("content")
            if piece:
                now = time.perf_counter()
                first = first or now
                last = now
                text.append(piece)
    conn.close()
    if first is None:
        raise RuntimeError(f"{kind} {i}: no content streamed")
    n = n if n is not None else len(text)
    return {"kind": kind, "client": i, "tokens": n, "ttft_s": first - t0,
            "tpot_s": (last - first) / max(n - 1, 1), "latency_s": last - t0, "text": "".join(text)}


async def run_clients_stdlib(port: int, clients: int, max_tokens: int) -> tuple[list[dict], list[str], float]:
    async def client_task(i: int):
        return [await asyncio.to_thread(_sse_stream, port, kind, i, max_tokens) for kind in ("completion", "chat")]

    t0 = time.perf_counter()
    outs = await asyncio.gather(*(client_task(i) for i in range(clients)), return_exceptions=True)
    wall = time.perf_counter() - t0
    rows = [r for o in outs if not isinstance(o, BaseException) for r in o]
    errors = [f"{type(o).__name__}: {o}" for o in outs if isinstance(o, BaseException)]
    return rows, errors, wall


async def run_clients(port: int, clients: int, max_tokens: int) -> tuple[list[dict], list[str], float]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)

    async def client_task(i: int):
        res = []
        for kind in ("completion", "chat"):
            res.append(await one_stream(client, kind, i, max_tokens))
        return res

    # one non-streamed round trip of each kind first (also checks the non-streaming path)
    c = await client.completions.create(model="sparse24-tiny", prompt="the capital of france is", max_tokens=8,
                                        temperature=0.0)
    ch = await client.chat.completions.create(model="sparse24-tiny", max_tokens=8, temperature=0.0,
                                              messages=[{"role": "user", "content": "hello"}])
    print(f"non-streamed completion: {c.choices[0].text!r}; chat: {ch.choices[0].message.content!r}", flush=True)
    t0 = time.perf_counter()
    outs = await asyncio.gather(*(client_task(i) for i in range(clients)), return_exceptions=True)
    wall = time.perf_counter() - t0
    rows, errors = [], []
    for o in outs:
        if isinstance(o, BaseException):
            errors.append(f"{type(o).__name__}: {o}")
        else:
            rows += o
    await client.close()
    return rows, errors, wall


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--port", type=int, default=8011)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--ready-timeout", type=float, default=300)
    ap.add_argument("--client", choices=("auto", "stdlib"), default="auto",
                    help="auto: the openai client, or http.client if openai does not import")
    ap.add_argument("--module", action="store_true",
                    help="python -m vllm.entrypoints.openai.api_server instead of `vllm serve`")
    ap.add_argument("server_args", nargs=argparse.REMAINDER, help="after --: extra server arguments")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    from vllm_sparse24.demo import model_or_tiny

    model = model_or_tiny(args.model, prefix="s24serve-")
    extra = [a for a in args.server_args if a != "--"]
    proc = start_server(model, args.port, args.dtype, out / "e2e-serve-server.log", extra, args.module)
    result: dict = {"model": str(model), "clients": args.clients, "max_tokens": args.max_tokens,
                    "dtype": args.dtype, "server_cmd": proc.args}
    try:
        result["ready_s"] = round(wait_ready(proc, args.port, args.ready_timeout), 1)
        print(f"server ready in {result['ready_s']}s", flush=True)
        try:
            if args.client == "stdlib":
                raise ImportError("--client stdlib")
            import openai

            result["client"] = f"openai {openai.__version__}"
            runner = run_clients
        except ImportError as e:  # e.g. an offline install whose openai lacks its httpcore2 / jiter dependencies
            result["client"] = f"stdlib http.client (openai import failed: {e})"
            runner = run_clients_stdlib
        print(f"client: {result['client']}", flush=True)
        rows, errors, wall = asyncio.run(runner(args.port, args.clients, args.max_tokens))
    except Exception as e:
        rows, errors, wall = [], [f"{type(e).__name__}: {e}"], 0.0
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    for kind in ("completion", "chat"):
        rs = [r for r in rows if r["kind"] == kind]
        if rs:
            ttft = [r["ttft_s"] * 1e3 for r in rs]
            tpot = [r["tpot_s"] * 1e3 for r in rs]
            result[kind] = {"requests": len(rs), "tokens": sum(r["tokens"] for r in rs),
                            "ttft_ms": {"mean": statistics.mean(ttft), "p50": pct(ttft, 0.5), "p90": pct(ttft, 0.9),
                                        "max": max(ttft)},
                            "tpot_ms": {"mean": statistics.mean(tpot), "p50": pct(tpot, 0.5), "p90": pct(tpot, 0.9),
                                        "max": max(tpot)},
                            "sample": rs[0]["text"][:120]}
    expected = 2 * args.clients
    short = [r for r in rows if r["tokens"] != args.max_tokens]
    result.update({"wall_s": round(wall, 2), "responses": len(rows), "expected": expected, "errors": errors,
                   "short_responses": len(short),
                   "passed": not errors and len(rows) == expected and not short})
    (out / "e2e-serve.json").write_text(json.dumps(result, indent=2, default=str))
    print("SERVE " + ("PASS" if result["passed"] else "FAIL") + f": {len(rows)}/{expected} streamed responses, "
          f"{len(errors)} errors, wall {wall:.1f}s", flush=True)
    for kind in ("completion", "chat"):
        if kind in result:
            r = result[kind]
            print(f"  {kind}: TTFT mean {r['ttft_ms']['mean']:.1f} ms p50 {r['ttft_ms']['p50']:.1f} p90 "
                  f"{r['ttft_ms']['p90']:.1f}; TPOT mean {r['tpot_ms']['mean']:.2f} ms p50 {r['tpot_ms']['p50']:.2f} "
                  f"p90 {r['tpot_ms']['p90']:.2f}; sample {r['sample']!r}", flush=True)
    for e in errors[:5]:
        print("  error: " + e, flush=True)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
