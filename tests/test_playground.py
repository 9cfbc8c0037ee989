"""The playground page: served files and /info over HTTP, then end to end in headless Chromium
(the system's package, driven by Playwright; no browser is downloaded) against a live server on
SmolLM2. Screenshots of each tab are saved under build/test-artifacts (or $JAXEMBED_TEST_ARTIFACTS).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from litestar.testing import TestClient

from jaxembed import Engine
from jaxembed.server import create_app

from live import serve_in_thread

ARTIFACTS = Path(os.environ.get("JAXEMBED_TEST_ARTIFACTS")
                 or Path(__file__).resolve().parents[1] / "build" / "test-artifacts")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# As the machine's own network is closed, Chromium's background services are turned off: they
# would only fail to connect.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-dev-shm-usage"]
KEY = "playground-secret"
TEXTS = ["The cat sits on the mat.", "A kitten is resting on a rug.",
         "Interest rates rose again this quarter."]


# ---- served files and /info, without a browser ---------------------------------------------

@pytest.fixture(scope="module")
def client(smollm2_engine: Engine) -> Iterator[TestClient]:
    with TestClient(app=create_app(smollm2_engine)) as c:
        yield c


@pytest.mark.parametrize("path", ["/", "/playground"])
def test_the_page_is_served_with_a_strict_policy(client: TestClient, path: str) -> None:
    r = client.get(path)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert '<script src="/playground/playground.js"' in r.text
    # Self-contained: nothing is fetched from another origin.
    assert "http://" not in r.text and "https://" not in r.text


def test_assets_are_served_by_name_only(client: TestClient) -> None:
    js = client.get("/playground/playground.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert "fetch(" in js.text and "http://" not in js.text and "https://" not in js.text
    assert client.get("/playground/playground.css").headers["content-type"].startswith("text/css")
    for bad in ["/playground/app.py", "/playground/..%2Fapp.py", "/playground/index.html"]:
        r = client.get(bad)
        assert r.status_code == 404 and r.json()["error"]["type"], bad


def test_info_describes_the_served_model(client: TestClient, smollm2_engine: Engine) -> None:
    info = client.get("/info").json()
    assert info["model"] == smollm2_engine.model_name
    assert info["family"] == "llama" and info["format"] == "gguf" and info["dtype"] == "float32"
    assert info["max_model_len"] == smollm2_engine.max_model_len
    assert info["attention"] == "causal"
    assert info["embeddings"] == {"embedding_size": 576, "embedding_type": "mean",
                                  "normalize": False, "dimensions": [], "prompts": []}
    # SmolLM2-135M's template renders no tools.
    assert info["generation"] == {"chat_template": True,
                                  "max_num_seqs": smollm2_engine.max_num_seqs,
                                  "tool_calls": None}
    # The Q4_1 file's matrices stay in their blocks by default.
    assert "Q4_1" in info["quantized"]
    assert info["quantized"] == list(smollm2_engine.checkpoint.quantized)


def test_info_says_when_no_weight_is_quantized(smollm2_reference_engine: Engine) -> None:
    with TestClient(create_app(smollm2_reference_engine, playground=False)) as c:
        assert c.get("/info").json()["quantized"] == []


def test_info_follows_the_server_defaults(smollm2_engine: Engine) -> None:
    from jaxembed.protocol import EmbeddingDefaults, EmbeddingType

    saved = smollm2_engine.embedding.defaults
    smollm2_engine.embedding.defaults = EmbeddingDefaults(embedding_type=EmbeddingType.Last, normalize=True)
    try:
        with TestClient(app=create_app(smollm2_engine)) as c:
            emb = c.get("/info").json()["embeddings"]
    finally:
        smollm2_engine.embedding.defaults = saved
    assert (emb["embedding_type"], emb["normalize"]) == ("last", True)


def test_the_page_is_public_but_the_api_is_not(smollm2_engine: Engine) -> None:
    with TestClient(app=create_app(smollm2_engine, api_key=KEY)) as c:
        assert c.get("/").status_code == 200
        assert c.get("/playground/playground.js").status_code == 200
        assert c.get("/info").status_code == 401
        assert c.get("/info", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_no_playground_turns_the_page_off(smollm2_engine: Engine) -> None:
    with TestClient(app=create_app(smollm2_engine, playground=False)) as c:
        for path in ["/", "/playground", "/playground/playground.js"]:
            assert c.get(path).status_code == 404, path
        assert c.get("/info").status_code == 200  # the API stays


def test_cli_no_playground_reaches_the_app(monkeypatch: pytest.MonkeyPatch,
                                           smollm2_path: Path) -> None:
    import uvicorn

    import jaxembed.server
    from jaxembed.cli import main

    seen: dict[str, Any] = {}

    def fake_create_app(source: Any, **kwargs: Any) -> object:
        seen.update(kwargs)
        return object()

    monkeypatch.setattr(jaxembed.server, "create_app", fake_create_app)
    monkeypatch.setattr(uvicorn.Server, "run", lambda self: None)
    for argv, expected in [([], True), (["--no-playground"], False)]:
        assert main(["serve", "--model", str(smollm2_path), *argv]) == 0
        assert seen["playground"] is expected


# ---- in the browser -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if CHROMIUM is None:
        message = "no Chromium on this machine: install Debian's 'chromium' package (make test does)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                              chromium_sandbox=False)
        yield b
        b.close()


@pytest.fixture(scope="module")
def root(smollm2_engine: Engine) -> Iterator[str]:
    with serve_in_thread(create_app(smollm2_engine)) as api:
        yield api.removesuffix("/v1")


@pytest.fixture(scope="module")
def keyed_root(smollm2_engine: Engine) -> Iterator[str]:
    with serve_in_thread(create_app(smollm2_engine, api_key=KEY)) as api:
        yield api.removesuffix("/v1")


class Console:
    """What the page wrote to the console as errors, and the script errors it raised."""

    def __init__(self, page: Any) -> None:
        self.errors: list[str] = []
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))

    def assert_clean(self, allowed_status: int | None = None) -> None:
        # Chromium logs each 4xx response as a console error; a test that sends bad input on
        # purpose allows exactly that status, and nothing else.
        rest = [e for e in self.errors if allowed_status is None
                or f"status of {allowed_status}" not in e]
        assert not rest, rest


@pytest.fixture
def page(browser: Any) -> Iterator[tuple[Any, Console]]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    p = context.new_page()
    p.set_default_timeout(60_000)
    console = Console(p)
    yield p, console
    context.close()


def open_page(p: Any, url: str) -> None:
    p.goto(url)
    p.wait_for_function("() => document.getElementById('model-name').textContent.length > 0")


def screenshot(p: Any, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    p.screenshot(path=str(ARTIFACTS / f"playground-{name}.png"), full_page=True)


def cosines(vectors: list[list[float]]) -> np.ndarray:
    v = np.asarray(vectors, np.float64)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v @ v.T


def heatmap(p: Any, n: int) -> np.ndarray:
    p.wait_for_function(f"() => document.querySelectorAll('#heatmap td[data-value]').length === {n * n}")
    values = p.eval_on_selector_all("#heatmap td", "tds => tds.map(td => Number(td.dataset.value))")
    return np.array(values).reshape(n, n)


def curl_body(p: Any) -> dict:
    """The JSON body of the page's curl command, read back as a shell would."""
    words = shlex.split(p.text_content("#curl").replace("\\\n", " "))
    return json.loads(words[words.index("-d") + 1])


