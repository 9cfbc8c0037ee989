"""A HuggingFace `tokenizers.Tokenizer` rebuilt from the `tokenizer.ggml.*` metadata of a GGUF file.

A GGUF carries no `tokenizer.json`: llama.cpp stores the vocabulary, the merges or scores, the
token types and the special token ids as metadata. This module turns those back into a
`tokenizers.Tokenizer` that encodes text the way transformers does for the same file
(`AutoTokenizer.from_pretrained(folder, gguf_file=name)`, built in
`transformers/integrations/gguf/gguf_tokenizer_mapping.py`), without importing transformers at
run time. Where transformers and llama.cpp disagree and llama.cpp matches the tokenizer the model
was trained with, we follow llama.cpp; each such place says so in a comment:

* `tokenizer.ggml.pre == "smollm"` (and llama.cpp's other digit-splitting BPE vocabularies):
  transformers has no entry and falls back to the GPT-2 split, which does not isolate digits, so
  whitespace runs before a digit come out differently ("a  1", "\\n\\n1.").
* CONTROL / USER_DEFINED tokens of a byte-level vocabulary that use characters outside the
  byte alphabet (e.g. DeepSeek's `<｜begin▁of▁sentence｜>`) stay whole; transformers cuts them.
* transformers adds its tokenizer classes' default special tokens (`<|endoftext|>`, `<s>`, ...)
  even when the vocabulary lacks them, giving them ids past the model's vocabulary; we add only
  the ones the vocabulary has.
* A SentencePiece file stating `tokenizer.ggml.add_space_prefix = false` gets no prefix space.

Two tokenizer models are covered, chosen by `tokenizer.ggml.model`:

* `gpt2`: byte-level BPE from tokens and merges, split first by the regex `tokenizer.ggml.pre`
  names (GPT-2, Llama 3, Qwen2, SmolLM, ...).
* `llama`: SentencePiece-style BPE with byte fallback (`<0x..>` tokens), merges taken from the
  file or recovered from the scores; Gemma 1/2/3 and Phi-3 files get their own variants, chosen by
  `general.architecture`, as in transformers.
"""

from __future__ import annotations

import collections
import numbers
import reprlib
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import gguf
import numpy as np
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    normalizers,
    pre_tokenizers,
    processors,
)
from tokenizers.models import BPE

from jaxembed.weights.tokenizer import TokenizerBundle

__all__ = ["SUPPORTED_TOKENIZER_MODELS", "tokenizer_from_gguf"]

_NORMAL = int(gguf.TokenType.NORMAL)
_CONTROL = int(gguf.TokenType.CONTROL)
_USER_DEFINED = int(gguf.TokenType.USER_DEFINED)

# SentencePiece's word-boundary marker, which stands for a space inside its tokens.
_SPIECE_SPACE = "\u2581"


# --------------------------------------------------------------------------------------------
# Pre-tokenizer regexes for byte-level BPE, by `tokenizer.ggml.pre`
# --------------------------------------------------------------------------------------------

# The regexes below are the ones transformers uses for the same `pre` names (its
# `GGUF_PRE_TOKENIZER_SPLITS`), which are those of the models' own `tokenizer.json` files.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_SPLIT_REGEX_BY_PRE: dict[str, str] = {
    **dict.fromkeys(
        (
            "llama3",
            "llama-v3",
            "llama-bpe",
            "falcon3",
            "falcon-h1",
            "pixtral",
            "midm-2.0",
            "lfm2",
            "jina-v5-nano",
            "dbrx",
            "smaug-bpe",
        ),
        _LLAMA3_SPLIT,
    ),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O_SPLIT),
}

# Vocabularies trained with every digit split off first (a `Digits(individual_digits=True)`
# pre-tokenizer ahead of the GPT-2 one in their `tokenizer.json`); llama.cpp splits these with
# `\p{N}` before the GPT-2 regex. transformers has no entry for them and uses the GPT-2 split
# alone, which differs when a whitespace run precedes a digit ("a  1" -> "a", "Ġ", "Ġ1" before
# BPE instead of "a", "ĠĠ", "1"). We follow the model's own tokenizer here.
_DIGIT_SPLIT_PRES = frozenset(
    ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
)

# Plain GPT-2 splitting, stated so we do not warn about it.
_GPT2_PRES = frozenset(("default", "gpt-2", "gpt2", "mpt", "olmo", "jais"))

