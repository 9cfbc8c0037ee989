"""The embedding front end: where an embedding request becomes token ids, and vectors become a
response.

`resolve` validates a request's settings and merges them with the server's and the model's
defaults; `prepare` validates its input and tokenizes it (with the prompt it asks for, placed as
sentence-transformers places it: in front of the text, or as a system message where the model's
texts go through its chat template); `response` applies the model's Dense modules, `dimensions`
and normalization, and encodes the vectors. It knows the tokenizer and the model's description,
nothing of steps, queues or devices.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from jaxembed.config import ModelConfig
from jaxembed.errors import InvalidRequestError, ModelNotFoundError
from jaxembed.inputs import InputProcessor, check_text, enum_value, first, is_int
from jaxembed.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    EmbeddingData,
    EmbeddingDefaults,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingType,
    EncodingFormat,
    InputType,
    TokenizeRequest,
    TokenizeResponse,
    Usage,
    encode_vector,
    split_input,
)
from jaxembed.st_config import MessageInputs, SentenceTransformersConfig

DEFAULT_ALIAS = "default"
# Two stand-in texts that begin with different tokens and end with different tokens: the tokens a
# rendered input shares with both renders around them are the chat template's, not the text's.
FRAME_PROBES = ("0", "1 2 3 4")
FRAME_CACHE_SIZE = 256  # prompts whose probes are kept

# Instruction templates per family, as the instruction-tuned embedding models of each were trained
# (Qwen3-Embedding; gte-Qwen2 and e5-mistral; EmbeddingGemma). `{instruction}` is the request's
# text and `{text}` the input, which must end the template: what comes before it is the prompt.
INSTRUCTION_TEMPLATES = {
    "qwen3": "Instruct: {instruction}\nQuery:{text}",
    "qwen2": "Instruct: {instruction}\nQuery: {text}",
    "mistral": "Instruct: {instruction}\nQuery: {text}",
    "gemma3": "task: {instruction} | query: {text}",
}
# The names a model's prompts go by for each input type, in order of preference.
INPUT_TYPE_PROMPTS = {
    InputType.Query: ("query",),
    InputType.Document: ("document", "passage", "doc", "corpus"),
}


@dataclasses.dataclass(frozen=True)
class PreparedInput:
    """Validated token ids for one request, the prompt included."""

    sequences: list[np.ndarray]
    skip: list[int] | None = None  # prompt tokens to leave out of each sequence's pooling
    # Per input, how many consecutive sequences (windows) hold it; None: one each.
    windows: list[int] | None = None

    @property
    def prompt_tokens(self) -> int:
        return sum(len(s) for s in self.sequences)

    def combine(self, vectors: np.ndarray, pooling: EmbeddingType) -> np.ndarray:
        """One pooled vector an input from one a sequence [S, D] -> [inputs, D]: an input's
        windows combine as vLLM's chunked processing does; the mean is weighted by each
        window's pooled tokens (each token is pooled in one window only), so it is the mean
        of every token's state; 'last' takes the last window's, 'cls' the first's."""
        if self.windows is None:
            return vectors
        out, at = [], 0
        skip = self.skip or [0] * len(self.sequences)
        for n in self.windows:
            part = vectors[at : at + n]
            if pooling == EmbeddingType.Mean:
                w = np.array([max(len(self.sequences[j]) - skip[j], 0)
                              for j in range(at, at + n)], np.float64)
                out.append((part * w[:, None]).sum(0) / max(w.sum(), 1.0))
            else:
                out.append(part[0] if pooling == EmbeddingType.Cls else part[-1])
            at += n
        return np.stack(out).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class EmbeddingOptions:
    """A request's settings once validated and merged with the server's defaults."""

    model: str
    pooling: EmbeddingType
    normalize: bool
    truncate: int | None  # keep the last this many tokens; None: refuse over-long inputs
    dimensions: int | None
    encoding_format: EncodingFormat
    prompt: str | None = None  # prepended to each text input
    chunked: bool = False  # inputs past the limit in windows, not refused


