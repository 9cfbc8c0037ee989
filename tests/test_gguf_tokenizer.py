"""The tokenizer rebuilt from GGUF metadata against transformers' tokenizer for the same file.

Two kinds of file: the real SmolLM2 GGUF (byte-level BPE, `tokenizer.ggml.pre = "smollm"`) and
tiny SentencePiece-style ("llama" model) files written here with `gguf.GGUFWriter`, which
transformers loads with `AutoTokenizer.from_pretrained(folder, gguf_file=name)` just the same.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from tokenizers import Tokenizer, pre_tokenizers

from jaxembed.weights import gguf_tokenizer
from jaxembed.weights.gguf_io import GGUFFile
from jaxembed.weights.gguf_tokenizer import (
    SUPPORTED_TOKENIZER_MODELS,
    tokenizer_from_gguf,
)
from jaxembed.weights.tokenizer import TokenizerBundle

TT = gguf.TokenType

# --------------------------------------------------------------------------------------------
# The real SmolLM2 file
# --------------------------------------------------------------------------------------------

SMOLLM2_TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "I'm sure they'll say it's fine, won't they? DON'T SHOUT, I'M HERE.",
    "Café, naïve, résumé, Zürich, São Paulo, Ångström, façade",
    "日本語のテキストを分割します。中文也可以。한국어도요.",
    "مرحبا بالعالم، كيف حالك؟",
    "नमस्ते दुनिया, आप कैसे हैं?",
    "Привет, мир! Ελληνικά κείμενα.",
    "😀😃 👍🏽 ❤️ 🤖",
    "👨‍👩‍👧‍👦 family, 🏳️‍🌈 flag, 🇯🇵🇫🇷🇧🇷 flags",
    "def f(x):\n    if x > 0:\n        return x * 2\n    return -x\n",
    "\tindented\twith\ttabs\n\t\tand more\t\n",
    "a    b        c",
    "line1\n\n\nline4\r\nwindows\r\n",
    "   leading and trailing   ",
    "3.14159 2718281828 1,000,000 0x1F 1e-9 -42",
    "Year 2024: 12345678901234567890",
    # A whitespace run before a digit: see `test_smollm2_digit_split_follows_the_model`.
    "a  1",
    "Intro.\n\n1. First\n2. Second\n\n    3. Indented",
    "x",
    " ",
    "\n",
    "?",
    "",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
    "<|im_start|>assistant\n",
    "text<|endoftext|>more text",
    "<|im_start|><|im_start|><|im_end|>",
    "<|im_startx|> is not a special token, nor is <|im_end",
    "<repo_name>jaxembed<file_sep>main.py<filename>x",
    "$var _under snake_case CamelCase HTTPServer x86_64 don't we'll",
    (
        "Tokenizers turn text into integers. A language model never sees characters: it sees "
        "ids, one per piece of text, and the pieces are learned from data. Byte-level BPE starts "
        "from the 256 bytes and merges the most frequent pairs, again and again, until the "
        "vocabulary is full; SentencePiece does much the same on characters, falling back to "
        "bytes for anything it has not seen. Either way, the same text must always give the "
        "same ids, or the model reads something else than what was written. — Fin."
    ),
]

# The texts that must decode back to themselves (no special tokens in them).
ROUND_TRIP_TEXTS = [
    "Café, naïve, résumé, Zürich, São Paulo, Ångström, façade",
    "日本語のテキストを分割します。中文也可以。한국어도요.",
    "👨‍👩‍👧‍👦 family, 🏳️‍🌈 flag, 🇯🇵🇫🇷🇧🇷 flags",
    "def f(x):\n    if x > 0:\n        return x * 2\n    return -x\n",
    "   leading and trailing   ",
    "Intro.\n\n1. First\n2. Second\n\n    3. Indented",
]

# Where a whitespace run precedes a digit, the GPT-2 split transformers uses for "smollm" and
# the model's own digit split (which we use) cut the text differently; nowhere else.
WHITESPACE_RUN_BEFORE_DIGIT = re.compile(r"\s\s\d")


@pytest.fixture(scope="session")
def smollm2_reader(smollm2_path: Path) -> gguf.GGUFReader:
    return gguf.GGUFReader(smollm2_path)


@pytest.fixture(scope="session")
def smollm2_meta(smollm2_path: Path) -> dict[str, Any]:
    return GGUFFile(smollm2_path).metadata


@pytest.fixture(scope="session")
def smollm2_ours(smollm2_meta: dict[str, Any]) -> TokenizerBundle:
    return tokenizer_from_gguf(smollm2_meta)


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_path: Path) -> Any:
    """transformers' tokenizer for the same file, built once (it takes several seconds)."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(
        smollm2_path.parent, gguf_file=smollm2_path.name
    )