SUPPORTED_TOKENIZER_MODELS = ("gpt2", "llama")


def _byte_level_pre_tokenizer(pre: object) -> pre_tokenizers.PreTokenizer:
    if pre is not None and not isinstance(pre, str):
        raise ValueError(f"tokenizer.ggml.pre must be a string; got {reprlib.repr(pre)}")
    if pre in _SPLIT_REGEX_BY_PRE:
        # The regex does the splitting, so ByteLevel only maps bytes to its alphabet.
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLIT_REGEX_BY_PRE[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    if pre in _DIGIT_SPLIT_PRES:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    if pre is not None and pre not in _GPT2_PRES:
        # transformers silently uses the GPT-2 split for names it does not know; do the same so
        # the file still loads, but say so, since a wrong split changes the ids.
        warnings.warn(
            f"unknown tokenizer.ggml.pre {pre!r}; splitting text like GPT-2", stacklevel=4
        )
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Built:
    tokenizer: Tokenizer
    vocab: dict[str, int]
    # Special tokens the transformers tokenizer class adds by default (`GPT2Tokenizer`'s
    # `<|endoftext|>`, `LlamaTokenizer`'s `<s>`...), which are special there whenever the
    # vocabulary has them.
    class_special_tokens: tuple[str, ...]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character, which byte-level vocabularies use."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\xa1"), ord("\xac") + 1),
        *range(ord("\xae"), ord("\xff") + 1),
    ]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {byte: chr(char) for byte, char in zip(printable, chars, strict=True)}


def _split_merges(merges: Sequence[str]) -> list[tuple[str, str]]:
    # Vocabularies spell spaces as Ġ or ▁, so the first space always separates the pair.
    pairs = [tuple(merge.split(" ", 1)) for merge in merges]
    for pair in pairs:
        if len(pair) != 2:
            raise ValueError(f"merge {reprlib.repr(pair[0])} is not two tokens and a space")
    return pairs  # type: ignore[return-value]


def _bpe_tokenizer(**model: Any) -> Tokenizer:
    """A `Tokenizer` over `BPE(**model)`, or ValueError when the merges name a token the
    vocabulary lacks (which `tokenizers` reports as a bare `Exception`)."""
    try:
        return Tokenizer(BPE(**model))
    except Exception as e:
        raise ValueError(f"the vocabulary and merges do not make a BPE model: {e}") from e


def _two_longest(vocab: Mapping[str, int]) -> tuple[tuple[int, int], int]:
    """((the longest token's length, how many tokens have it), the next length below it)."""
    lengths = collections.Counter(map(len, vocab))
    top = sorted(lengths, reverse=True)[:2] + [0]
    return (top[0], lengths[top[0]]), top[1]


def _merges_from_scores(vocab: Mapping[str, int], scores: Mapping[str, float] | None) -> list:
    """Recover BPE merges from a vocabulary, as transformers' `generate_merges` does.

    Every way of cutting a token into two tokens of the vocabulary is a merge producing it; they
    are ranked by the produced token's score (best first), or by its id when there are no scores.
    The exact order, ties included, decides the ids, so this follows transformers step by step.
    """
    ranked = scores if scores is not None else vocab
    merges: list[tuple[str, str, float]] = []
    # Both halves are tokens of the vocabulary, so neither is longer than the longest token but
    # the one being cut: the cuts are bounded by it, which keeps one very long token (a crafted
    # file's) from making this quadratic in its length. The cuts keep their order.
    longest, second = _two_longest(vocab)
    # Written out longhand because it runs over every token (262k for Gemma 3).
    for token, rank in ranked.items():
        local = []
        n = len(token)
        piece = second if n == longest[0] and longest[1] == 1 else longest[0]
        for cut in range(max(1, n - piece), min(n - 1, piece) + 1):
            left = token[:cut]
            if left in vocab:
                right = token[cut:]
                if right in vocab:
                    local.append((left, right, rank))
        if len(local) > 1:
            local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=scores is not None)
    return [(left, right) for left, right, _ in merges]


