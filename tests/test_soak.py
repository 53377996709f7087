"""The OpenAI server under abuse (benchmarks/soak.py, short CI version, 127.0.0.1 only): 64
streaming clients for 30 s, a third of them closing the connection mid-stream, then a
burst of 256 requests against 16 running sequences. Every request that was not cancelled
completes in full, the server goes idle (cancelled requests aborted), answers the same
greedy text as before, and its RSS comes back within the tolerance soak.py documents."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import soak  # noqa: E402
import summary_lines  # noqa: E402

pytestmark = [pytest.mark.engine, pytest.mark.timeout(900)]


def test_soak_and_burst(tiny, tmp_path):
    args = soak.parse_args(["--model", str(tiny.sparse24_dir), "--out", str(tmp_path), "--tag", "ci",
                            "--duration", "30", "--warmup", "10", "--clients", "64", "--burst", "256",
                            "--max-num-seqs", "16", "--request-timeout", "120",
                            "--server-log", str(tmp_path / "server.log")])
    res = soak.run(args)
    s, b = res.get("soak", {}), res.get("burst", {})
    rss = {k: res.get(f"rss_mib_{k}", {}).get("total") for k in ("after_start", "baseline", "after_soak", "after_burst")}
    summary_lines.LINES.append(
        f"soak: {s.get('requests')} streamed requests by 64 clients in {s.get('wall_s')} s: {s.get('outcomes')}; "
        f"burst: {b.get('requests')} requests in {b.get('wall_s')} s: {b.get('outcomes')}; "
        f"server RSS MiB {rss}; {'PASS' if res['passed'] else 'FAIL'}")
    log = (tmp_path / "server.log").read_text()[-3000:] if (tmp_path / "server.log").exists() else ""
    assert res["passed"], f"{res['failures']}\n{log}"
    assert s["outcomes"]["cancelled"] >= 64 // 3 and s["outcomes"]["completed"] >= 64
