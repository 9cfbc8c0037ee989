"""Sequence classifiers over the decoder: rerankers, cross-encoders and classification heads.

A classifier reads one vector a sequence, the final hidden state of its last token (what the
embedding steps pool as "last", as transformers' *ForSequenceClassification pools), and multiplies
it by a small head [labels, hidden] on the host, in float32, as the sentence-transformers Dense
modules run: a head of a few rows costs nothing beside the forward pass. Its heads come from:

- the checkpoint (`Checkpoint.heads["score"]`): transformers' *ForSequenceClassification `score`,
  a sentence-transformers CrossEncoder's (the same folder, with its own activation, max length and
  default prompt, which goes before each query), or a rank GGUF's `cls.output` as llama.cpp's
  converter writes it;
- two rows of the LM head ("classifier from tokens", vLLM's `classifier_from_token`): the logit of
  a "yes" token minus that of a "no" token, as causal-LM rerankers such as Qwen3-Reranker score.

How a (query, document) pair becomes tokens follows the model's own rule (`PairFormat`): the
tokenizer's pair encoding (its post-processor's pair template) for classification heads, or a
prompt template (Qwen3-Reranker's, from its model card) for rerankers that score with tokens.
A pair past the context is cut from the document's end, or refused (`truncate=False`).

A model with no classifier scores pairs by the cosine similarity of their embeddings, as vLLM's
score API does for embedding models.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from jaxembed.config import UnsupportedModelError
from jaxembed.errors import InvalidRequestError
from jaxembed.weights.errors import WeightLoadError

# Activations of a relevance score, by the torch class names sentence-transformers configs store
# ("torch.nn.modules.activation.Sigmoid"); only these are run, nothing is imported.
SCORE_ACTIVATIONS = {
    "Sigmoid": lambda x: 1.0 / (1.0 + np.exp(-x)),
    "Identity": lambda x: x,
    "Tanh": np.tanh,
}


@dataclasses.dataclass(frozen=True)
class PairFormat:
    """How a (query, document) pair becomes token ids: with `template` None, the tokenizer's
    pair encoding; otherwise `prefix` + the template with its {query}, {document} and
    {instruction} filled + `suffix`, the three tokenized apart (as the model card does) with no
    special tokens added. A GGUF's "rerank" template is the whole prompt, tokenized whole as
    llama.cpp does."""

    template: str | None = None
    prefix: str = ""
    suffix: str = ""
    instruction: str = ""  # the default of the template's {instruction}


# Qwen3-Reranker's prompt, from its model card.
QWEN3_RERANKER = PairFormat(
    template="<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}",
    prefix="<|im_start|>system\nJudge whether the Document meets the requirements based on the "
           "Query and the Instruct provided. Note that the answer can only be \"yes\" or "
           "\"no\".<|im_end|>\n<|im_start|>user\n",
    suffix="<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
    instruction="Given a web search query, retrieve relevant passages that answer the query")
# Built-in pair formats for classifiers from tokens, by model family.
TOKEN_PAIR_FORMATS = {"qwen3": QWEN3_RERANKER}


@dataclasses.dataclass(frozen=True)
class Classifier:
    """A head over each sequence's last-token state: logits = state @ weight.T + bias."""

    weight: np.ndarray  # float32 [labels, hidden]
    bias: np.ndarray | None  # float32 [labels]
    labels: tuple[str, ...]  # one name a label (the config's id2label)
    activation: str  # of a one-label score: a SCORE_ACTIVATIONS name
    pair: PairFormat
    source: str  # where the head came from, for /info
    max_length: int | None = None  # the model's own limit on a pair (a CrossEncoder's)
    # Prepended to each query (a CrossEncoder's default prompt, as sentence-transformers
    # prepends it to a pair's first text).
    query_prompt: str = ""

    @property
    def num_labels(self) -> int:
        return int(self.weight.shape[0])

    def logits(self, states: np.ndarray) -> np.ndarray:
        """[N, hidden] -> [N, labels], float32."""
        out = np.asarray(states, np.float32) @ self.weight.T
        return out if self.bias is None else out + self.bias

    def scores(self, states: np.ndarray) -> np.ndarray:
        """A relevance score a sequence, [N]: the one label's logit through the activation."""
        return SCORE_ACTIVATIONS[self.activation](self.logits(states)[:, 0])

    def probs(self, states: np.ndarray) -> np.ndarray:
        """Label probabilities [N, labels]: a softmax over the labels, or the sigmoid of one."""
        z = self.logits(states).astype(np.float64)
        if z.shape[1] == 1:
            return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)
        z = np.exp(z - z.max(1, keepdims=True))
        return (z / z.sum(1, keepdims=True)).astype(np.float32)

    def info(self) -> dict[str, Any]:
        return {"num_labels": self.num_labels, "labels": list(self.labels),
                "activation": self.activation, "source": self.source,
                "pair_template": self.pair.template is not None}