@pytest.fixture(scope="session")
def smollm2_reference(smollm2_hf: Any) -> Tokenizer:
    """transformers' tokenizer with the pre-tokenizer of SmolLM2's own `tokenizer.json`.

    Everything else (vocabulary, merges, added tokens, post-processor, decoder) is what
    transformers builds from the GGUF. Only the split differs: transformers has no rule for
    `pre = "smollm"` and uses the GPT-2 split, while the model was trained with digits split off
    first, as llama.cpp does for this `pre`, and as our tokenizer does.
    """
    reference = Tokenizer.from_str(smollm2_hf.backend_tokenizer.to_str())
    reference.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    return reference


def _as_lists(meta: dict[str, Any]) -> dict[str, Any]:
    """Metadata with its numeric arrays (numpy, from GGUFFile) as lists, as gguf's reader gives."""
    return {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in meta.items()}


def test_gguf_metadata_matches_reader_contents(smollm2_reader, smollm2_meta):
    """Our GGUF reader gives the same metadata as the gguf package's reader."""
    expected = {name: field.contents() for name, field in smollm2_reader.fields.items()
                if not name.startswith("GGUF.")}
    assert _as_lists(smollm2_meta) == expected
    assert len(smollm2_meta["tokenizer.ggml.tokens"]) == 49152
    assert smollm2_meta["tokenizer.ggml.token_type"].dtype == np.int32
    assert smollm2_meta["tokenizer.ggml.model"] == "gpt2"


def test_gguf_metadata_and_build_are_fast(smollm2_path):
    start = time.perf_counter()
    meta = GGUFFile(smollm2_path).metadata
    read_s = time.perf_counter() - start
    start = time.perf_counter()
    tokenizer_from_gguf(meta)
    build_s = time.perf_counter() - start
    # Generous bounds for a slow shared machine; typically 0.06 s and 0.2 s.
    assert read_s < 1.0, read_s
    assert build_s < 3.0, build_s


def test_smollm2_facts(smollm2_ours, smollm2_hf):
    assert smollm2_ours.add_bos is False and smollm2_ours.add_eos is False
    assert smollm2_ours.bos_token_id == smollm2_hf.bos_token_id == 1
    assert smollm2_ours.eos_token_id == smollm2_hf.eos_token_id == 2
    assert smollm2_ours.pad_token_id == 2
    assert smollm2_ours.chat_template is not None and "<|im_start|>" in smollm2_ours.chat_template
    assert smollm2_ours.tokenizer.get_vocab_size() == 49152


@pytest.mark.slow
@pytest.mark.parametrize("text", SMOLLM2_TEXTS, ids=range(len(SMOLLM2_TEXTS)))
def test_smollm2_ids_match_transformers(smollm2_ours, smollm2_hf, smollm2_reference, text):
    ours = smollm2_ours.tokenizer.encode(text).ids
    assert ours == smollm2_reference.encode(text).ids
    if not WHITESPACE_RUN_BEFORE_DIGIT.search(text):
        assert ours == smollm2_hf(text)["input_ids"]


@pytest.mark.slow
def test_smollm2_digit_split_follows_the_model(smollm2_ours, smollm2_hf):
    """Stock transformers differs exactly where a whitespace run precedes a digit."""
    text = "Intro.\n\n1. First"
    ours = smollm2_ours.tokenizer.encode(text)
    # The blank line is one token and the digit its own, as SmolLM2's own tokenizer (and
    # llama.cpp) has it; transformers' GPT-2 split gives "Ċ", "Ċ" instead.
    assert ours.tokens[-5:] == [".", "ĊĊ", "1", ".", "ĠFirst"]
    assert smollm2_hf(text)["input_ids"] != ours.ids
    for text in SMOLLM2_TEXTS:
        same = smollm2_ours.tokenizer.encode(text).ids == smollm2_hf(text)["input_ids"]
        assert same == (WHITESPACE_RUN_BEFORE_DIGIT.search(text) is None), text


