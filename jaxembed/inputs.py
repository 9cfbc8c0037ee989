"""Where a request's text becomes token ids: tokenization, the vocabulary check, truncation that
keeps the tokenizer's special tokens in place, and the checks every request field shares.

Used by both front ends (embeddings and generation); it knows the tokenizer and the vocabulary
size, nothing of steps or devices.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from jaxembed.errors import InvalidRequestError


class InputProcessor:
    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.special_prefix, self.special_suffix = self._special_tokens()
        self.special_ids = {i for i, t in tokenizer.get_added_tokens_decoder().items()
                            if t.special}

    def tokenize(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """Token ids exactly as the engine feeds them (special tokens per the model)."""
        return [enc.ids for enc in
                self.tokenizer.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(t) for t in ids], skip_special_tokens=False)

    def prompt_ids(self, prompt: str | Sequence[int], add_special_tokens: bool = True,
                   param: str = "prompt") -> np.ndarray:
        """Token ids of a prompt: a text (tokenized with the model's special tokens unless told
        otherwise) or token ids as they are."""
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError(f"'{param}' is empty; send some text", param=param,
                                          code="empty_input")
            check_text(prompt, param)
            ids = self.tokenize([prompt], add_special_tokens)[0]
        elif isinstance(prompt, list | tuple | np.ndarray) and all(is_int(t) for t in prompt):
            ids = [int(t) for t in prompt]
            self.check_vocab(ids, param)
        else:
            raise InvalidRequestError(f"'{param}' must be a string or a list of token ids",
                                      param=param, code="invalid_type")
        if not ids:
            raise InvalidRequestError(f"'{param}' has no tokens; send at least one", param=param,
                                      code="empty_input")
        return np.asarray(ids, np.int32)

    def check_vocab(self, ids: Sequence[int], where: str) -> None:
        vocab = self.vocab_size
        try:
            arr = np.asarray(ids, dtype=np.int64)
            bad = np.flatnonzero((arr < 0) | (arr >= vocab))
        except OverflowError:  # ids beyond int64 cannot even be compared in numpy
            bad = np.asarray([j for j, t in enumerate(ids) if not 0 <= t < vocab])
        if bad.size:
            j = int(bad[0])
            param = where.split("[", 1)[0]
            raise InvalidRequestError(
                f"{where}[{j}] is token id {ids[j]}, outside this model's vocabulary "
                f"[0, {vocab - 1}]", param=param, code="invalid_token_id")

    def kept_prefix(self, ids: list[int]) -> int:
        """How many leading special tokens (BOS) truncation keeps in place."""
        prefix = self.special_prefix
        return len(prefix) if prefix and ids[: len(prefix)] == prefix else 0

    def truncate(self, ids: list[int], keep: int) -> list[int]:
        """The last `keep` tokens, the tokenizer's leading and trailing special tokens kept."""
        suffix = self.special_suffix
        head = self.kept_prefix(ids)
        tail = len(suffix) if suffix and ids[len(ids) - len(suffix) :] == suffix else 0
        body = keep - head - tail
        if body < 1:
            raise InvalidRequestError(
                f"'truncate_prompt_tokens' {keep} leaves no room for text beside the {head + tail} "
                f"special tokens this model adds; use at least {head + tail + 1}",
                param="truncate_prompt_tokens")
        end = len(ids) - tail
        return ids[:head] + ids[end - body : end] + ids[end:]

    def _special_tokens(self) -> tuple[list[int], list[int]]:
        """The ids the tokenizer puts before and after any text (e.g. BOS), found by comparing a
        probe encoded with and without special tokens; truncation keeps them in place."""
        with_special = self.tokenize(["a"])[0]
        plain = self.tokenize(["a"], add_special_tokens=False)[0]
        n = len(plain)
        for i in range(len(with_special) - n + 1):
            if with_special[i : i + n] == plain:
                return with_special[:i], with_special[i + n :]
        return [], []


# ---- checks every request field shares ----------------------------------------------------------


def check_text(text: str, where: str) -> None:
    # JSON escapes can spell lone surrogates, which are not text and which tokenizers refuse.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequestError(
            f"{where} is not valid Unicode: it holds a lone surrogate (an unpaired \\ud800-\\udfff "
            "escape); send well-formed text", param=where.split("[", 1)[0],
            code="invalid_value") from None


def is_int(x: object) -> bool:
    return isinstance(x, int | np.integer) and not isinstance(x, bool)


def is_number(x: object) -> bool:
    return isinstance(x, int | float | np.integer | np.floating) and not isinstance(x, bool) \
        and bool(np.isfinite(x))


def first(*values: Any) -> Any:
    """The first value that is set (not None)."""
    return next((v for v in values if v is not None), None)


def enum_value(kind: Any, value: object, param: str) -> Any:
    try:
        return kind(value)
    except ValueError:
        allowed = [v.value for v in kind]
        raise InvalidRequestError(f"{param!r} must be one of {allowed}; got {value!r}",
                                  param=param) from None
