"""The generation front end: where a prompt or a conversation becomes token ids and validated
sampling settings, and both become the work the core queues.

It knows the tokenizer, the chat template and the model's limits, nothing of steps or devices;
tokens become text again in `GenerationScheduler`, through `generation.IncrementalDetokenizer`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxembed import sampling, tools
from jaxembed.errors import InvalidRequestError
from jaxembed.generation import ChatTemplate, GenerationStream, normalize_messages
from jaxembed.grammar import Grammars
from jaxembed.inputs import InputProcessor, is_int, is_number
from jaxembed.sampling import SamplingParams
from jaxembed.weights.tokenizer import TokenizerBundle
from jaxembed.work import GenerationWork


class GenerationFrontend:
    def __init__(self, inputs: InputProcessor, bundle: TokenizerBundle, eos_token_id: int | None,
                 *, model_name: str, max_model_len: int, max_num_seqs: int) -> None:
        """bundle: the tokenizer with its special ids and chat template; eos_token_id: the
        model config's own, if it names one."""
        self.inputs = inputs
        self.model_name = model_name
        self.max_model_len, self.max_num_seqs = max_model_len, max_num_seqs
        ids = {*bundle.stop_token_ids, bundle.eos_token_id, eos_token_id}
        self.stop_token_ids = frozenset(i for i in ids if i is not None)
        self.eos_token_ids = frozenset(
            i for i in (bundle.eos_token_id, eos_token_id) if i is not None)
        # Structured outputs: any of the stop tokens may end a text the grammar has completed.
        self.grammars = Grammars(inputs.tokenizer, inputs.vocab_size,
                                 sorted(self.stop_token_ids))
        # The tool-call form the chat template teaches (None: it renders no tools).
        self.tool_format = tools.template_format(bundle.chat_template)
        self.chat_template: ChatTemplate | None = None
        if bundle.chat_template:
            def text(i: int | None) -> str:
                return "" if i is None else inputs.tokenizer.id_to_token(i) or ""
            self.chat_template = ChatTemplate(bundle.chat_template, text(bundle.bos_token_id),
                                              text(bundle.eos_token_id))

    def prompt(self, prompt: str | Sequence[int], add_special_tokens: bool = True,
               param: str = "prompt") -> np.ndarray:
        """Token ids of a prompt: a text (tokenized with the model's special tokens unless told
        otherwise) or token ids as they are."""
        return self.inputs.prompt_ids(prompt, add_special_tokens, param)

    def sampling_params(self, params: SamplingParams | None = None, **fields: Any
                        ) -> SamplingParams:
        """Validated sampling settings: `params` with `fields` replacing some of them."""
        p = dataclasses.replace(params or SamplingParams(), **fields)
        checks = [
            ("max_tokens", is_int(p.max_tokens) and p.max_tokens >= 1,
             "an integer of at least 1"),
            ("temperature", is_number(p.temperature) and 0 <= p.temperature <= 100,
             "a number between 0 and 100 (0 is greedy)"),
            ("top_p", is_number(p.top_p) and 0 < p.top_p <= 1, "a number in (0, 1]"),
            ("top_k", is_int(p.top_k) and p.top_k >= -1, "-1 or 0 (off), or a positive integer"),
            ("min_p", is_number(p.min_p) and 0 <= p.min_p <= 1, "a number in [0, 1]"),
            ("presence_penalty", is_number(p.presence_penalty)
             and -2 <= p.presence_penalty <= 2, "a number between -2 and 2"),
            ("frequency_penalty", is_number(p.frequency_penalty)
             and -2 <= p.frequency_penalty <= 2, "a number between -2 and 2"),
            ("repetition_penalty", is_number(p.repetition_penalty)
             and 0 < p.repetition_penalty <= 100, "a number above 0 (1 is off)"),
            ("n", is_int(p.n) and 1 <= p.n <= self.max_num_seqs,
             f"an integer between 1 and {self.max_num_seqs} (this server's slots)"),
            # As vLLM: a seed is a signed 64-bit integer, whatever JSON can carry.
            ("seed", p.seed is None or (is_int(p.seed) and -2**63 <= p.seed < 2**63),
             "a signed 64-bit integer"),
            ("logprobs", p.logprobs is None or (is_int(p.logprobs)
                                                and 0 <= p.logprobs <= sampling.TOP_LOGPROBS),
             f"an integer between 0 and {sampling.TOP_LOGPROBS}"),
        ]
        for name, ok, want in checks:
            if not ok:
                raise InvalidRequestError(f"'{name}' must be {want}; got {getattr(p, name)!r}",
                                          param=name)
        if len(p.stop) > 16 or not all(isinstance(x, str) and x for x in p.stop):
            raise InvalidRequestError("'stop' must be a non-empty string or a list of at most 16 "
                                      "of them", param="stop")
        self.inputs.check_vocab(list(p.stop_token_ids), "stop_token_ids")
        logit_bias = self._logit_bias(p.logit_bias)
        if p.structured is not None and p.structured.compiled is None:
            p = dataclasses.replace(p, structured=self.grammars.compile(p.structured))
        # A k past the vocabulary keeps every token, as 0 does; capped so it fits the step's
        # int32 row (a larger one failed the engine's thread, and with it every later request).
        top_k = min(max(p.top_k, 0), np.iinfo(np.int32).max)
        return dataclasses.replace(p, top_k=top_k, stop=tuple(p.stop),
                                   stop_token_ids=tuple(int(i) for i in p.stop_token_ids),
                                   logit_bias=logit_bias)

    def _logit_bias(self, raw: Any) -> tuple[tuple[int, float], ...]:
        """OpenAI's logit_bias (token id, as JSON's string key or an int -> bias in [-100,
        100]; a mapping or pairs) as sorted (id, bias) pairs, every id in the vocabulary."""
        if raw is None:
            return ()
        pairs = list(raw.items()) if isinstance(raw, Mapping) else list(raw)
        if len(pairs) > sampling.MAX_LOGIT_BIAS:
            raise InvalidRequestError(
                f"'logit_bias' holds {len(pairs)} tokens; at most {sampling.MAX_LOGIT_BIAS} are "
                "allowed", param="logit_bias")
        out: dict[int, float] = {}
        for pair in pairs:
            key, value = pair if isinstance(pair, tuple | list) and len(pair) == 2 \
                else (pair, None)
            token = key if is_int(key) else (int(key) if isinstance(key, str)
                                             and key.strip().isdigit() else None)
            if token is None:
                raise InvalidRequestError(
                    f"'logit_bias' keys must be token ids (integers, as strings in JSON); got "
                    f"{key!r}", param="logit_bias")
            if not (is_number(value) and -100 <= value <= 100):
                raise InvalidRequestError(
                    f"'logit_bias' values must be numbers between -100 and 100; got {value!r} "
                    f"for token {token}", param="logit_bias")
            if int(token) in out:
                raise InvalidRequestError(f"'logit_bias' names token {token} twice",
                                          param="logit_bias")
            out[int(token)] = float(value)
        vocab = self.inputs.vocab_size
        bad = [t for t in out if not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(
                f"'logit_bias' names token id {bad[0]}, outside this model's vocabulary "
                f"[0, {vocab - 1}]", param="logit_bias", code="invalid_token_id")
        return tuple(sorted(out.items()))

    def render_chat(self, messages: object, add_generation_prompt: bool = True,
                    template_kwargs: Mapping[str, Any] | None = None,
                    tool_list: list[dict[str, Any]] | None = None) -> str:
        """The prompt text of a conversation, by the model's own chat template; tool_list:
        the tools offered, rendered as the template renders them."""
        if self.chat_template is None:
            raise InvalidRequestError(
                f"{self.model_name} has no chat template (its files carry none), so it cannot "
                "serve chat; send the text to /v1/completions instead", param="messages",
                code="no_chat_template")
        if tool_list and self.tool_format is None:
            raise InvalidRequestError(
                f"{self.model_name}'s chat template renders no tools (it teaches neither "
                "<tool_call> nor Llama 3's JSON calls), so it cannot take 'tools'; leave them "
                "out", param="tools", code="unsupported_parameter")
        return self.chat_template.render(
            tools.template_messages(normalize_messages(messages)), add_generation_prompt,
            template_kwargs, tool_list)

    def chat_prompt(self, messages: object, add_generation_prompt: bool = True,
                    template_kwargs: Mapping[str, Any] | None = None,
                    tool_list: list[dict[str, Any]] | None = None) -> np.ndarray:
        """Token ids of a conversation. The template writes the special tokens itself (BOS
        included), so they are not added again."""
        return self.prompt(self.render_chat(messages, add_generation_prompt, template_kwargs,
                                            tool_list),
                           add_special_tokens=False, param="messages")

    def check_length(self, prompt: np.ndarray, max_tokens: int) -> None:
        """Refuse a prompt whose tokens and `max_tokens` together pass the context."""
        n = len(prompt)
        if n + max_tokens > self.max_model_len:
            room = self.max_model_len - n
            raise InvalidRequestError(
                f"the prompt has {n} tokens and 'max_tokens' is {max_tokens}: together "
                f"more than this model's context of {self.max_model_len} tokens; "
                + (f"ask for at most {room} tokens" if room > 0 else "shorten the prompt"),
                param="max_tokens" if room > 0 else "prompt", code="context_length_exceeded")

    def request(self, prompt: np.ndarray, params: SamplingParams,
                loop: asyncio.AbstractEventLoop | None = None) -> GenerationWork:
        """The work for a validated prompt and settings; its stream yields the deltas (from a
        thread, or on `loop`). Refuses a prompt and `max_tokens` past the context."""
        n = len(prompt)
        self.check_length(prompt, params.max_tokens)
        stream = GenerationStream(params.n, n, loop)
        base = params.seed if params.seed is not None else int.from_bytes(os.urandom(4), "little")
        # Each choice has its own stream of random numbers, fixed by the seed and its index.
        seeds = [(int(base) + 0x9E3779B9 * i) & 0xFFFFFFFF for i in range(params.n)]
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids |= self.stop_token_ids
        constraints = None
        if params.structured is not None:
            constraints = [self.grammars.constraint(params.structured) for _ in range(params.n)]
        return GenerationWork(prompt, params, stream, seeds, frozenset(stop_ids), params.n,
                              constraints)