def _byte_level_bpe(meta: Mapping[str, Any], tokens: Sequence[str], types: Sequence[int]) -> _Built:
    byte_to_char = _bytes_to_unicode()
    alphabet = frozenset(byte_to_char.values())
    vocab: dict[str, int] = {}
    for index, (token, token_type) in enumerate(zip(tokens, types, strict=True)):
        if token_type in (_CONTROL, _USER_DEFINED) or set(token) <= alphabet:
            # Ordinary tokens are stored in the byte alphabet already. llama.cpp stores added
            # tokens as the text they stand for, and matches them whole in the input, so keep
            # that text: it is what the added-token matcher must find.
            vocab[token] = index
        else:
            # A normal token spelled in plain text: respell it byte by byte, as transformers does.
            vocab["".join(byte_to_char[b] for b in token.encode("utf-8"))] = index

    file_merges = _strings(meta, "tokenizer.ggml.merges")
    if file_merges is not None:
        merges = _split_merges(file_merges)
    else:
        scores = _per_token(meta, "tokenizer.ggml.scores", len(tokens), "iuf")
        merges = _merges_from_scores(
            vocab, dict(zip(tokens, scores, strict=True)) if scores else None
        )

    tokenizer = _bpe_tokenizer(
        vocab=vocab,
        merges=merges,
        dropout=None,
        continuing_subword_prefix="",
        end_of_word_suffix="",
        fuse_unk=False,
    )
    tokenizer.pre_tokenizer = _byte_level_pre_tokenizer(meta.get("tokenizer.ggml.pre"))
    tokenizer.decoder = decoders.ByteLevel()
    return _Built(tokenizer, vocab, ("<|endoftext|>",))