def test_page_loads_without_console_errors(page: tuple[Any, Console], root: str,
                                           smollm2_engine: Engine) -> None:
    p, console = page
    open_page(p, root + "/")
    assert p.text_content("#model-name") == smollm2_engine.model_name
    # The live figures come from /metrics, polled every 2 s; the second scrape gives a rate.
    p.wait_for_function("() => document.getElementById('live-rate').textContent.includes('tok/s')",
                        timeout=15_000)
    p.click("#tab-info")
    info = p.text_content("#info")
    assert "llama" in info and f"{smollm2_engine.max_model_len} tokens" in info
    assert "queue depth" in p.text_content("#live-info")
    screenshot(p, "info")
    console.assert_clean()


def test_heatmap_equals_the_embeddings_route(page: tuple[Any, Console], root: str) -> None:
    p, console = page
    open_page(p, root + "/playground")
    p.fill("#texts", "\n".join(TEXTS))
    p.click("#embed-run")
    shown = heatmap(p, 3)
    r = httpx.post(root + "/v1/embeddings", json={"input": TEXTS, "model": "default"})
    expected = cosines([d["embedding"] for d in r.json()["data"]])
    np.testing.assert_allclose(shown, expected, atol=1e-6)
    assert shown[0, 2] < 0.9999  # distinct texts: the comparison above has something to check
    # Nearest neighbours of the first text, most similar first.
    order = [int(i) for i in p.eval_on_selector_all("#neighbours li",
                                                    "lis => lis.map(li => li.dataset.index)")]
    assert order == [int(j) for j in np.argsort(-expected[0]) if j != 0]
    p.click("#heatmap tbody tr:nth-child(3) th")
    assert p.text_content("#nn-of") == TEXTS[2]
    screenshot(p, "embeddings")

    # The controls reach the request, and the curl command sends exactly that request.
    p.select_option("#pooling", "last")
    p.select_option("#normalize", "true")
    p.fill("#dimensions", "64")
    p.click("#embed-run")
    p.wait_for_function("() => document.getElementById('embed-summary').textContent"
                        ".startsWith('3 vectors of 64 values')")
    body = curl_body(p)
    assert body == {"model": "default", "input": TEXTS, "encoding_format": "float",
                    "embedding_type": "last", "normalize": True, "dimensions": 64}
    data = httpx.post(root + "/v1/embeddings", json=body).json()["data"]
    assert len(data[0]["embedding"]) == 64
    np.testing.assert_allclose(heatmap(p, 3), cosines([d["embedding"] for d in data]), atol=1e-6)
    assert not np.allclose(cosines([d["embedding"] for d in data]), expected, atol=1e-3)
    console.assert_clean()