@pytest.mark.slow
@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_smollm2_decode_round_trips(smollm2_ours, smollm2_hf, text):
    ids = smollm2_ours.tokenizer.encode(text).ids
    assert smollm2_ours.tokenizer.decode(ids) == text
    assert smollm2_hf.decode(ids) == text


@pytest.mark.slow
def test_smollm2_special_tokens_stay_whole(smollm2_ours, smollm2_hf):
    text = "<|im_start|>user\nHi<|im_end|><|endoftext|>"
    encoding = smollm2_ours.tokenizer.encode(text)
    assert encoding.ids[0] == 1 and encoding.ids[-2:] == [2, 0]
    assert encoding.tokens[0] == "<|im_start|>"
    assert smollm2_ours.tokenizer.decode(encoding.ids) == "user\nHi"
    assert smollm2_ours.tokenizer.decode(encoding.ids, skip_special_tokens=False) == text
    assert smollm2_hf.decode(encoding.ids) == text
    # All 17 CONTROL tokens of the file are special, with their own ids.
    added = smollm2_ours.tokenizer.get_added_tokens_decoder()
    assert sorted(added) == list(range(17))
    assert all(token.special and not token.normalized for token in added.values())


def _transformers_backend(meta: dict[str, Any]) -> Tokenizer:
    """transformers' own GGUF tokenizer conversion, fed this metadata (no file needed)."""
    pytest.importorskip("transformers")
    from transformers.integrations.gguf import gguf_tokenizer_mapping as mapping

    renames = mapping.GGUF_TOKENIZER_MAPPING["tokenizer"]
    plain = _as_lists(meta)  # transformers reads lists
    tokenizer_dict = {
        name: plain[f"tokenizer.{key}"]
        for key, name in renames.items()
        if f"tokenizer.{key}" in plain
    }
    backend, _ = mapping.convert_gguf_tokenizer(meta["general.architecture"], tokenizer_dict)
    return backend


PRE_TEXTS = [
    *SMOLLM2_TEXTS,
    "I'M DON'T you'RE",
    "1234567 12 1",
    "hello!!!\n\n\nworld?\n  \n",
    "__init__ $$$money ...dots",
]


@pytest.mark.slow
@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe", "qwen2"])
def test_byte_level_pre_tokenizers_match_transformers(smollm2_meta, pre):
    """The regex each `pre` names, on SmolLM2's vocabulary: ours against transformers'."""
    meta = {**smollm2_meta, "tokenizer.ggml.pre": pre}
    ours = tokenizer_from_gguf(meta).tokenizer
    reference = _transformers_backend(meta)
    for text in PRE_TEXTS:
        expected = reference.encode(text, add_special_tokens=False).ids
        assert ours.encode(text, add_special_tokens=False).ids == expected, text


@pytest.mark.slow
def test_merges_from_scores_orders_ties_like_transformers(smollm2_meta):
    """Recovered merges (SentencePiece files have none) in transformers' order, ties included."""
    pytest.importorskip("transformers")
    from transformers.tokenization_utils_base import generate_merges

    from jaxembed.weights.gguf_tokenizer import _merges_from_scores

    tokens = smollm2_meta["tokenizer.ggml.tokens"]
    vocab = {token: index for index, token in enumerate(tokens)}
    rng = np.random.default_rng(0)
    ranks = rng.integers(-40, 1, len(tokens)).astype(float).tolist()
    scores = dict(zip(tokens, ranks, strict=True))
    assert _merges_from_scores(vocab, scores) == generate_merges(vocab, scores)
    assert _merges_from_scores(vocab, None) == generate_merges(vocab, None)


def test_default_pre_is_gpt2(smollm2_meta):
    default = tokenizer_from_gguf({**smollm2_meta, "tokenizer.ggml.pre": "default"}).tokenizer
    gpt2 = tokenizer_from_gguf({**smollm2_meta, "tokenizer.ggml.pre": "gpt-2"}).tokenizer
    for text in PRE_TEXTS:
        assert default.encode(text).ids == gpt2.encode(text).ids


def test_unknown_pre_warns_and_uses_gpt2(smollm2_meta):
    with pytest.warns(UserWarning, match="not-a-real-pre"):
        tokenizer_from_gguf({**smollm2_meta, "tokenizer.ggml.pre": "not-a-real-pre"})


