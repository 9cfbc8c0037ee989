"""sentence-transformers 6 folders whose texts go through the chat template, checked against it.

sentence-transformers 6 saves `modality_config` in `sentence_bert_config.json`. Where it lists a
`message` modality (it does whenever the tokenizer has a chat template), it sends every text as a
user message through the model's chat template, with a prompt as a system message before it, and
tokenizes the rendering without adding special tokens. Each folder here is saved by
sentence-transformers itself from a tiny random decoder (Qwen3- and Llama-shaped, with a small
trained tokenizer whose post-processor adds EOS or BOS, so that adding special tokens to a rendered
chat shows): with a flat template, a structured one, "auto" with template kwargs, and without a
template (plain text, as before). Our vectors and token ids must match sentence-transformers'.
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

from jaxembed import EmbeddingRequest, Engine, EngineBuilder, InvalidRequestError
from jaxembed.config import UnsupportedModelError
from jaxembed.protocol import TokenizeRequest
from jaxembed.st_config import read_sentence_transformers
from jaxembed.weights.errors import WeightLoadError

from parity import cosine

COSINE_MIN = 0.9999
TEXTS = [
    "hello world",
    "The quick brown fox jumps over the lazy dog. " * 6,  # a long one: few step shapes to compile
    "a",
    "def add(a, b):\n    return a + b\n",
    "Naïve café résumé — déjà vu. 日本語 🙂🚀",
]
TASK = "Given a web search query, retrieve relevant passages"
PROMPTS = {"query": f"Instruct: {TASK}\nQuery:", "document": "", "short": "search: "}
EOS, BOS = "<|endoftext|>", "<|im_start|>"

# A ChatML template reading `content` as a string: sentence-transformers infers "flat".
FLAT_TEMPLATE = (
    "{%- for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}"
    "<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n"
    "{%- if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
    "{%- endif %}{%- endif %}")
# One that walks typed content parts: inferred "structured".
STRUCTURED_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endfor %}")
# A Llama-style one that writes BOS itself (the tokenizer's post-processor would add it again).
BOS_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}[{{ message['role'] | upper }}] "
    "{{ message['content'] | trim }}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}[ASSISTANT]{% if enable_thinking is false %} (no thinking)"
    "{% endif %}{% endif %}")


# ---- building folders with sentence-transformers ----------------------------------------------


def add_special(folder: Path, where: str) -> None:
    """Make tokenizer.json's post-processor add a special token: EOS after the text (as
    Qwen3-Embedding's does) or BOS before it (as Llama's does)."""
    path = folder / "tokenizer.json"
    tok = json.loads(path.read_text())
    token = EOS if where == "eos" else BOS
    token_id = next(a["id"] for a in tok["added_tokens"] if a["content"] == token)
    special = {"SpecialToken": {"id": token, "type_id": 0}}
    seq = [{"Sequence": {"id": "A", "type_id": 0}}]
    single = [*seq, special] if where == "eos" else [special, *seq]
    tok["post_processor"] = {
        "type": "TemplateProcessing", "single": single,
        "pair": single + [{"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {token: {"id": token, "ids": [token_id], "tokens": [token]}}}
    path.write_text(json.dumps(tok))


def base_model(folder: Path, family: str, seed: int, special: str, template: str | None) -> Path:
    """A tiny random decoder with its tokenizer as transformers saves it (chat template or not)."""
    from transformers import PreTrainedTokenizerFast

    F.build_family(family, folder, seed=seed)
    add_special(folder, special)
    tok = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), eos_token=EOS,
                                  pad_token=EOS, bos_token=BOS)
    if template is not None:
        tok.chat_template = template
    tok.save_pretrained(folder)
    return folder


def save_with_st(base: Path, out: Path, *, pooling: str, include_prompt: bool = True,
                 default_prompt_name: str | None = None, message_format: str | None = None,
                 processing_kwargs: dict[str, Any] | None = None) -> Path:
    """A SentenceTransformer built from modules over `base`, saved by sentence-transformers.
    message_format: given, the modality config is set by hand with that message format (else
    sentence-transformers infers it, and lists `message` only if there is a chat template)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    kwargs: dict[str, Any] = {"processing_kwargs": processing_kwargs}
    if message_format is not None:
        forward = {"method": "forward", "method_output_name": "last_hidden_state"}
        kwargs["modality_config"] = {"text": forward,
                                     "message": {**forward, "format": message_format}}
        kwargs["module_output_name"] = "token_embeddings"
    transformer = Transformer(str(base), **kwargs)
    pool = Pooling(transformer.get_embedding_dimension(), pooling_mode=pooling,
                   include_prompt=include_prompt)
    model = SentenceTransformer(modules=[transformer, pool, Normalize()], prompts=PROMPTS,
                                default_prompt_name=default_prompt_name, device="cpu")
    model.save(str(out))
    return out