def test_the_rerank_tab_equals_the_rerank_route(page: tuple[Any, Console], root: str) -> None:
    p, console = page
    open_page(p, root + "/")
    p.click("#tab-rerank")
    assert "cosine" in p.text_content("#rerank-mode")  # SmolLM2 has no classifier
    docs = ["The cat sleeps on a warm mat.", "Stocks fell.", "Kittens nap all day."]
    p.fill("#query", "Where does the cat sleep?")
    p.fill("#documents", "\n".join(docs))
    p.fill("#top-n", "2")
    p.click("#rerank-run")
    p.wait_for_function("() => document.querySelectorAll('#ranking li').length === 2")
    shown = p.eval_on_selector_all(
        "#ranking li", "lis => lis.map(li => [Number(li.dataset.index), Number(li.dataset.score)])")
    r = httpx.post(root + "/v1/rerank", json={"query": "Where does the cat sleep?",
                                              "documents": docs, "top_n": 2}).json()
    assert [i for i, _ in shown] == [x["index"] for x in r["results"]]
    np.testing.assert_allclose([s for _, s in shown],
                               [x["relevance_score"] for x in r["results"]], atol=1e-6)
    widths = p.eval_on_selector_all("#ranking .bar", "bars => bars.map(b => b.style.width)")
    assert widths[0] == "100%"  # the best fills its bar
    screenshot(p, "rerank")
    console.assert_clean()


def test_invalid_input_shows_the_servers_message(page: tuple[Any, Console], root: str) -> None:
    p, console = page
    open_page(p, root + "/")
    p.fill("#texts", "hello")
    p.fill("#dimensions", "100000")
    p.click("#embed-run")
    p.wait_for_selector("#embed-error:not([hidden])")
    r = httpx.post(root + "/v1/embeddings", json=curl_body(p))
    assert r.status_code == 400
    error = r.json()["error"]
    assert p.text_content("#embed-error") == f"{error['message']} (parameter: {error['param']})"
    assert p.is_hidden("#embed-result")

    p.click("#tab-chat")
    p.fill("#temperature", "-1")
    p.fill("#chat-input", "hi")
    p.click("#chat-send")
    p.wait_for_selector("#chat-error:not([hidden])")
    assert "temperature" in p.text_content("#chat-error")
    assert p.locator(".message").count() == 0  # a refused message is not added to the chat
    console.assert_clean(allowed_status=400)


