"""Embedding models served as sentence-transformers would run them, checked against it.

Each test model is a tiny random decoder (tests/families.py) wrapped as a sentence-transformers
folder written here: its pooling, Dense layers (re-initialized, biases included), Normalize, and
prompts. Our vectors must match `sentence_transformers.SentenceTransformer` on the same folder for
single inputs and mixed-length batches, with and without prompts, and cut to several sizes; each
module also has a negative control, so a dropped one fails.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import families as F
import numpy as np
import pytest
from litestar.testing import TestClient
from safetensors.numpy import save_file

from jaxembed import EmbeddingRequest, Engine, EngineBuilder, InvalidRequestError
from jaxembed.protocol import EmbeddingDefaults, EmbeddingType
from jaxembed.scheduler import Buckets, plan_step
from jaxembed.server import create_app
from jaxembed.st_config import read_sentence_transformers

from parity import cosine

COSINE_MIN = 0.9999
TEXTS = [
    "hello world",
    "The quick brown fox jumps over the lazy dog. " * 4,
    "a",
    "def add(a, b):\n    return a + b\n",
    "Naïve café résumé — déjà vu. 日本語 🙂🚀",
    "Numbers like 3.14159 and 2048 appear in text too. " * 2,
]
QWEN_QUERY_TASK = "Given a web search query, retrieve relevant passages that answer the query"
QWEN_PROMPTS = {"query": f"Instruct: {QWEN_QUERY_TASK}\nQuery:", "document": ""}
GEMMA_PROMPTS = {"query": "task: search result | query: ", "document": "title: none | text: "}
GEMMA_MATRYOSHKA = [16, 32, 48]
EOS = "<|endoftext|>"

ACT = {"identity": "torch.nn.modules.linear.Identity", "tanh": "torch.nn.modules.activation.Tanh",
       "gelu": "torch.nn.modules.activation.GELU"}


# ---- building sentence-transformers folders --------------------------------------------------


def _write(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))


def append_eos(folder: Path) -> None:
    """Make the tokenizer's post-processor append EOS, as Qwen3-Embedding's does."""
    path = folder / "tokenizer.json"
    tok = json.loads(path.read_text())
    eos_id = next(a["id"] for a in tok["added_tokens"] if a["content"] == EOS)
    tok["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"Sequence": {"id": "A", "type_id": 0}},
                   {"SpecialToken": {"id": EOS, "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}},
                 {"SpecialToken": {"id": EOS, "type_id": 1}}],
        "special_tokens": {EOS: {"id": EOS, "ids": [eos_id], "tokens": [EOS]}},
    }
    path.write_text(json.dumps(tok))


def make_sentence_transformer(folder: Path, *, pooling: dict[str, Any],
                              dense: list[tuple[int, int, str]] = (), normalize: bool = True,
                              prompts: dict[str, str] | None = None,
                              default_prompt_name: str | None = None, seed: int = 0) -> Path:
    """Wrap the decoder saved in `folder` as a sentence-transformers model.

    dense: (in, out, activation) per Dense module, with fresh non-zero weights and biases.
    """
    rng = np.random.default_rng(seed)
    # The tokenizer as transformers loads it: exactly tokenizer.json, EOS also the padding.
    _write(folder / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "pad_token": EOS,
        "model_max_length": 256})
    _write(folder / "sentence_bert_config.json", {"max_seq_length": 256, "do_lower_case": False})
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling",
                "type": "sentence_transformers.models.Pooling"}]
    _write(folder / "1_Pooling" / "config.json", pooling)
    for n_in, n_out, act in dense:
        idx = len(modules)
        sub = f"{idx}_Dense"
        modules.append({"idx": idx, "name": str(idx), "path": sub,
                        "type": "sentence_transformers.models.Dense"})
        _write(folder / sub / "config.json", {"in_features": n_in, "out_features": n_out,
                                              "bias": True, "activation_function": ACT[act]})
        save_file({"linear.weight": (rng.standard_normal((n_out, n_in)) / np.sqrt(n_in)
                                     ).astype(np.float32),
                   "linear.bias": (0.3 * rng.standard_normal(n_out)).astype(np.float32)},
                  str(folder / sub / "model.safetensors"))
    if normalize:
        idx = len(modules)
        modules.append({"idx": idx, "name": str(idx), "path": f"{idx}_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
        (folder / f"{idx}_Normalize").mkdir(exist_ok=True)
    _write(folder / "modules.json", modules)
    _write(folder / "config_sentence_transformers.json", {
        "prompts": prompts or {}, "default_prompt_name": default_prompt_name,
        "similarity_fn_name": "cosine", "model_type": "SentenceTransformer"})
    return folder


def qwen3_embedding(folder: Path) -> Path:
    """Qwen3-Embedding's recipe: last token (EOS appended), normalized, an instructed query
    prompt. The pooling is written with the older per-mode flags."""
    F.build_family("qwen3", folder, seed=3)
    append_eos(folder)
    return make_sentence_transformer(
        folder, pooling={"word_embedding_dimension": 64, "pooling_mode_cls_token": False,
                         "pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": False,
                         "pooling_mode_mean_sqrt_len_tokens": False,
                         "pooling_mode_lasttoken": True, "include_prompt": True},
        prompts=QWEN_PROMPTS)


def embedding_gemma(folder: Path) -> Path:
    """EmbeddingGemma's recipe: a bidirectional Gemma 3, mean pooling, two Dense layers and
    Normalize, task prompts (left out of the mean here), declared Matryoshka sizes."""
    F.build_family("gemma3", folder, seed=4, use_bidirectional_attention=True)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["matryoshka_dimensions"] = GEMMA_MATRYOSHKA
    _write(folder / "config.json", cfg)
    return make_sentence_transformer(
        folder, pooling={"embedding_dimension": 64, "pooling_mode": "mean",
                         "include_prompt": False},
        dense=[(64, 96, "identity"), (96, 64, "tanh")], prompts=GEMMA_PROMPTS, seed=5)


def build_engine(folder: Path, **kwargs: Any) -> Engine:
    return EngineBuilder(model=folder, dtype="float32", max_batch_tokens=512, warmup=False,
                         progress=False, compilation_cache=False, **kwargs).build()


def reference(folder: Path) -> Any:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(folder), device="cpu")


def assert_same(ours: np.ndarray, ref: np.ndarray) -> None:
    """Same direction (cosine) and same length: a dropped Normalize changes the length."""
    ours, ref = np.atleast_2d(ours), np.atleast_2d(ref)
    assert ours.shape == ref.shape
    cos = cosine(ours, ref)
    assert cos.min() > COSINE_MIN, f"cosine {cos.min():.6f} <= {COSINE_MIN}"
    np.testing.assert_allclose(np.linalg.norm(ours, axis=-1), np.linalg.norm(ref, axis=-1),
                               rtol=1e-3)


def differs(ours: np.ndarray, ref: np.ndarray) -> bool:
    ours, ref = np.atleast_2d(ours), np.atleast_2d(ref)
    if ours.shape != ref.shape:
        return True
    lengths = np.abs(np.linalg.norm(ours, axis=-1) / np.linalg.norm(ref, axis=-1) - 1)
    return bool(cosine(ours, ref).min() < COSINE_MIN or lengths.max() > 1e-2)


def st_encode(model: Any, texts: list[str] | str, **kwargs: Any) -> np.ndarray:
    batch = [texts] if isinstance(texts, str) else texts
    out = model.encode(batch, batch_size=len(batch), convert_to_numpy=True, **kwargs)
    return out[0] if isinstance(texts, str) else out


# ---- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return qwen3_embedding(tmp_path_factory.mktemp("st") / "qwen3-embedding")


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return embedding_gemma(tmp_path_factory.mktemp("st") / "embedding-gemma")


@pytest.fixture(scope="module")
def qwen(qwen_dir: Path) -> Iterator[tuple[Engine, Any]]:
    engine = build_engine(qwen_dir)
    yield engine, reference(qwen_dir)
    engine.shutdown()


@pytest.fixture(scope="module")
def gemma(gemma_dir: Path) -> Iterator[tuple[Engine, Any]]:
    engine = build_engine(gemma_dir)
    yield engine, reference(gemma_dir)
    engine.shutdown()


# ---- configuration -----------------------------------------------------------------------------


def test_configuration_is_read_from_the_folder(qwen, gemma, tiny_engine):
    q, _ = qwen
    g, _ = gemma
    assert q.embedding.model_defaults == EmbeddingDefaults(embedding_type=EmbeddingType.Last,
                                                 normalize=True)
    assert q.embedding.prompts == QWEN_PROMPTS and q.is_causal and q.embedding_size == 64
    assert q.max_model_len == 256
    assert g.embedding.model_defaults.embedding_type == EmbeddingType.Mean and g.embedding.model_defaults.normalize
    assert not g.is_causal and not g.embedding.sentence_transformers.include_prompt
    assert [d.activation for d in g.embedding.sentence_transformers.dense] == ["Identity", "Tanh"]
    assert g.embedding.supported_dimensions == (16, 32, 48, 64)
    # A plain causal LM keeps the built-in defaults: mean over all tokens, no normalization.
    assert tiny_engine.embedding.sentence_transformers is None
    assert tiny_engine.embedding.model_defaults == EmbeddingDefaults()
    v = tiny_engine.encode("hello world")
    assert abs(np.linalg.norm(v) - 1) > 1e-3


def test_the_eos_token_is_appended_and_kept(qwen):
    engine, model = qwen
    for text in TEXTS:
        ids = engine.tokenize([text])[0]
        assert ids[-1] == engine.checkpoint.tokenizer.tokenizer.token_to_id(EOS)
        assert ids == model.tokenizer(text)["input_ids"]


def test_server_flags_override_the_model_config_and_requests_override_both(qwen):
    engine, model = qwen  # the model's config: last token, normalized
    served = Engine(engine.checkpoint, max_batch_tokens=512,
                       defaults=EmbeddingDefaults(embedding_type=EmbeddingType.Mean,
                                                  normalize=False))
    try:
        by_flags = served.encode(TEXTS)
        np.testing.assert_allclose(by_flags, engine.encode(TEXTS, "mean", normalize=False),
                                   rtol=1e-5, atol=1e-6)
        assert differs(by_flags, st_encode(model, TEXTS))
        assert np.abs(np.linalg.norm(by_flags, axis=-1) - 1).max() > 1e-3
        # A request's own fields win over the server's flags.
        assert_same(served.encode(TEXTS, "last", normalize=True), st_encode(model, TEXTS))
    finally:
        served.shutdown()


def test_truncation_keeps_the_appended_eos(qwen):
    engine, model = qwen
    eos = engine.checkpoint.tokenizer.tokenizer.token_to_id(EOS)
    text = TEXTS[1]
    ids = engine.tokenize([text])[0]
    resp = engine.embed(EmbeddingRequest(input=[text], truncate_prompt_tokens=5))
    kept = engine.prepare([text], truncate=5).sequences[0].tolist()
    assert kept == ids[-5:] and kept[-1] == eos and resp.usage.prompt_tokens == 5
    # What was embedded is those five ids, the EOS last (the token this model pools).
    alone = engine.embed(EmbeddingRequest(input=[kept]))
    np.testing.assert_allclose(resp.data[0].embedding, alone.data[0].embedding, rtol=1e-5,
                               atol=1e-6)


def test_tokenize_includes_the_prompt_the_embeddings_route_prepends(gemma):
    engine, _ = gemma
    served = Engine(engine.checkpoint, max_batch_tokens=512,
                       defaults=EmbeddingDefaults(prompt_name="query"))
    text = TEXTS[0]

    def ids(prefix: str) -> list[int]:
        return engine.tokenize([prefix + text])[0]

    try:
        with TestClient(create_app(served)) as c:
            def tokens(**fields: Any) -> list[int]:
                r = c.post("/tokenize", json={"prompt": text, **fields})
                assert r.status_code == 200, r.text
                return r.json()["tokens"]

            assert tokens() == ids(GEMMA_PROMPTS["query"])  # the server's default prompt
            assert tokens(prompt_name="document") == ids(GEMMA_PROMPTS["document"])
            assert tokens(input_type="document") == ids(GEMMA_PROMPTS["document"])
            assert tokens(prompt_name="") == ids("")
            # The embeddings route embeds exactly those ids: its usage counts them.
            r = c.post("/v1/embeddings", json={"input": text})
            assert r.json()["usage"]["prompt_tokens"] == len(ids(GEMMA_PROMPTS["query"]))
            r = c.post("/tokenize", json={"prompt": text, "prompt_name": "nope"})
            assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_name"
    finally:
        served.shutdown()


# ---- parity with sentence-transformers -------------------------------------------------------


def test_qwen3_last_token_matches_single_and_batched(qwen):
    engine, model = qwen
    ref = st_encode(model, TEXTS)
    assert_same(engine.encode(TEXTS), ref)
    for text, r in zip(TEXTS, ref, strict=True):
        assert_same(engine.encode(text), st_encode(model, text))
        assert_same(engine.encode(text), r)
    # Over HTTP's path too: defaults from the model (last token, normalized).
    resp = engine.embed(EmbeddingRequest(input=TEXTS))
    assert_same(np.array([d.embedding for d in resp.data]), ref)
    # Negative controls: mean pooling, no normalization, or no EOS token differ.
    assert differs(engine.encode(TEXTS, embedding_type="mean"), ref)
    assert differs(engine.encode(TEXTS, normalize=False), ref)
    no_eos = [ids[:-1] for ids in engine.tokenize(TEXTS)]
    resp = engine.embed(EmbeddingRequest(input=no_eos))
    assert differs(np.array([d.embedding for d in resp.data]), ref)


def test_left_and_right_padding_give_our_last_token_embeddings(qwen):
    engine, model = qwen
    ours = engine.encode(TEXTS)
    side = model.tokenizer.padding_side
    try:
        for padding in ("left", "right"):
            model.tokenizer.padding_side = padding
            assert_same(ours, st_encode(model, TEXTS))
    finally:
        model.tokenizer.padding_side = side


def test_qwen3_prompts_and_instructions(qwen):
    engine, model = qwen
    ref = st_encode(model, TEXTS, prompt_name="query")
    assert differs(ref, st_encode(model, TEXTS))
    assert_same(engine.encode(TEXTS, prompt_name="query"), ref)
    assert_same(engine.encode(TEXTS, input_type="query"), ref)
    # The family's template places a free-text instruction exactly as the model's own prompt.
    assert_same(engine.encode(TEXTS, instruction=QWEN_QUERY_TASK), ref)
    for text, r in zip(TEXTS, ref, strict=True):
        assert_same(engine.encode(text, instruction=QWEN_QUERY_TASK), r)
    other = "Find code that adds numbers"
    assert_same(engine.encode(TEXTS, instruction=other),
                st_encode(model, TEXTS, prompt=f"Instruct: {other}\nQuery:"))
    # Documents have an empty prompt: the same as no prompt.
    assert_same(engine.encode(TEXTS, input_type="document"), st_encode(model, TEXTS))
    # Usage counts the prompt's tokens too.
    resp = engine.embed(EmbeddingRequest(input=TEXTS[:2], prompt_name="query"))
    prompted = engine.tokenize([QWEN_PROMPTS["query"] + t for t in TEXTS[:2]])
    assert resp.usage.prompt_tokens == sum(map(len, prompted)) > sum(
        map(len, engine.tokenize(TEXTS[:2])))


def test_gemma_mean_dense_normalize_match(gemma):
    engine, model = gemma
    ref = st_encode(model, TEXTS)
    assert_same(engine.encode(TEXTS), ref)
    for text, r in zip(TEXTS, ref, strict=True):
        assert_same(engine.encode(text), r)
    # Negative controls: without the Dense layers, or without normalization, vectors differ.
    pooled = engine.submit([np.asarray(s, np.int32) for s in engine.tokenize(TEXTS)]).result()
    assert differs(pooled / np.linalg.norm(pooled, axis=-1, keepdims=True), ref)
    assert differs(engine.encode(TEXTS, normalize=False), ref)


def test_gemma_causal_attention_differs(gemma_dir, gemma):
    _, model = gemma
    engine = build_engine(gemma_dir, attention="causal")
    try:
        assert engine.is_causal
        assert differs(engine.encode(TEXTS), st_encode(model, TEXTS))
    finally:
        engine.shutdown()


def test_gemma_prompts_left_out_of_the_mean(gemma):
    engine, model = gemma
    for name in ("query", "document"):
        ref = st_encode(model, TEXTS, prompt_name=name)
        assert_same(engine.encode(TEXTS, prompt_name=name), ref)
        assert_same(engine.encode(TEXTS[1], prompt_name=name), ref[1])
    ref = st_encode(model, TEXTS, prompt_name="query")
    assert_same(engine.encode(TEXTS, input_type="query"), ref)
    assert_same(engine.encode(TEXTS, instruction="search result"), ref)
    # Negative control: the same prompted tokens with the prompt kept in the mean differ.
    prompt = GEMMA_PROMPTS["query"]
    prepared = engine.prepare(TEXTS, None, prompt)
    assert prepared.skip == [engine.embedding.prompt_length(prompt)] * len(TEXTS)
    kept = engine.submit(prepared.sequences).result()
    kept = engine.embedding.sentence_transformers.project(kept)
    assert differs(kept / np.linalg.norm(kept, axis=-1, keepdims=True), ref)
    resp = engine.embed(EmbeddingRequest(input=TEXTS[:1], prompt_name="query"))
    assert resp.usage.prompt_tokens == len(prepared.sequences[0])


def test_default_prompt_from_the_server(gemma):
    engine, model = gemma
    served = Engine(engine.checkpoint, max_batch_tokens=512,
                       defaults=EmbeddingDefaults(prompt_name="query"))
    try:
        ref = st_encode(model, TEXTS, prompt_name="query")
        assert_same(served.encode(TEXTS), ref)
        # A request's own choice wins, '' naming no prompt.
        assert_same(served.encode(TEXTS, prompt_name=""), st_encode(model, TEXTS))
        assert_same(served.encode(TEXTS, prompt_name="document"),
                    st_encode(model, TEXTS, prompt_name="document"))
    finally:
        served.shutdown()


@pytest.mark.parametrize("dims", [16, 32, 48])
def test_matryoshka_dimensions(gemma, dims):
    engine, model = gemma
    ref = st_encode(model, TEXTS, truncate_dim=dims)
    got = engine.encode(TEXTS, dimensions=dims)
    assert got.shape == (len(TEXTS), dims)
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, rtol=1e-5)  # re-normalized
    assert cosine(got, ref).min() > COSINE_MIN
    prompted = engine.encode(TEXTS, dimensions=dims, prompt_name="query")
    assert cosine(prompted, st_encode(model, TEXTS, truncate_dim=dims,
                                      prompt_name="query")).min() > COSINE_MIN


def test_undeclared_dimensions_are_refused_with_the_list(gemma, qwen):
    engine, _ = gemma
    with pytest.raises(InvalidRequestError) as e:
        engine.embed(EmbeddingRequest(input="x", dimensions=20))
    assert e.value.param == "dimensions" and "[16, 32, 48, 64]" in e.value.message
    # A model that declares no sizes takes any.
    q, model = qwen
    assert cosine(q.encode(TEXTS, dimensions=20),
                  st_encode(model, TEXTS, truncate_dim=20)).min() > COSINE_MIN


def test_cls_pooling_on_the_bidirectional_model(gemma):
    engine, model = gemma
    seqs = [np.asarray(s, np.int32) for s in engine.tokenize(TEXTS)]
    cls = engine.submit(seqs, EmbeddingType.Cls).result()
    tokens = model.encode(TEXTS, output_value="token_embeddings", batch_size=len(TEXTS))
    ref = np.stack([np.asarray(t[0]) for t in tokens])
    assert cosine(cls, ref).min() > COSINE_MIN
    # Through a request: the first token's state, then the Dense layers and normalization.
    resp = engine.embed(EmbeddingRequest(input=TEXTS, embedding_type="cls"))
    want = engine.embedding.sentence_transformers.project(ref)
    assert_same(np.array([d.embedding for d in resp.data]),
                want / np.linalg.norm(want, axis=-1, keepdims=True))


# ---- bad requests ------------------------------------------------------------------------------


def test_prompt_errors(qwen, tiny_engine):
    engine, _ = qwen
    with pytest.raises(InvalidRequestError) as e:
        engine.embed(EmbeddingRequest(input="x", prompt_name="passage"))
    assert e.value.param == "prompt_name" and "['document', 'query']" in e.value.message
    with pytest.raises(InvalidRequestError) as e:
        engine.embed(EmbeddingRequest(input="x", prompt_name="query", instruction="find"))
    assert "at most one" in e.value.message
    with pytest.raises(InvalidRequestError) as e:
        engine.embed(EmbeddingRequest(input="x", instruction="  "))
    assert e.value.param == "instruction"
    # A family with no known instruction template answers 400, unless a template is given.
    with pytest.raises(InvalidRequestError) as e:
        tiny_engine.embed(EmbeddingRequest(input="x", instruction="find"))
    assert e.value.param == "instruction" and "template" in e.value.message
    with pytest.raises(InvalidRequestError, match="not one of this model's prompts"):
        tiny_engine.embed(EmbeddingRequest(input="x", prompt_name="query"))
    templated = Engine(tiny_engine.checkpoint, max_batch_tokens=512,
                          instruction_template="Task: {instruction}\n{text}")
    try:
        np.testing.assert_allclose(templated.encode("abc", instruction="find"),
                                   tiny_engine.encode("Task: find\nabc"), rtol=1e-5, atol=1e-6)
    finally:
        templated.shutdown()
    with pytest.raises(ValueError, match="bad server default"):
        Engine(engine.checkpoint, defaults=EmbeddingDefaults(prompt_name="nope"))


def test_a_prompt_asked_for_token_ids_is_refused(qwen):
    """Token ids are fed as they are: a prompt a request asks for could not be placed."""
    engine, _ = qwen
    ids = engine.tokenize(["x y z"])[0]
    for field, value in (("prompt_name", "query"), ("instruction", "find"),
                         ("input_type", "query")):
        for raw in (ids, [ids, ids]):
            with pytest.raises(InvalidRequestError) as e:
                engine.embed(EmbeddingRequest(input=raw, **{field: value}))
            assert e.value.param == field and "token ids" in e.value.message
    # No prompt asked for ('' names none): the ids are embedded as they are.
    got = engine.embed(EmbeddingRequest(input=ids, prompt_name=""))
    assert got.usage.prompt_tokens == len(ids)


# ---- configuration parsing and packing ---------------------------------------------------------


def test_pooling_configs_old_and_new(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    _write(folder / "modules.json", [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}])
    for pooling, want in [({"pooling_mode": "lasttoken"}, EmbeddingType.Last),
                          ({"pooling_mode": ["cls"]}, EmbeddingType.Cls),
                          ({"pooling_mode_mean_tokens": True}, EmbeddingType.Mean),
                          ({"pooling_mode_lasttoken": True, "include_prompt": False},
                           EmbeddingType.Last),
                          ({}, EmbeddingType.Mean)]:
        _write(folder / "1_Pooling" / "config.json", pooling)
        cfg = read_sentence_transformers(folder)
        assert cfg is not None and cfg.pooling == want and not cfg.normalize and not cfg.dense
        assert cfg.include_prompt == pooling.get("include_prompt", True)
    for bad in [{"pooling_mode": "max"}, {"pooling_mode": ["mean", "cls"]},
                {"pooling_mode_weightedmean_tokens": True}]:
        _write(folder / "1_Pooling" / "config.json", bad)
        with pytest.raises(ValueError, match="not supported"):
            read_sentence_transformers(folder)
    assert read_sentence_transformers(tmp_path) is None  # no modules.json: not such a folder


def test_plan_step_skips_prompt_tokens_from_pooling():
    seqs = [(0, np.arange(1, 9, dtype=np.int32)), (1, np.arange(1, 5, dtype=np.int32)),
            (2, np.arange(1, 3, dtype=np.int32))]
    step, left = plan_step(seqs, Buckets.build(64, 64), skip={0: 3, 2: 2})
    assert not left
    slots = step.last_index.shape[0]
    flat = step.seq_index.reshape(-1)
    for slot, sid in enumerate(step.sequences):
        n, k = len(seqs[sid][1]), {0: 3, 2: 2}.get(sid, 0)
        pooled = np.flatnonzero(flat == slot)
        assert len(pooled) == (n - k if k < n else 0)
        start = step.last_index[slot] - n + 1
        assert (flat[start : start + min(k, n)] == slots).all()  # the prompt: the padding slot
        assert step.first_index[slot] == (start + k if k < n else start)


@pytest.mark.parametrize("name", ["Identity", "Tanh", "ReLU", "Sigmoid", "SiLU", "GELU"])
def test_dense_activations_match_torch(name):
    import torch

    from jaxembed.st_config import DenseLayer

    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 4)).astype(np.float32)
    b = rng.standard_normal(5).astype(np.float32)
    x = (3 * rng.standard_normal((7, 4))).astype(np.float32)
    ours = DenseLayer(w, b, name)(x)
    with torch.no_grad():
        ref = getattr(torch.nn, name)()(torch.from_numpy(x @ w.T + b)).numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)
