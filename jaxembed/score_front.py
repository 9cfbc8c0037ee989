"""The scoring front end: rerank, score and classify requests to token ids, and the classifier's
outputs to responses.

Every request here is prefill-only work in the embedding steps: each (query, document) pair, or
each text to classify, is one sequence pooled at its last token, and the model's classifier
(`jaxembed.classify`) turns those states into scores on the host. A model with no classifier
scores a pair by the cosine similarity of the two texts' embeddings (its embedding defaults,
prompts included), as vLLM does for embedding models; it cannot classify.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Callable, Sequence

import numpy as np

from jaxembed.classify import Classifier, pair_ids
from jaxembed.embed_front import EmbeddingFrontend, EmbeddingOptions
from jaxembed.errors import InvalidRequestError
from jaxembed.inputs import InputProcessor, check_text, is_int
from jaxembed.protocol import (
    MAX_INPUTS,
    ClassifyData,
    ClassifyRequest,
    ClassifyResponse,
    EmbeddingRequest,
    EmbeddingType,
    RerankDocument,
    RerankRequest,
    RerankResponse,
    RerankResult,
    RerankUsage,
    ScoreData,
    ScoreRequest,
    ScoreResponse,
    Usage,
)


@dataclasses.dataclass
class ScoringWork:
    """Token ids to run and how their states become scores: `finish(states)` -> float32 [N]
    scores (or [N, labels] probabilities); `tokens` is what usage counts."""

    sequences: list[np.ndarray]
    pooling: EmbeddingType
    skip: list[int] | None
    finish: Callable[[np.ndarray], np.ndarray]
    tokens: int


class ScoringFrontend:
    def __init__(self, inputs: InputProcessor, embedding: EmbeddingFrontend,
                 classifier: Classifier | None, *, max_model_len: int,
                 refuse_long: bool = False) -> None:
        self.inputs, self.embedding, self.classifier = inputs, embedding, classifier
        limit = classifier.max_length if classifier is not None else None
        self.limit = min(max_model_len, limit) if limit else max_model_len
        self.refuse_long = refuse_long

    # ---- pairs to work ---------------------------------------------------------------------

    def pairs(self, pairs: Sequence[tuple[str, str]], instruction: str | None = None
              ) -> ScoringWork:
        """Work scoring each (query, document) pair: a relevance score [N]."""
        c = self.classifier
        if instruction is not None:
            if not isinstance(instruction, str) or not instruction.strip():
                raise InvalidRequestError("'instruction' must be a non-empty string",
                                          param="instruction")
            if c is None or c.pair.template is None or "{instruction}" not in c.pair.template:
                raise InvalidRequestError(
                    "'instruction' fills a rerank prompt's {instruction}, and this model has "
                    "none; leave it out", param="instruction", code="unsupported_value")
        if c is None:
            return self._cosine(pairs)
        if c.num_labels != 1:
            raise InvalidRequestError(
                f"this model classifies into {c.num_labels} labels ({', '.join(c.labels)}), "
                "not a relevance score; use /classify", param="model",
                code="unsupported_model")
        seqs = [np.asarray(pair_ids(self.inputs.tokenizer, c.pair, c.query_prompt + q, d,
                                    self.limit, not self.refuse_long, instruction), np.int32)
                for q, d in pairs]
        for s in seqs:
            self.inputs.check_vocab(s.tolist(), "documents")
        return ScoringWork(seqs, EmbeddingType.Last, None, c.scores, sum(map(len, seqs)))

    def _cosine(self, pairs: Sequence[tuple[str, str]]) -> ScoringWork:
        """Embeddings of each distinct text, the model's defaults applied; a pair's score is the
        cosine similarity of its two."""
        texts = list(dict.fromkeys(t for pair in pairs for t in pair))
        index = {t: i for i, t in enumerate(texts)}
        options = self.embedding.resolve(EmbeddingRequest(input=texts))
        truncate = None if self.refuse_long else self.embedding.max_model_len
        options = dataclasses.replace(options, truncate=options.truncate or truncate)
        prepared = self.embedding.prepare(texts, options.truncate, options.prompt)
        a = np.array([index[q] for q, _ in pairs])
        b = np.array([index[d] for _, d in pairs])

        def finish(states: np.ndarray) -> np.ndarray:
            v = np.asarray(self.embedding.finish(_unit(options), states), np.float64)
            v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-30)
            return (v[a] * v[b]).sum(1).astype(np.float32)

        return ScoringWork(prepared.sequences, options.pooling, prepared.skip, finish,
                           prepared.prompt_tokens)

    def texts(self, texts: Sequence[str]) -> ScoringWork:
        """Work classifying each text: label probabilities [N, labels]."""
        c = self.classifier
        if c is None:
            raise InvalidRequestError(
                f"{self.embedding.model_name} has no classification head, so it does not "
                "support 'classify' (it supports embed, token_embed, score and rerank, and "
                "generate where it has an LM head); serve a *ForSequenceClassification or "
                "CrossEncoder model", param="model", code="unsupported_model")
        seqs = []
        for i, text in enumerate(texts):
            ids = self.inputs.tokenize([text])[0]
            if len(ids) > self.limit:
                if self.refuse_long:
                    raise InvalidRequestError(
                        f"input[{i}] has {len(ids)} tokens, more than this model's limit of "
                        f"{self.limit}; shorten it", param="input",
                        code="context_length_exceeded")
                ids = ids[: self.limit]
            seqs.append(np.asarray(ids, np.int32))
        return ScoringWork(seqs, EmbeddingType.Last, None, c.probs, sum(map(len, seqs)))

    def _bounded(self, work: ScoringWork, param: str) -> ScoringWork:
        """The server's per-request token limit (`--max-request-tokens`), as for embeddings."""
        limit = self.embedding.max_request_tokens
        if limit is not None and work.tokens > limit:
            raise InvalidRequestError(
                f"the request has {work.tokens} tokens in all, more than this server's limit of "
                f"{limit} per request; split it into several requests", param=param,
                code="request_too_large")
        return work

    # ---- requests ----------------------------------------------------------------------------

    def rerank_work(self, request: RerankRequest) -> tuple[ScoringWork, list[str]]:
        self.embedding.resolve_model(request.model)
        query = _text(request.query, "query")
        docs = request.documents
        if not isinstance(docs, list) or not docs or len(docs) > MAX_INPUTS:
            raise InvalidRequestError(f"'documents' must be a list of 1 to {MAX_INPUTS} texts",
                                      param="documents")
        texts = [_text(d.text if isinstance(d, RerankDocument) else d, f"documents[{i}]",
                       "documents") for i, d in enumerate(docs)]
        n = request.top_n
        if n is not None and not (is_int(n) and n >= 1):
            raise InvalidRequestError(f"'top_n' must be a positive integer; got {n!r}",
                                      param="top_n")
        return self._bounded(self.pairs([(query, d) for d in texts], request.instruction),
                             "documents"), texts

    def rerank_response(self, request: RerankRequest, texts: list[str], work: ScoringWork,
                        scores: np.ndarray, model: str) -> RerankResponse:
        order = sorted(range(len(texts)), key=lambda i: -float(scores[i]))
        if request.top_n is not None:
            order = order[: request.top_n]
        results = [RerankResult(index=i, relevance_score=float(scores[i]),
                                document=RerankDocument(text=texts[i])
                                if request.return_documents else None) for i in order]
        return RerankResponse(id=f"rerank-{uuid.uuid4().hex}", model=model, results=results,
                              usage=RerankUsage(prompt_tokens=work.tokens,
                                                total_tokens=work.tokens))

    def score_work(self, request: ScoreRequest) -> ScoringWork:
        self.embedding.resolve_model(request.model)
        one = _texts(request.text_1, "text_1")
        many = _texts(request.text_2, "text_2")
        if len(one) == 1:
            pairs = [(one[0], t) for t in many]
        elif len(one) == len(many):
            pairs = list(zip(one, many, strict=True))
        else:
            raise InvalidRequestError(
                f"'text_1' has {len(one)} texts and 'text_2' {len(many)}: send one text_1 to "
                "score against every text_2, or lists of one length to score pairwise",
                param="text_2")
        return self._bounded(self.pairs(pairs, request.instruction), "text_2")

    def score_response(self, work: ScoringWork, scores: np.ndarray, model: str
                       ) -> ScoreResponse:
        return ScoreResponse(
            id=f"score-{uuid.uuid4().hex}", created=int(time.time()), model=model,
            data=[ScoreData(index=i, score=float(s)) for i, s in enumerate(scores)],
            usage=Usage(prompt_tokens=work.tokens, total_tokens=work.tokens))

    def classify_work(self, request: ClassifyRequest) -> ScoringWork:
        self.embedding.resolve_model(request.model)
        return self._bounded(self.texts(_texts(request.input, "input")), "input")

    def classify_response(self, work: ScoringWork, probs: np.ndarray, model: str
                          ) -> ClassifyResponse:
        labels = self.classifier.labels if self.classifier is not None else ()
        data = [ClassifyData(index=i, label=labels[int(np.argmax(p))], probs=p.tolist(),
                             num_classes=len(labels)) for i, p in enumerate(probs)]
        return ClassifyResponse(id=f"classify-{uuid.uuid4().hex}", created=int(time.time()),
                                model=model, data=data,
                                usage=Usage(prompt_tokens=work.tokens, total_tokens=work.tokens))


def _unit(options: EmbeddingOptions) -> EmbeddingOptions:
    """The embedding settings a cosine needs: the model's vectors, whole and unnormalized (the
    cosine normalizes)."""
    return dataclasses.replace(options, dimensions=None, normalize=False)


def _text(value: object, where: str, param: str | None = None) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidRequestError(f"{where} must be a non-empty string", param=param or where)
    check_text(value, where)
    return value


def _texts(value: object, param: str) -> list[str]:
    """A text or a list of 1 to MAX_INPUTS texts."""
    if isinstance(value, str):
        return [_text(value, param)]
    if not isinstance(value, list) or not value or len(value) > MAX_INPUTS:
        raise InvalidRequestError(f"'{param}' must be a text or a list of 1 to {MAX_INPUTS} "
                                  "texts", param=param)
    return [_text(v, f"{param}[{i}]", param) for i, v in enumerate(value)]