def _sentencepiece_bpe(
    meta: Mapping[str, Any], tokens: Sequence[str], types: Sequence[int]
) -> _Built:
    architecture = meta.get("general.architecture")
    gemma = isinstance(architecture, str) and architecture in ("gemma", "gemma2", "gemma3")
    scores = _per_token(meta, "tokenizer.ggml.scores", len(tokens), "iuf")

    if gemma:
        # Gemma files store the tokens of two or more spaces as real spaces, while the text is
        # looked up with spaces turned into ▁: respell them so they can be found.
        tokens = [_SPIECE_SPACE * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {token: index for index, token in enumerate(tokens)}

    file_merges = _strings(meta, "tokenizer.ggml.merges")
    if file_merges is not None:
        merges = _split_merges(file_merges)
    elif gemma:
        # Gemma's scores do not follow its merge order; the order of the tokens in the file does.
        merges = _merges_from_scores(vocab, {t: -i for i, t in enumerate(tokens)})
    else:
        ranks = dict(zip(tokens, scores, strict=True)) if scores is not None else None
        merges = _merges_from_scores(vocab, ranks)

    # Byte fallback turns a character with no token of its own into its `<0x..>` UTF-8 bytes.
    if gemma:
        tokenizer = _bpe_tokenizer(
            vocab=vocab,
            merges=merges,
            fuse_unk=True,
            unk_token="<unk>" if "<unk>" in vocab else None,
            dropout=None,
            byte_fallback=True,
        )
    else:
        tokenizer = _bpe_tokenizer(
            vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None
        )
    decode_spaces = [decoders.Replace(_SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]

    if gemma:
        # No prefix space: spaces simply become ▁ (the split on " " then never fires, but it is
        # what transformers' GemmaTokenizer builds).
        tokenizer.normalizer = normalizers.Replace(" ", _SPIECE_SPACE)
        tokenizer.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
        tokenizer.decoder = decoders.Sequence(decode_spaces)
        specials: tuple[str, ...] = ("<unk>", "<bos>", "<eos>", "<pad>", "<mask>")
        return _Built(tokenizer, vocab, specials)

    # The file's `add_space_prefix` comes from the SentencePiece model's `add_dummy_prefix`.
    # transformers ignores it and always adds the prefix space; llama.cpp honours it, as does
    # SentencePiece, so we do too (only files that say false are affected).
    add_prefix = _flag(meta, "tokenizer.ggml.add_space_prefix", True)
    if architecture == "phi3":
        # Phi-3 puts the prefix space in with a normalizer, so it lands before every piece of
        # text between added tokens, not only the first one.
        tokenizer.normalizer = normalizers.Sequence(
            [normalizers.Prepend(_SPIECE_SPACE), normalizers.Replace(" ", _SPIECE_SPACE)]
            if add_prefix
            else [normalizers.Replace(" ", _SPIECE_SPACE)]
        )
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement=_SPIECE_SPACE,
            prepend_scheme="first" if add_prefix else "never",
            split=False,
        )
    if add_prefix:
        # Drop the space the prefix turned into, so decode(encode(text)) gives text back.
        decode_spaces.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(decode_spaces)
    return _Built(tokenizer, vocab, ("<unk>", "<s>", "</s>"))


_BUILDERS: dict[str, Callable[[Mapping[str, Any], Sequence[str], Sequence[int]], _Built]] = {
    "gpt2": _byte_level_bpe,
    "llama": _sentencepiece_bpe,
}


# --------------------------------------------------------------------------------------------
# Special tokens and BOS/EOS
# --------------------------------------------------------------------------------------------


def _add_special_tokens(
    built: _Built, meta: Mapping[str, Any], tokens: Sequence[str], types: Sequence[int]
) -> None:
    """Register the tokens that must be matched whole in the text, flagged as transformers does.

    Special (skipped by `decode(..., skip_special_tokens=True)`): the tokenizer class's default
    specials, CONTROL tokens, and the file's BOS/EOS/UNK/PAD tokens. Not special but still never
    split: USER_DEFINED tokens such as `<think>`. None is normalized, so a prefix space or a
    space-to-▁ rewrite never stops them matching.

    When one text is registered twice, transformers' order decides the flag: the class defaults
    come first and the token types override them (a USER_DEFINED `<mask>` ends up not special),
    while the file's BOS/EOS/UNK/PAD only add tokens not registered yet.
    """
    vocab = built.vocab
    is_special: dict[str, bool] = {}

    def usable(content: str) -> bool:
        # Every added token must already have its id in the vocabulary: one missing from it
        # would get a new id past the end of the model's embedding table.
        return bool(content) and content in vocab

    for content in built.class_special_tokens:
        if usable(content):
            is_special[content] = True
    for wanted_type, special in ((_CONTROL, True), (_USER_DEFINED, False)):
        for token, token_type in zip(tokens, types, strict=True):
            if token_type == wanted_type and usable(token):
                is_special[token] = special
    for key in ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id"):
        token_id = _token_id(meta, key, len(tokens))
        if token_id is not None and usable(tokens[token_id]):
            is_special.setdefault(tokens[token_id], True)

    special = [AddedToken(t, normalized=False, special=True) for t, s in is_special.items() if s]
    plain = [AddedToken(t, normalized=False, special=False) for t, s in is_special.items() if not s]
    if special:
        built.tokenizer.add_special_tokens(special)
    if plain:
        built.tokenizer.add_tokens(plain)


def _template_name(content: str, fallback: str) -> str:
    # Template pieces are parsed from "name:type_id" strings, so a name with a colon or a space
    # (or one that looks like a sequence, "$A") needs a stand-in; the ids come from the mapping.
    unsafe = (
        not content
        or content.startswith("$")
        or ":" in content
        or any(c.isspace() for c in content)
    )
    return fallback if unsafe else content


def _post_processor(
    bos: tuple[str, int] | None, eos: tuple[str, int] | None
) -> processors.TemplateProcessing:
    """BOS/EOS around each sequence, with the same shape as transformers' post-processor."""
    single_head: list[str] = []
    single_tail: list[str] = []
    pair_head: list[str] = []
    pair_tail: list[str] = []
    special_tokens: list[dict[str, Any]] = []
    for piece, head, tail, fallback in ((bos, True, False, "BOS"), (eos, False, True, "EOS")):
        if piece is None:
            continue
        content, token_id = piece
        name = _template_name(content, fallback)
        special_tokens.append({"id": name, "ids": [token_id], "tokens": [content]})
        if head:
            single_head.append(f"{name}:0")
            pair_head.append(f"{name}:1")
        if tail:
            single_tail.append(f"{name}:0")
            pair_tail.append(f"{name}:1")
    single = [*single_head, "$A:0", *single_tail]
    pair = [*single, *pair_head, "$B:1", *pair_tail]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special_tokens)


# ---- reading the metadata, which a file may fill with values of any type ------------------------


