"""Work as the core queues it: what a front end hands over and where its results go.

An embedding request is a batch of token-id sequences and a future for their pooled vectors; a
generation request is a prompt, its sampling settings and the stream its tokens go to.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import time

import numpy as np

from jaxembed.generation import GenerationStream
from jaxembed.protocol import EmbeddingType
from jaxembed.sampling import SamplingParams
from jaxembed.stats import RequestTiming


class EmbeddingFuture(concurrent.futures.Future):
    """The future `submit` returns: float32 [len(sequences), hidden], plus the request's timing.

    Cancelling it before its vectors are computed drops the work from the queue."""

    def __init__(self) -> None:
        super().__init__()
        self.timing = RequestTiming(time.perf_counter())


@dataclasses.dataclass
class EmbeddingWork:
    """One submitted batch of sequences and where their vectors go."""

    sequences: list[np.ndarray]
    pooling: EmbeddingType
    future: EmbeddingFuture
    out: np.ndarray  # float32 [len(sequences), hidden], filled in as steps finish
    remaining: int
    skip: list[int] | None = None  # leading tokens of each sequence left out of its pooling


@dataclasses.dataclass
class GenerationWork:
    """One submitted generation request: a prompt continued `n` times."""

    prompt: np.ndarray
    params: SamplingParams
    stream: GenerationStream
    seeds: list[int]  # one per choice
    stop_ids: frozenset[int]
    open: int  # choices not finished yet

    @property
    def cancelled(self) -> bool:
        return self.stream.cancelled


Work = EmbeddingWork | GenerationWork