# --------------------------------------------------------------------------------------------
# Tiny SentencePiece-style ("llama" model) files
# --------------------------------------------------------------------------------------------

# Merged pieces, best first: their scores fall with their position, as in SentencePiece BPE.
SP_PIECES = [
    "▁t", "he", "▁the", "▁a", "in", "er", "an", "on", "▁s", "re", "▁w", "or", "ld", "▁wor",
    "▁world", "ll", "▁H", "el", "ell", "▁He", "▁Hell", "▁Hello", "lo", "▁to", "en", "at", "is",
    "▁is", "▁th", "it", "▁it", "es", "▁c", "▁o", "▁f", "ing", "▁b", "▁in", "nd", "▁and", "ar",
    "ou", "▁m", "ed", "▁p", "▁of", "▁d", "ic", "as", "al", "le", "\n\n",
]  # fmt: skip
# Single characters, with the lowest scores; anything else falls back to <0x..> bytes.
SP_CHARS = list("▁etaoinshrdlcumwfgypbvkjxqzHTWEO.,!?'-0123456789éü\n")

SP_TEXTS = [
    "Hello world",
    " Hello  world",
    "the  world is in",
    "   leading spaces",
    "trailing   ",
    "The world and the HELLO",
    "is it in? or is it on!",
    "héllo wörld ñ 日本 😀 👨‍👩‍👧",
    "0123456789 3.14",
    "a\tb\nc\n\nd",
    "",
    " ",
    "\n",
    "<s>the</s>",
    "<|im_start|>user\nHello<|im_end|>",
    "<tool>x and <tool>",
    "x<unk>y",
    "<|im_start",
]


def _write_sentencepiece_gguf(
    path: Path,
    architecture: str,
    specials: list[tuple[str, TT]],
    special_ids: dict[str, int],
    extra_tokens: list[tuple[str, TT]],
    flags: dict[str, bool],
) -> Path:
    """A tiny model of `architecture` whose tokenizer is SentencePiece-style BPE.

    transformers reads the model config from the file before the tokenizer, so the file carries
    the architecture's shape keys and one tensor.
    """
    tokens: list[str] = []
    scores: list[float] = []
    types: list[int] = []

    def add(token: str, score: float, token_type: TT) -> None:
        tokens.append(token)
        scores.append(score)
        types.append(int(token_type))

    for token, token_type in specials:
        add(token, 0.0, token_type)
    for byte in range(256):
        add(f"<0x{byte:02X}>", 0.0, TT.BYTE)
    for token, token_type in extra_tokens:
        add(token, 0.0, token_type)
    for rank, piece in enumerate(SP_PIECES):
        add(piece, -float(rank), TT.NORMAL)
    for rank, char in enumerate(SP_CHARS):
        add(char, -1000.0 - rank, TT.NORMAL)

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("tiny")
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_block_count(1)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_key_length(4)
    writer.add_value_length(4)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_dimension_count(4)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(special_ids["bos"])
    writer.add_eos_token_id(special_ids["eos"])
    writer.add_unk_token_id(special_ids["unk"])
    if "pad" in special_ids:
        writer.add_pad_token_id(special_ids["pad"])
    if "add_bos" in flags:
        writer.add_add_bos_token(flags["add_bos"])
    if "add_eos" in flags:
        writer.add_add_eos_token(flags["add_eos"])
    if "add_space_prefix" in flags:
        writer.add_add_space_prefix(flags["add_space_prefix"])
    writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


LLAMA_SPECIALS = [("<unk>", TT.UNKNOWN), ("<s>", TT.CONTROL), ("</s>", TT.CONTROL)]
LLAMA_IDS = {"unk": 0, "bos": 1, "eos": 2}
CHAT_TOKENS = [
    ("<|im_start|>", TT.CONTROL),
    ("<|im_end|>", TT.CONTROL),
    ("<tool>", TT.USER_DEFINED),
]
# Gemma's special tokens sit where Gemma 3 has them, and its runs of spaces are stored as real
# spaces (one also marked USER_DEFINED, as some conversions do).
GEMMA_SPECIALS = [
    ("<pad>", TT.CONTROL),
    ("<eos>", TT.CONTROL),
    ("<bos>", TT.CONTROL),
    ("<unk>", TT.UNKNOWN),
    ("<mask>", TT.USER_DEFINED),
]
GEMMA_IDS = {"pad": 0, "eos": 1, "bos": 2, "unk": 3}
GEMMA_EXTRA = [*CHAT_TOKENS, ("  ", TT.NORMAL), ("   ", TT.NORMAL), ("    ", TT.USER_DEFINED)]