def test_chat_streams_a_reply(page: tuple[Any, Console], root: str,
                              smollm2_engine: Engine) -> None:
    p, console = page
    open_page(p, root + "/")
    p.click("#tab-chat")
    p.fill("#temperature", "0")
    p.fill("#max-tokens", "24")
    # Record the reply's length at each change of the page, to see it arrive in pieces.
    p.evaluate("""() => {
        window.replyLengths = [];
        new MutationObserver(() => {
            const reply = document.querySelector('.message.assistant');
            if (reply) window.replyLengths.push(reply.textContent.length);
        }).observe(document.getElementById('conversation'),
                   {subtree: true, childList: true, characterData: true});
    }""")
    question = "What is the capital of France?"
    p.fill("#chat-input", question)
    p.press("#chat-input", "Enter")
    p.wait_for_selector(".message.assistant[data-done]", timeout=180_000)
    reply = p.text_content(".message.assistant")
    expected = smollm2_engine.chat([{"role": "user", "content": question}], max_tokens=24,
                                   temperature=0)
    assert reply == expected.text and reply
    lengths = sorted(set(p.evaluate("window.replyLengths")) - {0})
    assert len(lengths) >= 3, lengths  # streamed, not delivered at once
    assert p.text_content(".message.user") == question
    stats = p.text_content("#chat-stats")
    assert f"{expected.completion_tokens} tokens" in stats and "tokens/s" in stats
    screenshot(p, "chat")
    console.assert_clean()


def test_stop_ends_the_generation(page: tuple[Any, Console], root: str,
                                  smollm2_engine: Engine) -> None:
    p, console = page
    open_page(p, root + "/")
    p.click("#tab-chat")
    p.fill("#max-tokens", "1000")
    p.fill("#chat-input", "Write a long story about a lighthouse keeper.")
    before = smollm2_engine.stats_snapshot().generated_tokens
    p.click("#chat-send")
    p.wait_for_function("() => (document.querySelector('.message.assistant') || {}).textContent")
    p.evaluate("document.getElementById('chat-stop').click()")  # even if it has just ended
    p.wait_for_selector(".message.assistant[data-done]")
    assert p.is_enabled("#chat-send") and p.is_disabled("#chat-stop")
    # The closed connection stops the generation and frees its slot.
    for _ in range(300):
        if smollm2_engine.running_sequences == 0:
            break
        p.wait_for_timeout(100)
    assert smollm2_engine.running_sequences == 0
    assert 0 < smollm2_engine.stats_snapshot().generated_tokens - before < 1000
    assert p.is_hidden("#chat-error")
    console.assert_clean()


def test_api_key_is_asked_for_and_kept_in_the_tab(page: tuple[Any, Console],
                                                  keyed_root: str) -> None:
    p, _ = page
    p.goto(keyed_root + "/")
    p.wait_for_selector("#auth:not([hidden])")
    p.fill("#api-key", "wrong")
    p.click("#auth button")
    p.wait_for_selector("#auth-error:not([hidden])")
    assert "not valid" in p.text_content("#auth-error")
    p.fill("#api-key", KEY)
    p.click("#auth button")
    p.wait_for_selector("#auth", state="hidden")
    assert p.text_content("#model-name")
    p.fill("#texts", "\n".join(TEXTS[:2]))
    p.click("#embed-run")
    assert heatmap(p, 2).shape == (2, 2)
    assert p.evaluate("sessionStorage.getItem('jaxembed-api-key')") == KEY
    assert p.evaluate("localStorage.length") == 0
    assert KEY not in p.text_content("#curl")  # the command reads the key from the environment
    assert "$JAXEMBED_API_KEY" in p.text_content("#curl")


def test_the_page_waits_for_a_loading_model(page: tuple[Any, Console],
                                            tiny_llama_dir: Path) -> None:
    import threading

    from jaxembed import EngineBuilder

    gate = threading.Event()

    class GatedBuilder(EngineBuilder):
        def build(self) -> Engine:
            gate.wait(60)
            return super().build()

    builder = GatedBuilder(model=tiny_llama_dir, warmup=False, progress=False,
                           compilation_cache=False)
    p, console = page
    app = create_app(builder)
    with serve_in_thread(app) as api:
        p.goto(api.removesuffix("/v1") + "/")
        p.wait_for_selector("#status:not([hidden])")
        assert "still loading" in p.text_content("#status")
        gate.set()
        p.wait_for_function("() => document.getElementById('model-name').textContent.length > 0")
        assert p.is_hidden("#status")
        assert p.text_content("#model-name") == tiny_llama_dir.name

        # This model has no chat template: the chat tab sends plain completions instead.
        p.click("#tab-chat")
        assert "no chat template" in p.text_content("#chat-mode")
        p.fill("#temperature", "0")
        p.fill("#max-tokens", "6")
        p.fill("#chat-input", "hello world")
        p.click("#chat-send")
        p.wait_for_selector(".message.assistant[data-done]")
        engine = app.state.engine_host.engine
        expected = engine.generate("hello world", max_tokens=6, temperature=0).text
        assert p.text_content(".message.assistant") == expected and expected
    console.assert_clean(allowed_status=503)