class EmbeddingFrontend:
    def __init__(self, inputs: InputProcessor, config: ModelConfig, *, model_name: str,
                 max_model_len: int, served_model_names: Sequence[str] | None = None,
                 sentence_transformers: SentenceTransformersConfig | None = None,
                 defaults: EmbeddingDefaults | None = None,
                 instruction_template: str | None = None,
                 max_request_tokens: int | None = None, chunk_overlap: int = 0) -> None:
        """sentence_transformers: the folder's configuration, which says how the model is meant
        to be used; its settings are the model's defaults (a plain causal LM has none: mean
        pooling, no normalization)."""
        self.inputs, self.config = inputs, config
        st = sentence_transformers
        self.sentence_transformers = st
        # Where set, each text is rendered as a chat through the template before tokenizing.
        self.message: MessageInputs | None = st.message if st else None
        self.model_defaults = EmbeddingDefaults(
            embedding_type=st.pooling, normalize=st.normalize,
            prompt_name=st.default_prompt_name) if st else EmbeddingDefaults()
        if st and st.dense and st.dense[0].in_features != config.hidden_size:
            raise ValueError(f"the first Dense module takes {st.dense[0].in_features} features, "
                             f"but the model's hidden size is {config.hidden_size}")
        if st and st.pooling == EmbeddingType.Cls and config.causal:
            raise ValueError("the model's pooling is 'cls', which needs bidirectional attention, "
                             "but the model is causal; serve it with bidirectional attention")
        template = instruction_template or INSTRUCTION_TEMPLATES.get(config.family)
        if template is not None and not template.endswith("{text}"):
            raise ValueError(f"an instruction template must end with '{{text}}'; got {template!r}")
        self.instruction_template = template
        self.max_model_len = max_model_len
        self.max_request_tokens = max_request_tokens
        if not 0 <= chunk_overlap < max_model_len // 2:
            raise ValueError(f"a chunk overlap must be between 0 and half the context "
                             f"({max_model_len // 2 - 1}); got {chunk_overlap}")
        self.chunk_overlap = chunk_overlap
        self.served_model_names = list(served_model_names or [model_name])
        self.defaults = defaults or EmbeddingDefaults()
        self._prompt_lengths: dict[str, int] = {}
        self._frame_probes: dict[str | None, list[list[int]]] = {}
        try:  # the defaults go through the same checks as a request's own values
            self.resolve(EmbeddingRequest(input="x"))
        except InvalidRequestError as e:
            raise ValueError(f"bad server default: {e.message}") from None

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def embedding_size(self) -> int:
        """The size of the vectors served: the hidden size, or the last Dense module's output."""
        st = self.sentence_transformers
        return st.output_size(self.hidden_size) if st else self.hidden_size

    @property
    def is_causal(self) -> bool:
        """Whether each token sees only the tokens before it (decoders); bidirectional models
        (EmbeddingGemma) see the whole input from every token, which makes `cls` meaningful."""
        return bool(self.config.causal)

    @property
    def prompts(self) -> dict[str, str]:
        """The model's named prompts (from its sentence-transformers configuration)."""
        return dict(self.sentence_transformers.prompts) if self.sentence_transformers else {}

    def resolve_model(self, name: str | None) -> str:
        """The served name a request's `model` refers to; `default` aliases the served model."""
        if name is None or name == DEFAULT_ALIAS or name in self.served_model_names:
            return self.model_name
        raise ModelNotFoundError(
            f"the model {name!r} is not served here; use one of "
            f"{[*self.served_model_names, DEFAULT_ALIAS]}", param="model")

    def resolve(self, request: EmbeddingRequest) -> EmbeddingOptions:
        """Validate the request's settings (not its input) and fill in the server's defaults.

        Precedence for each extension: the request's value, then the server's default, then the
        model's (its sentence-transformers configuration), then the built-in one (mean pooling,
        no normalization, no truncation, no prompt)."""
        d, md = self.defaults, self.model_defaults
        name = self.resolve_model(request.model)
        fmt = enum_value(EncodingFormat, request.encoding_format, "encoding_format")
        pooling = enum_value(EmbeddingType, first(request.embedding_type, d.embedding_type,
                                              md.embedding_type, EmbeddingType.Mean),
                        "embedding_type")
        if pooling == EmbeddingType.Cls and self.is_causal:
            raise InvalidRequestError(
                f"'embedding_type' 'cls' needs a bidirectional model, and {self.model_name} is a "
                "causal decoder: its first token sees only itself, so its state says nothing "
                "about the rest of the input; use 'mean' or 'last'", param="embedding_type",
                code="unsupported_value")
        normalize = first(request.normalize, d.normalize, md.normalize, False)
        if pooling == EmbeddingType.None_:
            # Every token's final hidden state, as it is (the model's Dense modules and its
            # normalization are for pooled vectors): what llama.cpp's pooling "none" returns.
            normalize = first(request.normalize, False)
            if fmt != EncodingFormat.Float:
                raise InvalidRequestError(
                    "'embedding_type' 'none' returns a vector a token, as nested lists of floats;"
                    f" 'encoding_format' {fmt.value!r} encodes one vector an input: use 'float'",
                    param="encoding_format", code="unsupported_value")
            if request.dimensions is not None:
                raise InvalidRequestError(
                    "'dimensions' cuts a pooled vector; 'embedding_type' 'none' returns every "
                    "token's whole hidden state: leave 'dimensions' out", param="dimensions",
                    code="unsupported_value")
        if not isinstance(normalize, bool):
            raise InvalidRequestError(
                f"'normalize' must be true or false; got {normalize!r}", param="normalize",
                code="invalid_type")
        dims = request.dimensions
        if dims is not None and (not is_int(dims) or not 1 <= dims <= self.embedding_size):
            raise InvalidRequestError(
                f"'dimensions' must be between 1 and {self.embedding_size} for this model; "
                f"got {dims!r}", param="dimensions")
        supported = self.supported_dimensions
        if dims is not None and supported and dims not in supported:
            raise InvalidRequestError(
                f"'dimensions' {dims} is not a size {self.model_name} was trained to give; use "
                f"one of {list(supported)}", param="dimensions", code="unsupported_value")
        truncate = first(request.truncate_prompt_tokens, d.truncate_prompt_tokens, None)
        if truncate is not None:
            if not is_int(truncate) or not (truncate == -1 or 1 <= truncate <= self.max_model_len):
                raise InvalidRequestError(
                    "'truncate_prompt_tokens' must be -1 (this model's limit of "
                    f"{self.max_model_len} tokens) or between 1 and {self.max_model_len}; "
                    f"got {truncate!r}", param="truncate_prompt_tokens")
            truncate = self.max_model_len if truncate == -1 else int(truncate)
        prompt = self._resolve_prompt(request)
        asked = next((f for f in ("instruction", "prompt_name", "input_type")
                      if getattr(request, f) is not None), None)
        if prompt is not None and asked is not None and _is_token_input(request.input):
            raise InvalidRequestError(
                f"'{asked}' adds a prompt to text, but 'input' is token ids, which are fed as "
                f"they are; send the input as text, or tokenize the prompt into the ids yourself "
                f"and leave '{asked}' out", param=asked, code="unsupported_value")
        chunked = first(request.chunked, d.chunked, False)
        if not isinstance(chunked, bool):
            raise InvalidRequestError(f"'chunked' must be true or false; got {chunked!r}",
                                      param="chunked", code="invalid_type")
        if chunked and pooling == EmbeddingType.None_ and request.chunked:
            raise InvalidRequestError(
                "'chunked' combines the windows of a long input into one vector; "
                "'embedding_type' 'none' returns no pooled vector: leave one of them out",
                param="chunked", code="unsupported_value")
        return EmbeddingOptions(name, pooling, normalize, truncate,
                                None if dims is None else int(dims), fmt, prompt,
                                chunked and pooling != EmbeddingType.None_)

    @property
    def supported_dimensions(self) -> tuple[int, ...]:
        """The Matryoshka sizes the model declares (its full size included); empty: any size."""
        st = self.sentence_transformers
        if not st or not st.matryoshka_dimensions:
            return ()
        return tuple(sorted({*st.matryoshka_dimensions, self.embedding_size}))

    def _resolve_prompt(self, request: EmbeddingRequest | TokenizeRequest) -> str | None:
        """The prompt text for a request: its own `instruction`, `prompt_name` or `input_type`
        (at most one), else the server's default, else the model's default prompt."""
        given = [f for f in ("instruction", "prompt_name", "input_type")
                 if getattr(request, f) is not None]
        if len(given) > 1:
            raise InvalidRequestError(
                f"send at most one of 'instruction', 'prompt_name' and 'input_type'; got {given}",
                param=given[1])
        if request.instruction is not None:
            return self._instruction_prompt(request.instruction)
        if request.prompt_name is not None:
            return self._named_prompt(request.prompt_name, "prompt_name")
        if request.input_type is not None:
            return self._input_type_prompt(request.input_type, "input_type")
        d, md = self.defaults, self.model_defaults
        if d.input_type is not None:
            return self._input_type_prompt(d.input_type, "input_type")
        name = first(d.prompt_name, md.prompt_name)
        return None if name is None else self._named_prompt(name, "prompt_name")

    def _instruction_prompt(self, instruction: object) -> str:
        if not isinstance(instruction, str) or not instruction.strip():
            raise InvalidRequestError("'instruction' must be a non-empty string",
                                      param="instruction", code="invalid_value")
        check_text(instruction, "instruction")
        if self.instruction_template is None:
            names = f"; use 'prompt_name' with one of {sorted(self.prompts)}" if self.prompts else ""
            raise InvalidRequestError(
                f"{self.model_name} has no known instruction template ({self.config.family} "
                f"models have none), so 'instruction' cannot be placed{names}", param="instruction",
                code="unsupported_value")
        return self.instruction_template[: -len("{text}")].replace("{instruction}", instruction)

    def _named_prompt(self, name: object, param: str) -> str | None:
        if not isinstance(name, str):
            raise InvalidRequestError(f"'{param}' must be a string; got {name!r}", param=param,
                                      code="invalid_type")
        if name == "":  # explicitly none, even where the model has a default prompt
            return None
        if name not in self.prompts:
            known = (f"one of {sorted(self.prompts)}" if self.prompts
                     else "none: this model declares no prompts")
            raise InvalidRequestError(f"'{param}' {name!r} is not one of this model's prompts; "
                                      f"they are {known}", param=param, code="invalid_value")
        return self.prompts[name] or None

    def _input_type_prompt(self, kind: object, param: str) -> str | None:
        """The model's prompt for that kind of input; none if the model has no such prompt
        (documents usually have none)."""
        kind = enum_value(InputType, kind, param)
        name = next((n for n in INPUT_TYPE_PROMPTS[kind] if n in self.prompts), None)
        if name is None:
            return None
        return self.prompts[name] or None

    def token_ids(self, texts: Sequence[str], prompt: str | None = None,
                  add_special_tokens: bool = True) -> list[list[int]]:
        """Token ids of texts as the model is fed them, the prompt placed as sentence-transformers
        places it: in front of each text; or, where the model's texts go through its chat
        template, in a system message before the text's user message. The template writes the
        special tokens itself, so none are added to a rendered text (`add_special_tokens` is
        then moot)."""
        if self.message is None:
            return self.inputs.tokenize([prompt + t for t in texts] if prompt else texts,
                                        add_special_tokens)
        try:
            rendered = [self.message.render(t, prompt) for t in texts]
        except InvalidRequestError as e:  # the template's refusal, about this input
            raise InvalidRequestError(
                f"{self.model_name} embeds text as a chat message, and its chat template failed "
                f"on this input: {e.message}", param="input", code=e.code) from None
        return self.inputs.tokenize(rendered, add_special_tokens=False)

    def _truncate_chat(self, ids: list[int], keep: int, prompt: str | None) -> list[int]:
        """The last `keep` tokens of a rendered input with the tokens the chat template wrote
        around the text kept in place (as `InputProcessor.truncate` keeps BOS and EOS): the text
        loses its beginning, the conversation keeps its prompt and its end of turn. The
        template's tokens are those the input shares with the same chat around each probe."""
        probes = self._frame_probes.get(prompt)
        if probes is None:
            if len(self._frame_probes) >= FRAME_CACHE_SIZE:  # instructions are free text
                self._frame_probes.clear()
            probes = self._frame_probes[prompt] = self.token_ids(FRAME_PROBES, prompt)
        head = min(_shared_prefix(ids, p) for p in probes)
        tail = min(min(_shared_prefix(ids[::-1], p[::-1]) for p in probes), len(ids) - head)
        body = keep - head - tail
        if body < 1:
            raise InvalidRequestError(
                f"'truncate_prompt_tokens' {keep} leaves no room for text beside the {head + tail} "
                f"tokens this model's chat template places around it; use at least "
                f"{head + tail + 1}", param="truncate_prompt_tokens")
        end = len(ids) - tail
        return ids[:head] + ids[end - body : end] + ids[end:]

    def prompt_length(self, prompt: str) -> int:
        """Tokens of the prompt at the start of a prompted input, as sentence-transformers counts
        them: the prompt tokenized alone, less a special token the tokenizer appends (EOS)."""
        n = self._prompt_lengths.get(prompt)
        if n is None:
            ids = self.inputs.tokenize([prompt])[0]
            n = len(ids) - (1 if ids and ids[-1] in self.inputs.special_ids else 0)
            self._prompt_lengths[prompt] = n
        return n

    def tokenize_request(self, request: TokenizeRequest) -> TokenizeResponse:
        """`/tokenize`: the ids the embedding path would feed for the prompt, untruncated: with
        the instruction or named prompt it would place (the request's, else the defaults)."""
        self.resolve_model(request.model)
        if not isinstance(request.prompt, str):
            raise InvalidRequestError(f"'prompt' must be a string; got {type(request.prompt).__name__}",
                                      param="prompt", code="invalid_type")
        check_text(request.prompt, "prompt")
        prompt = self._resolve_prompt(request)
        ids = self.token_ids([request.prompt], prompt, bool(request.add_special_tokens))[0]
        return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=self.max_model_len)

    def detokenize_request(self, request: DetokenizeRequest) -> DetokenizeResponse:
        """`/detokenize`: the text of token ids, special tokens included."""
        self.resolve_model(request.model)
        ids = request.tokens
        if not isinstance(ids, list | tuple) or not all(is_int(t) for t in ids):
            raise InvalidRequestError("'tokens' must be a list of token ids (integers)",
                                      param="tokens", code="invalid_type")
        self.inputs.check_vocab(ids, "tokens")
        return DetokenizeResponse(prompt=self.inputs.detokenize(ids))

    def prepare(self, raw: object, truncate: int | None = None, prompt: str | None = None,
                chunked: bool = False) -> PreparedInput:
        """Validate an `input` value and turn it into token-id sequences, each cut to its last
        `truncate` tokens when given (keeping the special tokens the tokenizer adds).

        A prompt is placed with text inputs as sentence-transformers places it (`token_ids`);
        token-id inputs are fed as they are. Where the model leaves prompts out of its pooling
        (text in front of the input only: sentence-transformers pools a system message's tokens),
        the prompt's tokens still kept after truncation are marked to be skipped. A rendered
        input is cut inside its text, the chat template's tokens around it kept.

        `chunked`: an input still past the model's limit becomes windows of the limit's length,
        each after the first starting `chunk_overlap` tokens early, those tokens attending as
        context but left out of its pooling (`PreparedInput.combine` joins them)."""
        texts, seqs = split_input(raw)
        prompt_tokens = 0
        if texts is not None:
            for i, t in enumerate(texts):
                if not t:
                    raise InvalidRequestError(
                        f"input[{i}] is an empty string; send non-empty text", param="input",
                        code="empty_input")
                check_text(t, f"input[{i}]")
            if prompt and self.message is None:
                prompt_tokens = self.prompt_length(prompt)
            seqs = self.token_ids(texts, prompt)
        assert seqs is not None
        rendered = texts is not None and self.message is not None
        st = self.sentence_transformers
        exclude = bool(prompt_tokens) and st is not None and not st.include_prompt
        out, skip, windows = [], [], []
        for i, ids in enumerate(seqs):
            if not ids:
                raise InvalidRequestError(f"input[{i}] has no tokens; send at least one",
                                          param="input", code="empty_input")
            self.inputs.check_vocab(ids, f"input[{i}]")
            left_out = prompt_tokens
            if truncate is not None and len(ids) > truncate and rendered:
                ids = self._truncate_chat(ids, truncate, prompt)
            elif truncate is not None and len(ids) > truncate:
                head = self.inputs.kept_prefix(ids)
                removed = len(ids) - truncate
                ids = self.inputs.truncate(ids, truncate)
                # The cut takes the tokens right after the kept special prefix: the prompt's.
                left_out = head + max(0, prompt_tokens - head - removed) if prompt_tokens else 0
            if len(ids) > self.max_model_len and chunked:
                parts = self._windows(ids)
                windows.append(len(parts))
                for k, (part, head) in enumerate(parts):
                    out.append(np.asarray(part, dtype=np.int32))
                    skip.append((left_out if exclude else 0) if k == 0 else head)
                continue
            windows.append(1)
            skip.append(left_out if exclude else 0)
            if len(ids) > self.max_model_len:
                raise InvalidRequestError(
                    f"input[{i}] has {len(ids)} tokens, more than this model's limit of "
                    f"{self.max_model_len}; shorten it, split it, or send "
                    "'truncate_prompt_tokens' to keep its end", param="input",
                    code="context_length_exceeded")
            out.append(np.asarray(ids, dtype=np.int32))
        prepared = PreparedInput(out, skip if any(skip) else None,
                                 windows if len(windows) < len(out) else None)
        if self.max_request_tokens is not None and prepared.prompt_tokens > self.max_request_tokens:
            raise InvalidRequestError(
                f"the input has {prepared.prompt_tokens} tokens in all, more than this server's "
                f"limit of {self.max_request_tokens} per request; split it into several requests",
                param="input", code="request_too_large")
        return prepared

    def _windows(self, ids: list[int]) -> list[tuple[list[int], int]]:
        """An over-long input as (window, its leading tokens already pooled in the window
        before): windows of the context's length, each after the first starting `overlap`
        tokens before the previous one's end."""
        size, overlap = self.max_model_len, self.chunk_overlap
        out, end = [(list(ids[:size]), 0)], size
        while end < len(ids):
            start = end - overlap
            out.append((list(ids[start : start + size]), overlap))
            end = start + size
        return out

    def finish(self, options: EmbeddingOptions, vectors: np.ndarray | list[np.ndarray]
               ) -> np.ndarray | list[np.ndarray]:
        """Run the model's Dense modules (float32), cut to `dimensions`, then normalize if asked:
        a cut vector is re-normalized. Token states (pooling "none", a [tokens, D] array an
        input) are only normalized, each, if asked."""
        if options.pooling == EmbeddingType.None_:
            return [_normalized(v) if options.normalize else v for v in vectors]
        if self.sentence_transformers is not None:
            vectors = self.sentence_transformers.project(vectors)
        if options.dimensions is not None:
            vectors = vectors[:, : options.dimensions]
        return _normalized(vectors) if options.normalize else vectors

    def response(self, options: EmbeddingOptions, prepared: PreparedInput,
                 vectors: np.ndarray | list[np.ndarray]) -> EmbeddingResponse:
        """The response of one vector a sequence (windows combined first); usage counts every
        token run, a window's overlap included."""
        if options.pooling != EmbeddingType.None_:
            vectors = prepared.combine(np.asarray(vectors), options.pooling)
        vectors = self.finish(options, vectors)
        data = [EmbeddingData(embedding=v.tolist() if v.ndim == 2 else
                              encode_vector(v, options.encoding_format), index=i)
                for i, v in enumerate(vectors)]
        n = prepared.prompt_tokens
        return EmbeddingResponse(data=data, model=options.model,
                                 usage=Usage(prompt_tokens=n, total_tokens=n))


def _normalized(vectors: np.ndarray) -> np.ndarray:
    """Each row [..., D] scaled to unit L2 norm (a zero row stays zero)."""
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norms, np.finfo(np.float32).tiny)


def _shared_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading items two sequences share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _is_token_input(raw: object) -> bool:
    """Whether an `input` holds token ids (a list of ids, or of lists of ids), not text."""
    return isinstance(raw, list | tuple) and len(raw) > 0 and (
        is_int(raw[0]) or isinstance(raw[0], list | tuple))