def build_classifier(heads: Mapping[str, np.ndarray], raw_config: Mapping[str, Any],
                     folder: Path | None, family: str, tokenizer: Tokenizer,
                     from_tokens: Sequence[str] | None, head_rows: Any) -> Classifier | None:
    """The model's classifier, or None. `from_tokens` ("no", "yes"): score with those two rows
    of the LM head; `head_rows(ids)` gives them ([len(ids), hidden] float32). `folder`: an HF
    folder, for a CrossEncoder's settings."""
    cross = read_cross_encoder(folder) if folder is not None else None
    if from_tokens:
        if "score" in heads:
            raise UnsupportedModelError(
                "the model has a classifier head of its own; --classifier-from-tokens scores "
                "with two tokens of an LM head instead: leave it out")
        ids = []
        for text in from_tokens:
            tid = tokenizer.token_to_id(text)
            if tid is None:
                raise UnsupportedModelError(
                    f"--classifier-from-tokens: {text!r} is not a token of this vocabulary")
            ids.append(tid)
        rows = np.asarray(head_rows(ids), np.float32)  # [len(ids), hidden]
        # One token: its logit; two (false, true): the log-odds, true minus false, whose sigmoid
        # is the softmax of the pair that model cards compute.
        weight = rows[-1:] if len(ids) == 1 else rows[1:2] - rows[0:1]
        return Classifier(weight, None, ("score",), "Sigmoid",
                          TOKEN_PAIR_FORMATS.get(family, PairFormat()),
                          f"tokens {', '.join(repr(t) for t in from_tokens)} of the LM head",
                          None if cross is None else cross.get("max_length"))
    if "score" not in heads:
        return None
    weight = heads["score"]
    labels = _labels(raw_config, weight.shape[0])
    if tuple(label.lower() for label in labels) == ("yes", "no"):
        # llama.cpp's converter writes a causal-LM reranker (Qwen3-Reranker) as the LM head's
        # "yes" and "no" rows, with its prompt as the "rerank" chat template: score as from
        # those tokens.
        rerank = raw_config.get("tokenizer.chat_template.rerank")
        pair = (PairFormat(template=str(rerank)) if isinstance(rerank, str) and rerank
                else TOKEN_PAIR_FORMATS.get(family, PairFormat()))
        return Classifier(weight[0:1] - weight[1:2], None, ("score",), "Sigmoid", pair,
                          "the GGUF's rank head ('yes' minus 'no')")
    activation = "Sigmoid" if weight.shape[0] == 1 else "Identity"
    source = "the checkpoint's classifier head"
    max_length, prompt = None, ""
    if cross is not None:
        activation = cross.get("activation") or activation
        max_length = cross.get("max_length")
        prompt = cross.get("prompt") or ""
        source = "a sentence-transformers CrossEncoder"
    return Classifier(weight, heads.get("score_bias"), labels, activation, PairFormat(), source,
                      max_length, prompt)


def _labels(raw: Mapping[str, Any], n: int) -> tuple[str, ...]:
    """id2label in id order (transformers' config, or the GGUF's `classifier.output_labels`),
    LABEL_i where the config names none."""
    names = {i: f"LABEL_{i}" for i in range(n)}
    id2label = raw.get("id2label")
    if isinstance(id2label, Mapping):
        for k, v in id2label.items():
            try:
                i = int(k)
            except (TypeError, ValueError):
                continue
            if 0 <= i < n:
                names[i] = str(v)
    arch = raw.get("general.architecture")
    listed = raw.get(f"{arch}.classifier.output_labels") if arch else None
    if isinstance(listed, list | tuple) and len(listed) == n:
        names = {i: str(v) for i, v in enumerate(listed)}
    return tuple(names[i] for i in range(n))