def _token_id(meta: Mapping[str, Any], key: str, n_tokens: int) -> int | None:
    """The id under `tokenizer.ggml.{key}`; None when absent or not a token of the vocabulary."""
    value = meta.get(f"tokenizer.ggml.{key}")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"tokenizer.ggml.{key} must be an integer; got {reprlib.repr(value)}")
    token_id = int(value)
    return token_id if 0 <= token_id < n_tokens else None


def _flag(meta: Mapping[str, Any], key: str, default: bool) -> bool:
    value = meta.get(key, default)
    if not isinstance(value, numbers.Integral | np.bool_):  # a boolean, or an integer 0/1
        raise ValueError(f"{key} must be a boolean; got {reprlib.repr(value)}")
    return bool(value)


def _strings(meta: Mapping[str, Any], key: str) -> list[str] | None:
    value = meta.get(key)
    if value is None:
        return None
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{key} must be an array of strings")
    return list(value)


def _per_token(meta: Mapping[str, Any], key: str, n_tokens: int, kinds: str) -> list | None:
    """An array of numbers (numpy `kinds`), one per token, as Python numbers; None when absent
    or empty. `GGUFFile` gives numeric arrays as numpy arrays; a plain dict may hold lists."""
    value = meta.get(key)
    if value is None:
        return None
    if not isinstance(value, np.ndarray | list | tuple):
        raise ValueError(f"{key} must be an array of numbers; got {reprlib.repr(value)}")
    if len(value) == 0:
        return None
    if len(value) != n_tokens:
        raise ValueError(f"{key} has {len(value)} entries for {n_tokens} tokens")
    array = np.asarray(value)
    if array.ndim != 1 or array.dtype.kind not in kinds:
        raise ValueError(f"{key} must be an array of numbers; got {array.dtype} values")
    return array.tolist()


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def tokenizer_from_gguf(meta: Mapping[str, Any]) -> TokenizerBundle:
    """Build the tokenizer described by GGUF metadata (`GGUFFile(path).metadata`, or any dict).

    Raises `ValueError` for a `tokenizer.ggml.model` other than those in
    `SUPPORTED_TOKENIZER_MODELS`, or when the vocabulary is missing or malformed.
    """
    model = meta.get("tokenizer.ggml.model")
    builder = _BUILDERS.get(model) if isinstance(model, str) else None
    if builder is None:
        raise ValueError(
            f"unsupported tokenizer.ggml.model {reprlib.repr(model)}: supported are "
            + ", ".join(repr(name) for name in SUPPORTED_TOKENIZER_MODELS)
            + " ('gpt2' = byte-level BPE, 'llama' = SentencePiece-style BPE)"
        )
    tokens = _strings(meta, "tokenizer.ggml.tokens")
    if not tokens:
        raise ValueError("GGUF metadata has no tokenizer.ggml.tokens")
    types = _per_token(meta, "tokenizer.ggml.token_type", len(tokens), "iu")
    if types is None:
        types = [_NORMAL] * len(tokens)

    built = builder(meta, tokens, types)
    _add_special_tokens(built, meta, tokens, types)

    bos_id = _token_id(meta, "bos_token_id", len(tokens))
    eos_id = _token_id(meta, "eos_token_id", len(tokens))
    pad_id = _token_id(meta, "padding_token_id", len(tokens))
    # When the file does not say, transformers adds BOS for a SentencePiece vocabulary (as
    # llama.cpp does) and nothing for a byte-level one. Without the token there is nothing to add.
    add_bos = _flag(meta, "tokenizer.ggml.add_bos_token", model == "llama") and bos_id is not None
    add_eos = _flag(meta, "tokenizer.ggml.add_eos_token", False) and eos_id is not None
    built.tokenizer.post_processor = _post_processor(
        (tokens[bos_id], bos_id) if add_bos and bos_id is not None else None,
        (tokens[eos_id], eos_id) if add_eos and eos_id is not None else None,
    )
    chat_template = meta.get("tokenizer.chat_template")
    return TokenizerBundle(
        tokenizer=built.tokenizer,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        add_bos=add_bos,
        add_eos=add_eos,
        chat_template=chat_template if isinstance(chat_template, str) else None,
        # End of turn (and llama 3's end of message) end a generation as EOS does.
        stop_token_ids=tuple(dict.fromkeys(
            i for i in (eos_id, _token_id(meta, "eot_token_id", len(tokens)),
                        _token_id(meta, "eom_token_id", len(tokens))) if i is not None)),
    )