def bert_config(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "sentence_bert_config.json").read_text())


def edit_bert_config(folder: Path, **changes: Any) -> None:
    cfg = bert_config(folder)
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (folder / "sentence_bert_config.json").write_text(json.dumps(cfg))


# Each folder: how it is built, and the message format sentence-transformers uses for it.
FOLDERS = {
    # Qwen3-Embedding's recipe (last token, EOS appended by the tokenizer), a ChatML template.
    "qwen3-flat": (dict(family="qwen3", seed=3, special="eos", template=FLAT_TEMPLATE),
                   dict(pooling="lasttoken"), "flat"),
    # Structured content, mean pooling that would leave text prompts out, a default prompt.
    "qwen3-structured": (dict(family="qwen3", seed=4, special="eos", template=STRUCTURED_TEMPLATE),
                         dict(pooling="mean", include_prompt=False, default_prompt_name="short"),
                         "structured"),
    # "auto" in the saved config, a template writing BOS, and template kwargs in the config.
    "llama-auto": (dict(family="llama", seed=5, special="bos", template=BOS_TEMPLATE),
                   dict(pooling="lasttoken", message_format="auto", processing_kwargs={
                       "chat_template": {"add_generation_prompt": True, "enable_thinking": False,
                                         "restore_suffix": True}}), "flat"),
    # No chat template: sentence-transformers 6 lists text only; the prompt goes in front.
    "llama-text": (dict(family="llama", seed=6, special="bos", template=None),
                   dict(pooling="mean", include_prompt=False, default_prompt_name="query"), None),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("st6")
    out = {}
    for name, (base_kw, st_kw, _) in FOLDERS.items():
        base = base_model(root / f"{name}-base", **base_kw)
        out[name] = save_with_st(base, root / name, **st_kw)
    return out


@pytest.fixture(scope="module", params=list(FOLDERS))
def served(request: pytest.FixtureRequest, folders: dict[str, Path]
           ) -> Iterator[tuple[str, Engine, Any]]:
    from sentence_transformers import SentenceTransformer

    folder = folders[request.param]
    engine = EngineBuilder(model=folder, dtype="float32", max_batch_tokens=512, warmup=False,
                           progress=False, compilation_cache=False).build()
    yield request.param, engine, SentenceTransformer(str(folder), device="cpu")
    engine.shutdown()


def embed(engine: Engine, inputs: Any, **fields: Any) -> np.ndarray:
    resp = engine.embed(EmbeddingRequest(input=inputs, **fields))
    return np.array([d.embedding for d in resp.data], dtype=np.float32)


def st_encode(model: Any, texts: list[str], **kwargs: Any) -> np.ndarray:
    return model.encode(texts, batch_size=len(texts), convert_to_numpy=True, **kwargs)


def assert_same(ours: np.ndarray, ref: np.ndarray) -> None:
    """Same direction; a text whose every token is prompt, left out of the mean, is zero in both
    (a one-letter text can merge into the prompt's last token)."""
    assert ours.shape == ref.shape
    zero = np.linalg.norm(ref, axis=-1) < 1e-6
    np.testing.assert_array_equal(np.linalg.norm(ours, axis=-1) < 1e-6, zero)
    cos = cosine(ours[~zero], ref[~zero])
    assert cos.min() > COSINE_MIN, f"cosine {np.round(cos, 4)} (min must be > {COSINE_MIN})"


def differs(ours: np.ndarray, ref: np.ndarray) -> bool:
    return bool(cosine(ours, ref).min() < COSINE_MIN)


# ---- parity with sentence-transformers 6 ------------------------------------------------------


def test_saved_modality_config_is_read(served):
    name, engine, model = served
    want = FOLDERS[name][2]
    saved = bert_config(engine.checkpoint.path).get("modality_config", {})
    assert ("message" in saved) == (want is not None)
    message = engine.embedding.sentence_transformers.message
    assert (message.format if message else None) == want == (
        model[0].input_formatter.message_format if "message" in model[0].modality_config
        else None)


def test_vectors_match_with_each_prompt(served):
    """The model's default prompt, named prompts, the empty prompt, a free prompt, and
    encode_query / encode_document (our input_type)."""
    name, engine, model = served
    assert_same(embed(engine, TEXTS), st_encode(model, TEXTS))  # the default prompt, if any
    for prompt_name in ("query", "short"):
        assert_same(embed(engine, TEXTS, prompt_name=prompt_name),
                    st_encode(model, TEXTS, prompt_name=prompt_name))
    assert_same(embed(engine, TEXTS, input_type="query"), model.encode_query(TEXTS))
    assert_same(embed(engine, TEXTS, input_type="document"), model.encode_document(TEXTS))
    if engine.config.family == "qwen3":  # the family's instruction template is a prompt too
        assert_same(embed(engine, TEXTS, instruction="Find code"),
                    st_encode(model, TEXTS, prompt="Instruct: Find code\nQuery:"))


def test_bare_text_is_not_what_sentence_transformers_embeds(served):
    """The control: where texts go through the template, the bare texts' ids (what the engine
    fed before it read `modality_config`) give other vectors."""
    name, engine, model = served
    bare = embed(engine, engine.inputs.tokenize(TEXTS))
    ref = st_encode(model, TEXTS, prompt_name="document")  # the empty prompt: no prompt at all
    assert differs(bare, ref) == (FOLDERS[name][2] is not None)


def test_token_ids_match_sentence_transformers(served):
    """/tokenize gives exactly the ids sentence-transformers feeds, and the embeddings route
    counts exactly those."""
    name, engine, model = served
    for prompt_name in (None, "query", "document"):
        prompt = model._resolve_prompt(None, prompt_name)
        want = []
        for text in TEXTS:
            ours = engine.tokenize_request(TokenizeRequest(prompt=text, prompt_name=prompt_name))
            want.append(model.preprocess([text], prompt=prompt)["input_ids"][0].tolist())
            assert ours.tokens == want[-1], (name, text, prompt_name)
        usage = engine.embed(EmbeddingRequest(input=TEXTS, prompt_name=prompt_name)).usage
        assert usage.prompt_tokens == sum(map(len, want))


def test_a_rendered_input_is_cut_inside_its_text(served):
    """Truncation keeps the template's tokens around the text (the system prompt, the end of the
    turn) and the end of the text."""
    name, engine, model = served
    if FOLDERS[name][2] is None:
        pytest.skip("texts without a chat template are cut as before")
    text, prompt = TEXTS[1].strip(), PROMPTS["query"]
    full = engine.tokenize_request(TokenizeRequest(prompt=text, prompt_name="query")).tokens
    # Where sentence-transformers' own rendering puts the text.
    formatter, kwargs = model[0].input_formatter, model[0].processing_kwargs.get("chat_template", {})
    messages = formatter.prepend_prompt_to_messages([formatter.to_message({"text": text})], prompt)
    rendered = model.tokenizer.apply_chat_template(
        messages[0], tokenize=False, **{k: v for k, v in kwargs.items() if k != "restore_suffix"})
    before, after = rendered.split(text)
    head = model.tokenizer(before, add_special_tokens=False)["input_ids"]
    tail = model.tokenizer(after, add_special_tokens=False)["input_ids"]
    assert full[: len(head)] == head and full[len(full) - len(tail):] == tail
    keep = len(head) + len(tail) + 5
    cut = engine.embedding.prepare(text, truncate=keep, prompt=prompt).sequences[0].tolist()
    assert cut == head + full[len(full) - len(tail) - 5:]
    with pytest.raises(InvalidRequestError, match="chat template places around it"):
        engine.embedding.prepare(text, truncate=len(head) + len(tail), prompt=prompt)


def test_older_folders_keep_text_inputs(folders, tmp_path):
    """A folder saved before sentence-transformers 6 (no modality_config) takes text as it is,
    even with a chat template: sentence-transformers 6 reads it so too."""
    from sentence_transformers import SentenceTransformer

    folder = shutil.copytree(folders["qwen3-flat"], tmp_path / "old")
    edit_bert_config(folder, modality_config=None, module_output_name=None,
                     transformer_task=None)
    assert read_sentence_transformers(folder).message is None
    model = SentenceTransformer(str(folder), device="cpu")
    assert "message" not in model[0].modality_config
    engine = EngineBuilder(model=folder, dtype="float32", max_batch_tokens=512, warmup=False,
                           progress=False, compilation_cache=False).build()
    try:
        assert_same(embed(engine, TEXTS, prompt_name="query"),
                    st_encode(model, TEXTS, prompt_name="query"))
    finally:
        engine.shutdown()


# ---- reading modality_config ------------------------------------------------------------------


def test_auto_format_follows_sentence_transformers_inference(folders, tmp_path):
    folder = shutil.copytree(folders["qwen3-structured"], tmp_path / "auto")
    message = {"method": "forward", "method_output_name": "last_hidden_state"}
    edit_bert_config(folder, modality_config={"text": message, "message": message})
    assert read_sentence_transformers(folder).message.format == "structured"  # the template
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt_oss"}))
    assert read_sentence_transformers(folder).message.format == "flat"  # its known model type


@pytest.mark.parametrize("change, error, match", [
    (dict(modality_config={"image": {"method": "forward",
                                     "method_output_name": "last_hidden_state"}}),
     UnsupportedModelError, "takes no text"),
    (dict(modality_config={"message": {"method": "get_text_features",
                                       "method_output_name": "pooler_output"}}),
     UnsupportedModelError, "get_text_features"),
    (dict(modality_config={"message": {"method": "forward", "method_output_name":
                                       "last_hidden_state", "format": "nested"}}),
     UnsupportedModelError, "'nested'"),
    (dict(processing_kwargs={"chat_template": {"continue_final_message": True}}),
     UnsupportedModelError, "continue_final_message"),
    (dict(processing_kwargs={"chat_template": {"messages": []}}),
     UnsupportedModelError, "'messages'"),
    (dict(modality_config=["message"]), WeightLoadError, "must map each modality"),
    (dict(processing_kwargs={"chat_template": "chatml"}), WeightLoadError, "must be an object"),
])
def test_bad_modality_configs_are_refused(folders, tmp_path, change, error, match):
    folder = shutil.copytree(folders["qwen3-flat"], tmp_path / "bad")
    edit_bert_config(folder, **change)
    with pytest.raises(error, match=match):
        read_sentence_transformers(folder)


def test_a_message_modality_without_a_chat_template_is_refused(folders, tmp_path):
    folder = shutil.copytree(folders["llama-text"], tmp_path / "no-template")
    forward = {"method": "forward", "method_output_name": "last_hidden_state"}
    edit_bert_config(folder, modality_config={"text": forward,
                                              "message": {**forward, "format": "flat"}})
    with pytest.raises(WeightLoadError, match="sentence_bert_config.json: .*chat template, but the folder has none"):
        read_sentence_transformers(folder)
