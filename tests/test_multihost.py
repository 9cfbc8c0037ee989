"""Two processes joined by jax.distributed on loopback (CPU collectives over gloo) serve one model
sharded over both: `jaxembed serve --coordinator ... --num-processes 2 --process-id I
--tensor-parallel 2`. Process 0 answers HTTP and sends each step to process 1, which runs the
same step; the embeddings and greedy completions equal one process's on one device."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import families as F
import httpx
import numpy as np
import pytest

from jaxembed import EngineBuilder

TEXTS = ["the quick brown fox", "jumps over the lazy dog and runs far away"]
PROMPT = "hello world"
NEW_TOKENS = 8
BOUND = "[a-c]{3}-[0-9]{2}"  # what the constrained completions must be
TIE_GAP = 1e-3  # as in test_generation_parity.py


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, procs: list[subprocess.Popen], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            assert p.poll() is None, f"a process exited early with {p.returncode}"
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError("the multi-host server never became ready")


def completion(client: httpx.Client, url: str) -> dict:
    r = client.post(url + "/v1/completions", json={
        "prompt": PROMPT, "max_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True,
        "logprobs": 2})
    r.raise_for_status()
    return r.json()["choices"][0]


@pytest.mark.slow
def test_two_processes_serve_one_sharded_model(tmp_path: Path):
    folder = F.build_family("llama", tmp_path / "llama")
    coordinator, http = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device each
    env.update(JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    common = [sys.executable, "-m", "jaxembed.cli", "serve", "--model", str(folder),
              "--dtype", "float32", "--max-model-len", "64", "--max-num-seqs", "2",
              "--tensor-parallel", "2", "--coordinator", f"127.0.0.1:{coordinator}",
              "--num-processes", "2", "--port", str(http), "--log-level", "warning"]
    logs = [open(tmp_path / f"process{i}.log", "w") for i in range(2)]  # noqa: SIM115
    procs = [subprocess.Popen([*common, "--process-id", str(i)], env=env, stdout=logs[i],
                              stderr=subprocess.STDOUT) for i in range(2)]
    url = f"http://127.0.0.1:{http}"
    try:
        wait_ready(url, procs)
        with httpx.Client(timeout=120) as client:
            r = client.post(url + "/v1/embeddings", json={"input": TEXTS})
            r.raise_for_status()
            ours = np.asarray([d["embedding"] for d in r.json()["data"]], np.float32)
            choice = completion(client, url)
            # Under a grammar: the leader sends each decode step whole, its masks in its rows.
            bound = [client.post(url + "/v1/completions", json={
                "prompt": PROMPT, "max_tokens": 12, "temperature": 1.0, "seed": seed,
                "guided_regex": BOUND}).json() for seed in range(2)]
            again = client.post(url + "/v1/embeddings", json={"input": TEXTS[:1]}).json()
        procs[0].send_signal(signal.SIGTERM)  # process 0 drains, then tells process 1 to stop
        codes = [p.wait(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for f in logs:
            f.close()
    log0 = (tmp_path / "process0.log").read_text()
    for r in bound:
        assert re.fullmatch(BOUND, r["choices"][0]["text"]), r
    assert codes == [0, 0], (codes, log0[-3000:], (tmp_path / "process1.log").read_text()[-3000:])
    assert "1 replica(s) of 2 device(s)" in log0, log0[-3000:]

    ref = EngineBuilder(model=folder, dtype="float32", max_model_len=64, max_num_seqs=2,
                        warmup=False, progress=False, compilation_cache=False).build()
    try:
        want = ref.encode(TEXTS)
        assert np.abs(ours - want).max() <= 1e-5 * np.abs(want).max()
        assert np.allclose(again["data"][0]["embedding"], want[0], atol=1e-5 * np.abs(want).max())
        result = ref.generate(PROMPT, max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True,
                              logprobs=2)
    finally:
        ref.shutdown()
    ref_choice = result.choices[0]
    got = choice["logprobs"]["tokens"]
    want_tokens = [ref.tokenizer.decode([t], skip_special_tokens=False)
                   for t in ref_choice.token_ids]
    for step, (a, b) in enumerate(zip(got, want_tokens, strict=True)):
        if a != b:  # only at a near tie of the single-process logits, and then the rest differs
            top = ref_choice.logprobs[step].top
            assert top[0][1] - top[1][1] < TIE_GAP, (step, got, want_tokens)
            break
