"""The OpenAI-compatible server on a sparse24 checkpoint (auto-detected, no --quantization),
started as a newcomer does: ``vllm-sparse24 demo`` in an empty folder builds the demo model and
serves it."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytestmark = pytest.mark.engine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = _free_port()
    work = tmp_path_factory.mktemp("server")
    log = work / "server.log"
    console = shutil.which("vllm-sparse24", path=str(Path(sys.executable).parent))
    assert console, f"no vllm-sparse24 script beside {sys.executable}: install the package (pip install -e .)"
    env = dict(os.environ, VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1", HF_HUB_OFFLINE="1")
    # extra arguments go to vLLM's server; on CPU the demo adds --dtype float32 itself
    cmd = [console, "demo", "--port", str(port), "--served-model-name", "tiny", "--max-model-len", "512"]
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=work)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited ({proc.returncode}):\n{log.read_text()[-5000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(2)
    else:
        proc.kill()
        raise AssertionError(f"server not healthy in 600 s:\n{log.read_text()[-5000:]}")
    yield url, log
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture()
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server[0] + "/v1", api_key="none", timeout=120, max_retries=0)


def test_server_uses_sparse24(server):
    text = server[1].read_text()
    assert "building the tiny demo model in models/tiny-sparse24" in text
    assert "quantization=sparse24" in text and "dtype=torch.float32" in text
    assert (server[1].parent / "models" / "tiny-sparse24" / "config.json").exists()


def test_completion(client):
    r = client.completions.create(model="tiny", prompt="the quick brown fox", max_tokens=8, temperature=0)
    assert r.choices[0].text and r.usage.completion_tokens == 8


def test_chat_completion(client):
    r = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "the capital of france"}], max_tokens=6, temperature=0
    )
    assert r.choices[0].message.content is not None and r.usage.completion_tokens == 6


def test_streaming(client):
    chunks = list(client.completions.create(model="tiny", prompt="the lazy dog", max_tokens=8, stream=True, temperature=0))
    assert len(chunks) >= 2
    assert "".join(c.choices[0].text for c in chunks if c.choices)


def test_16_concurrent_requests(client):
    def one(i: int) -> int:
        r = client.completions.create(model="tiny", prompt=f"the city {i}", max_tokens=4 + i % 5, temperature=0.8, seed=i)
        return r.usage.completion_tokens

    with ThreadPoolExecutor(16) as pool:
        tokens = list(pool.map(one, range(16)))
    assert tokens == [4 + i % 5 for i in range(16)]
