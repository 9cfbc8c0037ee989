"""Work as the core queues it: what a front end hands over and where its results go.

An embedding request is a batch of token-id sequences and a future for their pooled vectors; a
generation request is a prompt, its sampling settings and the stream its tokens go to.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import enum
import time
from typing import Any

import numpy as np

from jaxembed.generation import GenerationStream, TokenLogprob
from jaxembed.grammar import Constraint
from jaxembed.protocol import EmbeddingType
from jaxembed.sampling import SamplingParams
from jaxembed.stats import RequestTiming


class EmbeddingFuture(concurrent.futures.Future):
    """The future `submit` returns: float32 [len(sequences), hidden], plus the request's timing.

    Cancelling it before its vectors are computed drops the work from the queue."""

    def __init__(self) -> None:
        super().__init__()
        self.timing = RequestTiming(time.perf_counter())


class Output(enum.Enum):
    """What a prefill-only sequence gives back."""

    POOLED = "pooled"  # one vector, float32 [D], pooled as its work's `pooling` says
    HIDDEN = "hidden"  # every pooled token's final hidden state, float32 [tokens, D]
    SCORES = "scores"  # every token's log-probability given those before it (`PromptScores`)


@dataclasses.dataclass(frozen=True)
class PromptScores:
    """What the model thinks of a prompt, token by token: for each token after the first, its
    log-probability given the tokens before it, and the most likely tokens at that place."""

    logprobs: np.ndarray  # float32 [n - 1]: of tokens 1 .. n - 1
    top_ids: np.ndarray  # int32 [n - 1, TOP_LOGPROBS], most likely first
    top_logprobs: np.ndarray  # float32 [n - 1, TOP_LOGPROBS]

    def entries(self, ids: np.ndarray, top: int) -> list[TokenLogprob]:
        """Tokens 1 .. n - 1 of `ids` (the scored sequence) as logprob entries, with `top`
        alternatives each."""
        lp, tid, tlp = self.logprobs.tolist(), self.top_ids[:, :top].tolist(), \
            self.top_logprobs[:, :top].tolist()
        return [TokenLogprob(int(t), lp[j], tuple(zip(tid[j], tlp[j], strict=True)))
                for j, t in enumerate(ids[1:])]


@dataclasses.dataclass
class EmbeddingWork:
    """One submitted batch of sequences and where their results go."""

    sequences: list[np.ndarray]
    pooling: EmbeddingType
    future: EmbeddingFuture
    # POOLED: float32 [len(sequences), hidden]; otherwise a list with an array (HIDDEN) or
    # PromptScores (SCORES) a sequence. Filled in as steps finish.
    out: np.ndarray | list[Any]
    remaining: int
    skip: list[int] | None = None  # leading tokens of each sequence left out of its pooling
    scores: bool = False  # the prompt's token log-probabilities, not its states

    @property
    def output(self) -> Output:
        if self.pooling == EmbeddingType.None_:
            return Output.HIDDEN
        return Output.SCORES if self.scores else Output.POOLED


@dataclasses.dataclass
class GenerationWork:
    """One submitted generation request: a prompt continued `n` times."""

    prompt: np.ndarray
    params: SamplingParams
    stream: GenerationStream
    seeds: list[int]  # one per choice
    stop_ids: frozenset[int]
    open: int  # choices not finished yet
    # Under a grammar (params.structured): each choice's place in it; None: free text.
    constraints: list[Constraint] | None = None

    @property
    def cancelled(self) -> bool:
        return self.stream.cancelled


Work = EmbeddingWork | GenerationWork