SP_VARIANTS: dict[str, Callable[[Path], Path]] = {
    # Add-BOS stated, as llama.cpp writes for Llama 2.
    "llama": lambda d: _write_sentencepiece_gguf(
        d / "llama.gguf", "llama", LLAMA_SPECIALS, LLAMA_IDS, CHAT_TOKENS,
        {"add_bos": True, "add_eos": False},
    ),
    # No add-BOS key: a SentencePiece vocabulary then adds BOS. EOS added on request.
    "llama-eos-no-bos-key": lambda d: _write_sentencepiece_gguf(
        d / "llama-eos.gguf", "llama", LLAMA_SPECIALS, LLAMA_IDS, CHAT_TOKENS,
        {"add_eos": True},
    ),
    "gemma3": lambda d: _write_sentencepiece_gguf(
        d / "gemma3.gguf", "gemma3", GEMMA_SPECIALS, GEMMA_IDS, GEMMA_EXTRA,
        {"add_bos": True, "add_eos": False, "add_space_prefix": False},
    ),
    "phi3": lambda d: _write_sentencepiece_gguf(
        d / "phi3.gguf", "phi3", LLAMA_SPECIALS, LLAMA_IDS, CHAT_TOKENS,
        {"add_bos": True, "add_eos": False},
    ),
}  # fmt: skip


@pytest.fixture(scope="session")
def sp_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("gguf-tokenizers")
    return {name: write(folder) for name, write in SP_VARIANTS.items()}


@pytest.fixture(scope="session")
def sp_pairs(sp_files: dict[str, Path]) -> dict[str, tuple[TokenizerBundle, Any]]:
    """For each tiny file: our tokenizer and transformers', each built once."""
    transformers = pytest.importorskip("transformers")
    pairs = {}
    for name, path in sp_files.items():
        ours = tokenizer_from_gguf(GGUFFile(path).metadata)
        theirs = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        pairs[name] = (ours, theirs)
    return pairs


@pytest.mark.parametrize("variant", list(SP_VARIANTS))
def test_sentencepiece_ids_match_transformers(sp_pairs, variant):
    ours, theirs = sp_pairs[variant]
    for text in SP_TEXTS:
        assert ours.tokenizer.encode(text).ids == theirs(text)["input_ids"], text
        plain = ours.tokenizer.encode(text, add_special_tokens=False).ids
        assert plain == theirs(text, add_special_tokens=False)["input_ids"], text


@pytest.mark.parametrize("variant", list(SP_VARIANTS))
def test_sentencepiece_decode_matches_transformers(sp_pairs, variant):
    ours, theirs = sp_pairs[variant]
    for text in SP_TEXTS:
        ids = ours.tokenizer.encode(text).ids
        assert ours.tokenizer.decode(ids) == theirs.decode(ids, skip_special_tokens=True), text
    for text in ["Hello world", "héllo wörld ñ 日本 😀", "the  world\n\nis it"]:
        assert ours.tokenizer.decode(ours.tokenizer.encode(text).ids) == text


@pytest.mark.parametrize("variant", list(SP_VARIANTS))
def test_sentencepiece_added_tokens_match_transformers(sp_pairs, variant):
    """Same tokens matched whole, with the same ids and the same special flag."""
    ours, theirs = sp_pairs[variant]
    vocab_size = ours.tokenizer.get_vocab_size(with_added_tokens=False)
    expected = {
        index: (token.content, token.special)
        for index, token in theirs.backend_tokenizer.get_added_tokens_decoder().items()
        # transformers also adds its tokenizer class's default specials when the vocabulary
        # lacks them, with ids past its end; we add none of those.
        if index < vocab_size
    }
    got = {
        index: (token.content, token.special)
        for index, token in ours.tokenizer.get_added_tokens_decoder().items()
    }
    assert got == expected


