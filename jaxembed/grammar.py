"""Structured outputs: what a request constrains its text to, compiled by llguidance into a
matcher that gives, token by token, the set of tokens that keep the text valid.

llguidance is the grammar engine llama.cpp and vLLM use. It reads our `tokenizers` JSON as it
is, and fills numpy bitmasks (one bit a token, [B, ceil(V / 32)] int32), which the sampler
unpacks on the device. Measured on SmolLM2's 49,152 tokens with a 3-field JSON schema: 18 us a
token (median; 1.7 ms for the first). xgrammar measured 9 us but takes torch tensors and a
transformers tokenizer, which a JAX engine does not otherwise need.

Everything here runs on the host: a request's grammar is compiled (and refused with a 400 that
says why) by the front end; each choice gets its own `Constraint`, which the generation
scheduler advances with each token and asks for the next mask while the device runs the step.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from jaxembed.errors import InvalidRequestError

# The forms a constraint may take: the keys of vLLM's `structured_outputs` we serve.
KINDS = ("json", "regex", "choice", "grammar", "json_object")
WORD = 32  # tokens a mask word covers


def mask_words(vocab_size: int) -> int:
    """Width of a row of token bitmask: one bit a token."""
    return (vocab_size + WORD - 1) // WORD


def full_mask(rows: int, vocab_size: int) -> np.ndarray:
    """int32 [rows, words] with every token allowed."""
    return np.full((rows, mask_words(vocab_size)), -1, np.int32)


@dataclasses.dataclass(frozen=True)
class StructuredOutput:
    """What a generation's text must be: exactly one of a JSON schema (as a JSON string, or a
    dict), a regular expression, one of some strings, a grammar (Lark, or GBNF as llama.cpp
    writes it), or any JSON object. `param` names the request field it came from, for errors.
    `compiled` is set by `Grammars.compile`: an llguidance matcher at the start of the text,
    which each choice copies (0.03 ms, where building one again costs 1.2 ms)."""

    json: Any = None
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    json_object: bool = False
    param: str = "structured_outputs"
    compiled: Any = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def kind(self) -> str | None:
        set_ = [k for k in KINDS if getattr(self, k) not in (None, False)]
        return set_[0] if len(set_) == 1 else None


def _refuse(message: str, param: str) -> InvalidRequestError:
    return InvalidRequestError(message, param=param, code="invalid_structured_output")


class Grammars:
    """Compiles constraints for one tokenizer and makes their matchers. The llguidance
    tokenizer is built on first use (0.4 s for a 49k vocabulary), once."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, end_ids: Sequence[int]) -> None:
        """tokenizer: the model's (`tokenizers`); vocab_size: its logits width (at least the
        tokenizer's); end_ids: the tokens that may end a generation, allowed once the text is
        complete."""
        self._source, self.vocab_size = tokenizer, vocab_size
        self._end_ids = sorted(set(end_ids))
        self._tokenizer: Any = None
        self._lock = threading.Lock()

    @property
    def tokenizer(self) -> Any:
        with self._lock:
            if self._tokenizer is None:
                import llguidance

                self._tokenizer = llguidance.LLTokenizer(
                    self._source.to_str(), n_vocab=self.vocab_size, eos_token=self._end_ids or None)
            return self._tokenizer

    def compile(self, spec: StructuredOutput) -> StructuredOutput:
        """The spec with its compiled grammar, or a 400 naming what is wrong with it."""
        try:
            return self._compile(spec)
        except InvalidRequestError:
            raise
        except Exception as e:  # the grammar engine's own complaint about this request
            raise _refuse(f"'{spec.param}' cannot be compiled: {e}", spec.param) from None

    def _compile(self, spec: StructuredOutput) -> StructuredOutput:
        import llguidance

        m = llguidance.LLMatcher
        kind, param = spec.kind, spec.param
        if kind is None:
            raise _refuse(f"'{param}' must set exactly one of {list(KINDS)}", param)
        if kind == "json":
            schema = spec.json
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except ValueError as e:
                    raise _refuse(f"the JSON schema in '{param}' is not valid JSON: {e}",
                                  param) from None
            if not isinstance(schema, dict | bool):
                raise _refuse(f"the JSON schema in '{param}' must be an object", param)
            # Compact separators: a model meets one way to write the document, and cannot
            # spend its tokens on whitespace.
            grammar = m.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        elif kind == "json_object":
            grammar = m.grammar_from_json_schema({"type": "object"},
                                                 defaults={"whitespace_flexible": False})
        elif kind == "regex":
            if not isinstance(spec.regex, str) or not spec.regex:
                raise _refuse(f"the regex in '{param}' must be a non-empty string", param)
            grammar = m.grammar_from_regex(spec.regex)
        elif kind == "choice":
            choices = spec.choice
            if not choices or not all(isinstance(c, str) and c for c in choices):
                raise _refuse(f"the choices in '{param}' must be a non-empty list of non-empty "
                              "strings", param)
            # JSON's string escapes are Lark's.
            grammar = m.grammar_from_lark("start: " + " | ".join(map(json.dumps, choices)))
        else:
            text = spec.grammar
            if not isinstance(text, str) or not text.strip():
                raise _refuse(f"the grammar in '{param}' must be a non-empty string", param)
            if "::=" in text:  # GBNF, as llama.cpp writes it
                from llguidance.gbnf_to_lark import gbnf_to_lark

                try:
                    text = gbnf_to_lark(text)
                except Exception as e:  # its converter raises plain exceptions
                    raise _refuse(f"the GBNF grammar in '{param}' does not parse: {e}",
                                  param) from None
            grammar = m.grammar_from_lark(text)
        # Built once: a grammar that does not compile leaves the matcher in its error state.
        matcher = m(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise _refuse(f"'{param}' cannot be compiled: {matcher.get_error().strip()}", param)
        return dataclasses.replace(spec, compiled=matcher)

    def constraint(self, spec: StructuredOutput) -> Constraint:
        """A fresh matcher for one choice of a spec, compiled here unless it was."""
        if spec.compiled is None:
            spec = self.compile(spec)
        return Constraint(spec.compiled.deep_copy())


class Constraint:
    """One choice's place in its grammar: the tokens allowed next, and whether it is done."""

    def __init__(self, matcher: Any) -> None:
        self._m = matcher

    def fill(self, row: np.ndarray) -> None:
        """Write the allowed next tokens into row (int32 [words], C-contiguous)."""
        self._m.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)

    def advance(self, token: int) -> bool:
        """Take the token drawn; False if the grammar refused it (it never should: the mask
        allowed only what it accepts)."""
        return bool(self._m.consume_token(int(token)))

    @property
    def done(self) -> bool:
        """The text is complete and nothing may follow it."""
        return bool(self._m.is_stopped())

    @property
    def error(self) -> str:
        return self._m.get_error() if self._m.is_error() else ""