def read_cross_encoder(folder: Path) -> dict[str, Any] | None:
    """A sentence-transformers CrossEncoder folder's settings (its activation and max length),
    or None for another folder. sentence-transformers 6 writes `config_sentence_transformers.json`
    with model_type "CrossEncoder"; versions 4 and 5 wrote a `sentence_transformers` key into
    config.json, and older ones `sbert_ce_default_activation_function`."""
    def read(name: str) -> dict[str, Any]:
        path = folder / name
        if not path.is_file():
            return {}
        try:
            value = json.loads(path.read_text())
        except (UnicodeDecodeError, ValueError) as e:
            raise WeightLoadError(path, f"not valid JSON: {e}") from e
        return value if isinstance(value, dict) else {}

    st = read("config_sentence_transformers.json")
    hf = read("config.json")
    old = hf.get("sentence_transformers") if isinstance(hf.get("sentence_transformers"),
                                                      dict) else {}
    if st.get("model_type") != "CrossEncoder" and not old \
            and "sbert_ce_default_activation_function" not in hf:
        return None
    path = st.get("activation_fn") or old.get("activation_fn") or \
        hf.get("sbert_ce_default_activation_function")
    activation = None
    if path:
        activation = str(path).rsplit(".", 1)[-1]
        if activation not in SCORE_ACTIVATIONS or not str(path).startswith("torch."):
            raise UnsupportedModelError(
                f"{folder}: the CrossEncoder's activation_fn {path!r} is not supported; "
                f"supported: {', '.join(f'torch.nn.{a}' for a in SCORE_ACTIVATIONS)}")
    bert = read("sentence_bert_config.json")
    limit = bert.get("max_seq_length") or hf.get("max_length")
    prompts = st.get("prompts") if isinstance(st.get("prompts"), dict) else {}
    default = st.get("default_prompt_name")
    if default is not None and default not in prompts:
        raise WeightLoadError(folder / "config_sentence_transformers.json",
                              f"default_prompt_name {default!r} is not one of its prompts "
                              f"{sorted(prompts)}")
    return {"activation": activation, "max_length": int(limit) if limit else None,
            "prompt": str(prompts[default]) if default is not None else ""}


def pair_ids(tokenizer: Tokenizer, fmt: PairFormat, query: str, document: str, limit: int,
             truncate: bool, instruction: str | None = None) -> list[int]:
    """The token ids of one (query, document) pair, at most `limit` of them: the document is
    cut from its end to fit, or the pair refused (`truncate` False)."""
    if fmt.template is None:
        ids = tokenizer.encode(query, document).ids
        if len(ids) <= limit:
            return ids
        q = tokenizer.encode(query, add_special_tokens=False)
        d = tokenizer.encode(document, add_special_tokens=False)
        room = limit - tokenizer.num_special_tokens_to_add(True) - len(q.ids)
        _check_room(room, len(ids), limit, truncate)
        d.truncate(room)
        return tokenizer.post_process(q, d, add_special_tokens=True).ids
    head = tokenizer.encode(fmt.prefix, add_special_tokens=False).ids if fmt.prefix else []
    tail = tokenizer.encode(fmt.suffix, add_special_tokens=False).ids if fmt.suffix else []
    # Placeholders are replaced, not formatted: a template may hold other braces.
    text = fmt.template.replace("{instruction}", instruction or fmt.instruction) \
        .replace("{query}", query).replace("{document}", document)
    body = tokenizer.encode(text, add_special_tokens=False).ids
    n = len(head) + len(body) + len(tail)
    if n > limit:
        _check_room(limit - len(head) - len(tail) - (len(body) - len(
            tokenizer.encode(document, add_special_tokens=False).ids)), n, limit, truncate)
        body = body[: limit - len(head) - len(tail)]
    return head + body + tail


def _check_room(room: int, n: int, limit: int, truncate: bool) -> None:
    if not truncate:
        raise InvalidRequestError(
            f"a (query, document) pair has {n} tokens, more than this model's limit of {limit};"
            " shorten the document, or let the server cut it (drop --score-refuse-long)",
            param="documents", code="context_length_exceeded")
    if room < 1:
        raise InvalidRequestError(
            f"the query alone leaves no room for a document within this model's limit of {limit}"
            " tokens; shorten the query", param="query", code="context_length_exceeded")