def test_sentencepiece_flags(sp_pairs):
    llama, theirs = sp_pairs["llama"]
    assert (llama.add_bos, llama.add_eos, llama.bos_token_id, llama.eos_token_id) == (
        True, False, 1, 2,
    )  # fmt: skip
    assert llama.tokenizer.encode("Hello").ids[0] == 1
    assert theirs.add_bos_token is True

    no_key, theirs = sp_pairs["llama-eos-no-bos-key"]
    assert (no_key.add_bos, no_key.add_eos) == (True, True)
    ids = no_key.tokenizer.encode("Hello").ids
    assert ids[0] == 1 and ids[-1] == 2

    gemma, _ = sp_pairs["gemma3"]
    assert (gemma.bos_token_id, gemma.eos_token_id, gemma.pad_token_id) == (2, 1, 0)
    # No prefix space for Gemma, and its real-space tokens are found.
    assert gemma.tokenizer.encode("  x", add_special_tokens=False).tokens == ["▁▁", "x"]


def test_sentencepiece_space_prefix_can_be_turned_off(sp_files):
    """A file saying `add_space_prefix = false` gets none (llama.cpp's and SentencePiece's way)."""
    meta = GGUFFile(sp_files["llama"]).metadata
    with_prefix = tokenizer_from_gguf(meta).tokenizer
    without = tokenizer_from_gguf({**meta, "tokenizer.ggml.add_space_prefix": False}).tokenizer
    assert with_prefix.encode("Hello", add_special_tokens=False).tokens == ["▁Hello"]
    assert without.encode("Hello", add_special_tokens=False).tokens == ["H", "ell", "o"]
    assert without.decode(without.encode(" Hello world").ids) == " Hello world"


def test_gguf_metadata_reads_every_value_type(sp_files):
    reader = gguf.GGUFReader(sp_files["gemma3"])
    meta = GGUFFile(sp_files["gemma3"]).metadata
    assert _as_lists(meta) == {name: field.contents() for name, field in reader.fields.items()
                               if not name.startswith("GGUF.")}
    assert meta["tokenizer.ggml.scores"].dtype == np.float32
    assert meta["tokenizer.ggml.token_type"][:3].tolist() == [int(TT.CONTROL)] * 3
    assert meta["tokenizer.ggml.add_space_prefix"] is False
    assert meta["tokenizer.ggml.tokens"][2] == "<bos>"


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def test_unsupported_tokenizer_model_is_named():
    meta = {"tokenizer.ggml.model": "rwkv", "tokenizer.ggml.tokens": ["a", "b"]}
    with pytest.raises(ValueError, match="rwkv") as error:
        tokenizer_from_gguf(meta)
    for name in SUPPORTED_TOKENIZER_MODELS:
        assert repr(name) in str(error.value)


def test_missing_tokens_is_an_error():
    with pytest.raises(ValueError, match="tokenizer.ggml.tokens"):
        tokenizer_from_gguf({"tokenizer.ggml.model": "gpt2"})


def _merges_reference(vocab, scores):
    """Every cut of every token, as transformers' `generate_merges` ranks them (the longhand
    loop without bounds)."""
    ranked = scores if scores is not None else vocab
    merges = []
    for token, rank in ranked.items():
        local = [(token[:c], token[c:], rank) for c in range(1, len(token))
                 if token[:c] in vocab and token[c:] in vocab]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=scores is not None)
    return [(a, b) for a, b, _ in merges]


@pytest.mark.parametrize("with_scores", [True, False])
def test_merges_from_scores_bounded_cuts_give_every_merge(with_scores):
    rng = np.random.default_rng(0)
    alphabet = list("abcde")
    tokens = sorted({"".join(rng.choice(alphabet, size=int(rng.integers(1, 7))))
                     for _ in range(400)} | set(alphabet))
    tokens.append("abcdeabcdeabcdeab")  # one longest token, as the bound has a case for
    vocab = {t: i for i, t in enumerate(tokens)}
    scores = {t: float(rng.normal()) for t in tokens} if with_scores else None
    assert gguf_tokenizer._merges_from_scores(vocab, scores) == _merges_reference(vocab, scores)


def test_one_very_long_token_does_not_make_merges_quadratic():
    vocab = {c: i for i, c in enumerate("abcdefgh")}
    vocab["ab" * 200_000] = len(vocab)  # 400k characters: the unbounded loop slices it 400k times
    start = time.perf_counter()
    merges = gguf_tokenizer._merges_from_scores(vocab, None)
    assert time.perf_counter() - start < 5.0
    assert merges == []  # no two of its letters make a token of the vocabulary
