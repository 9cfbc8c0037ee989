"""Rerank, score and classify: decoder classifiers against their own libraries, on tiny random
models with every tensor re-initialized (the classifier head included).

- transformers' *ForSequenceClassification folders (Llama, Qwen3): relevance scores (one label,
  after the sigmoid) and label probabilities (three named labels, a softmax) against transformers'
  logits of the same pairs, tokenized by the tokenizer's pair encoding;
- a sentence-transformers CrossEncoder folder, saved with a non-default activation, against
  `CrossEncoder.predict` and `.rank` at the installed version;
- a causal LM scored by two tokens of its LM head (`classifier_from_tokens`, Qwen3-Reranker's
  prompt), against the model card's computation in transformers;
- a model with no classifier scores by the cosine of its embeddings;
- the routes' shapes and their 400s.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import families as F
import numpy as np
import pytest
import torch
from litestar.testing import TestClient
from tokenizers import Tokenizer

from jaxembed import Engine, EngineBuilder
from jaxembed.classify import QWEN3_RERANKER
from jaxembed.server.app import create_app

QUERY = "where does the cat sleep"
DOCS = ["the cat sleeps on the warm mat", "stock prices fell sharply today",
        "a dog barked at the moon all night long", "cats"]
TEXTS = ["the film was wonderful", "terrible service, never again", "it was fine I guess"]
LOGIT_ATOL = 1e-4


def _tokenizer_files(src: Path, dst: Path) -> None:
    if src != dst:
        shutil.copy(src / "tokenizer.json", dst / "tokenizer.json")
    # transformers and sentence-transformers load the tokenizer themselves: they need its config
    # and a padding token (the families' "<|endoftext|>", id 0, their pad_token_id).
    (dst / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "<|endoftext|>"}))


def build_classifier(family: str, root: Path, labels: list[str], seed: int) -> Path:
    """A *ForSequenceClassification folder of `family`: the tiny causal model's weights and a
    fresh head of len(labels) rows, large enough that scores spread."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    base = F.build_family(family, root / f"{family}-base", seed=seed)
    cfg = AutoConfig.from_pretrained(base)
    cfg.architectures = [type(cfg).__name__.replace("Config", "ForSequenceClassification")]
    cfg.num_labels = len(labels)
    cfg.id2label = dict(enumerate(labels))
    cfg.label2id = {v: k for k, v in cfg.id2label.items()}
    model = AutoModelForSequenceClassification.from_pretrained(base, config=cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.score.weight.copy_(3 * torch.randn(model.score.weight.shape, generator=g)
                                 / np.sqrt(cfg.hidden_size))
    folder = root / f"{family}-{len(labels)}"
    model.save_pretrained(folder)
    _tokenizer_files(base, folder)
    return folder


def _engine(folder: Path, **options: Any) -> Engine:
    return EngineBuilder(model=folder, dtype="float32", warmup=False, progress=False,
                         compilation_cache=False, max_num_seqs=2, **options).build()


def _reference(folder: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager").eval()
    return model, AutoTokenizer.from_pretrained(folder)


def _logits(model: Any, tok: Any, first: str, second: str | None = None) -> np.ndarray:
    ids = tok(first, second)["input_ids"]
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("rerank")


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_relevance_scores_match_transformers(root: Path, family: str) -> None:
    folder = build_classifier(family, root, ["relevant"], seed=5)
    model, tok = _reference(folder)
    ref = np.array([_logits(model, tok, QUERY, d)[0] for d in DOCS])
    assert ref.std() > 0.1  # the head spreads the scores, so an order means something
    engine = _engine(folder)
    try:
        assert engine.classifier is not None and engine.classifier.activation == "Sigmoid"
        ours = engine.score(QUERY, DOCS)
        np.testing.assert_allclose(ours, 1 / (1 + np.exp(-ref)), atol=LOGIT_ATOL)
        ranked = engine.rerank(QUERY, DOCS)
        assert [i for i, _ in ranked] == list(np.argsort(-ref))
        # Control: the head's sign flipped is another model, and the comparison sees it.
        assert not np.allclose(ours, 1 / (1 + np.exp(ref)), atol=LOGIT_ATOL)
        # Pairwise, one text_1 a text_2: the same numbers.
        pairwise = engine.score([QUERY] * len(DOCS), DOCS)
        np.testing.assert_allclose(pairwise, ours, atol=1e-6)
    finally:
        engine.shutdown()


def test_label_probabilities_match_transformers(root: Path) -> None:
    labels = ["negative", "neutral", "positive"]
    folder = build_classifier("qwen3", root, labels, seed=6)
    model, tok = _reference(folder)
    engine = _engine(folder)
    try:
        assert engine.classifier.labels == tuple(labels)
        probs = engine.classify(TEXTS)
        for text, p in zip(TEXTS, probs, strict=True):
            z = _logits(model, tok, text)
            np.testing.assert_allclose(p, np.exp(z) / np.exp(z).sum(), atol=LOGIT_ATOL)
        with TestClient(create_app(engine)) as client:
            body = client.post("/classify", json={"input": TEXTS}).json()
            assert [d["label"] for d in body["data"]] == [labels[int(np.argmax(p))]
                                                          for p in probs]
            assert all(d["num_classes"] == 3 for d in body["data"])
            np.testing.assert_allclose([d["probs"] for d in body["data"]], probs, atol=1e-6)
            # Three labels are no relevance score: rerank says where to go.
            r = client.post("/v1/rerank", json={"query": QUERY, "documents": DOCS})
            assert r.status_code == 400 and "/classify" in r.json()["error"]["message"]
    finally:
        engine.shutdown()


def test_a_cross_encoder_folder_is_served_as_sentence_transformers_runs_it(root: Path) -> None:
    from sentence_transformers import CrossEncoder

    folder = build_classifier("llama", root, ["relevant"], seed=7)
    # Tanh, not the default sigmoid, and a default prompt (sentence-transformers puts it before
    # each query): the folder's own settings must be the ones applied.
    ce = CrossEncoder(str(folder), activation_fn=torch.nn.Tanh(),
                      prompts={"query": "Query says: "}, default_prompt_name="query")
    saved = root / "cross-encoder"
    ce.save(str(saved))
    ce = CrossEncoder(str(saved))
    assert isinstance(ce.activation_fn, torch.nn.Tanh) and ce.default_prompt_name == "query"
    engine = _engine(saved)
    try:
        assert engine.classifier.activation == "Tanh"
        ref = ce.predict([(QUERY, d) for d in DOCS])
        np.testing.assert_allclose(engine.score(QUERY, DOCS), ref, atol=LOGIT_ATOL)
        unprompted = CrossEncoder(str(folder), activation_fn=torch.nn.Tanh())
        assert not np.allclose(ref, unprompted.predict([(QUERY, d) for d in DOCS]),
                               atol=LOGIT_ATOL)  # the prompt matters
        ranked = ce.rank(QUERY, DOCS)
        assert [i for i, _ in engine.rerank(QUERY, DOCS)] == [r["corpus_id"] for r in ranked]
        # Its embeddings are not a sentence-transformers pipeline's: plain defaults.
        assert engine.embedding.sentence_transformers is None
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def causal_reranker(root: Path) -> tuple[Path, str, str, Any]:
    """A tiny Qwen3 causal LM standing for Qwen3-Reranker: its folder, its stand-ins for "no"
    and "yes" (the tiny vocabulary has neither), and transformers' model."""
    from transformers import AutoModelForCausalLM

    # Its prompt alone is about 280 tokens of the tiny vocabulary: past the families' 256.
    folder = F.build_family("qwen3", root / "qwen3-reranker", seed=8,
                            max_position_embeddings=1024)
    _tokenizer_files(folder, folder)
    vocab = json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]
    no, yes = sorted(vocab, key=vocab.get)[200:202]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    return folder, no, yes, model


def _card(reranker: tuple[Path, str, str, Any], tok: Any, query: str, doc: str,
          instruction: str) -> float:
    """Qwen3-Reranker's model card: prefix, body and suffix tokenized apart, and the softmax of
    the "no" and "yes" logits at the last position."""
    folder, no, yes, model = reranker
    body = QWEN3_RERANKER.template.format(instruction=instruction, query=query, document=doc)
    ids = (tok.encode(QWEN3_RERANKER.prefix, add_special_tokens=False).ids
           + tok.encode(body, add_special_tokens=False).ids
           + tok.encode(QWEN3_RERANKER.suffix, add_special_tokens=False).ids)
    with torch.no_grad():
        last = model(torch.tensor([ids])).logits[0, -1].double()
    pair = torch.stack([last[tok.token_to_id(no)], last[tok.token_to_id(yes)]])
    return float(torch.log_softmax(pair, 0)[1].exp())


def test_a_causal_lm_scores_with_two_tokens_as_its_model_card_does(causal_reranker) -> None:
    folder, no, yes, _ = causal_reranker
    engine = _engine(folder, classifier_from_tokens=(no, yes))
    tok = engine.inputs.tokenizer
    try:
        ref = [_card(causal_reranker, tok, QUERY, d, QWEN3_RERANKER.instruction) for d in DOCS]
        np.testing.assert_allclose(engine.score(QUERY, DOCS), ref, atol=LOGIT_ATOL)
        told = "Find the passage about animals"
        ref = [_card(causal_reranker, tok, QUERY, d, told) for d in DOCS]
        np.testing.assert_allclose(engine.score(QUERY, DOCS, instruction=told), ref,
                                   atol=LOGIT_ATOL)
    finally:
        engine.shutdown()


def test_gguf_rerankers_as_llama_cpp_writes_them(root: Path, causal_reranker, reranker
                                                 ) -> None:
    """A rank head (`cls.output`) of one row is a classifier head; one of two rows labelled
    "yes" and "no" (how the converter writes Qwen3-Reranker, with its prompt as the "rerank"
    chat template, tokenized whole) scores as those two tokens do."""
    from safetensors.numpy import load_file

    one = F.write_family_gguf(root / "qwen3-1", root / "rank-1.gguf")
    engine = _engine(one)
    try:
        np.testing.assert_allclose(engine.score(QUERY, DOCS), reranker.score(QUERY, DOCS),
                                   atol=LOGIT_ATOL)
    finally:
        engine.shutdown()

    folder, no, yes, _ = causal_reranker
    head = load_file(str(folder / "model.safetensors"))["lm_head.weight"]
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    told = "Given a web search query, retrieve relevant passages that answer the query"
    template = (QWEN3_RERANKER.prefix + QWEN3_RERANKER.template.replace("{instruction}", told)
                + QWEN3_RERANKER.suffix)

    def rank_head(w: Any) -> None:
        rows = np.stack([head[tok.token_to_id(yes)], head[tok.token_to_id(no)]])
        w.add_tensor("cls.output.weight", rows.astype(np.float32))
        w.add_array("qwen3.classifier.output_labels", ["yes", "no"])
        w.add_string("tokenizer.chat_template.rerank", template)
        w.add_uint32("qwen3.pooling_type", 4)  # RANK

    two = F.write_family_gguf(folder, root / "rank-yes-no.gguf", extra=rank_head)
    engine = _engine(two)
    try:
        assert engine.classifier.source == "the GGUF's rank head ('yes' minus 'no')"
        ref = [_card(causal_reranker, tok, QUERY, d, told) for d in DOCS]
        np.testing.assert_allclose(engine.score(QUERY, DOCS), ref, atol=LOGIT_ATOL)
    finally:
        engine.shutdown()


def test_a_model_without_a_classifier_scores_by_cosine(tiny_engine: Engine) -> None:
    vectors = tiny_engine.encode([QUERY, *DOCS])
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    np.testing.assert_allclose(tiny_engine.score(QUERY, DOCS), unit[1:] @ unit[0], atol=1e-5)
    assert tiny_engine.tasks == ("embed", "token_embed", "generate", "score", "rerank")
    with TestClient(create_app(tiny_engine)) as client:
        assert client.get("/info").json()["scoring"]["classifier"] is False
        r = client.post("/classify", json={"input": "x"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "model"


@pytest.fixture(scope="module")
def reranker(root: Path) -> Iterator[Engine]:
    engine = _engine(build_classifier("qwen3", root, ["relevant"], seed=9), max_model_len=64)
    yield engine
    engine.shutdown()


def test_the_rerank_and_score_routes(reranker: Engine) -> None:
    scores = reranker.score(QUERY, DOCS)
    best = list(np.argsort(-scores))
    # A *ForSequenceClassification checkpoint has no LM head: it cannot generate.
    assert reranker.tasks == ("embed", "token_embed", "score", "rerank", "classify")
    with TestClient(create_app(reranker)) as client:
        assert client.get("/info").json()["tasks"] == list(reranker.tasks)
        assert client.get("/v1/models").json()["data"][0]["tasks"] == list(reranker.tasks)
        for path, body in [("/v1/completions", {"prompt": "hi"}),
                           ("/v1/chat/completions",
                            {"messages": [{"role": "user", "content": "hi"}]})]:
            r = client.post(path, json=body)
            assert r.status_code == 400, r.text
            assert "supports embed, token_embed, score, rerank, classify" in \
                r.json()["error"]["message"]
        assert client.get("/info").json()["scoring"] == {
            "classifier": True, "num_labels": 1, "labels": ["relevant"],
            "activation": "Sigmoid", "source": "the checkpoint's classifier head"}
        for path in ("/v1/rerank", "/rerank", "/v2/rerank"):
            body = client.post(path, json={"query": QUERY, "documents": DOCS}).json()
            assert [r["index"] for r in body["results"]] == best
            assert [r["document"]["text"] for r in body["results"]] == [DOCS[i] for i in best]
            np.testing.assert_allclose([r["relevance_score"] for r in body["results"]],
                                       scores[best], atol=1e-6)
        tokens = sum(len(reranker.inputs.tokenizer.encode(QUERY, d).ids) for d in DOCS)
        assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
        body = client.post("/v1/rerank", json={
            "query": QUERY, "documents": [{"text": d} for d in DOCS], "top_n": 2,
            "return_documents": False}).json()
        assert [r["index"] for r in body["results"]] == best[:2]
        assert all("document" not in r for r in body["results"])
        body = client.post("/v1/score", json={"text_1": QUERY, "text_2": DOCS}).json()
        assert [d["index"] for d in body["data"]] == list(range(len(DOCS)))
        np.testing.assert_allclose([d["score"] for d in body["data"]], scores, atol=1e-6)
        # A document past the limit (64 tokens) is cut from its end to fit.
        long = " ".join(["the cat sleeps"] * 60)
        r = client.post("/v1/score", json={"text_1": QUERY, "text_2": long})
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 64
        for path, body, param in [
            ("/v1/rerank", {"query": QUERY, "documents": []}, "documents"),
            ("/v1/rerank", {"query": "", "documents": DOCS}, "query"),
            ("/v1/rerank", {"query": QUERY, "documents": [""]}, "documents"),
            ("/v1/rerank", {"query": QUERY, "documents": DOCS, "top_n": 0}, "top_n"),
            ("/v1/rerank", {"query": QUERY, "documents": DOCS, "instruction": "x"},
             "instruction"),
            ("/v1/rerank", {"query": QUERY, "documents": DOCS, "model": "other"}, "model"),
            ("/v1/score", {"text_1": [QUERY, QUERY], "text_2": DOCS}, "text_2"),
            ("/v1/score", {"text_1": QUERY, "text_2": []}, "text_2"),
            ("/v1/rerank", {"query": " ".join(["cat"] * 80), "documents": DOCS}, "query"),
        ]:
            r = client.post(path, json=body)
            assert r.status_code in (400, 404), (body, r.text)
            assert r.json()["error"]["param"] == param, r.text


def test_a_long_pair_is_refused_when_the_server_says_so(root: Path) -> None:
    folder = root / "qwen3-1"
    if not folder.exists():
        build_classifier("qwen3", root, ["relevant"], seed=9)
    engine = _engine(folder, max_model_len=64, score_refuse_long=True)
    try:
        with TestClient(create_app(engine)) as client:
            r = client.post("/v1/score", json={"text_1": QUERY,
                                               "text_2": " ".join(["the cat sleeps"] * 60)})
            assert r.status_code == 400
            assert r.json()["error"]["code"] == "context_length_exceeded"
    finally:
        engine.shutdown()


def test_the_scoring_flags() -> None:
    import argparse

    from jaxembed.options import MODEL_FLAGS, EngineOptions, add_arguments, from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser, MODEL_FLAGS)
    args = parser.parse_args(["--classifier-from-tokens", "no,yes", "--score-refuse-long"])
    fields = from_args(args)
    assert fields["classifier_from_tokens"] == ("no", "yes") and fields["score_refuse_long"]
    with pytest.raises(ValueError, match="one or two tokens"):
        EngineOptions(classifier_from_tokens=("a", "b", "c")).validate()
