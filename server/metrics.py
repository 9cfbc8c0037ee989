"""`/metrics` in Prometheus's text format (version 0.0.4), written out by hand.

The server counts what it sees (requests by route, method and status; latencies); the engine's
figures (queue depth, step sizes, tokens, compilations) are read from its statistics at scrape time,
so nothing here runs on the engine thread.
"""

from __future__ import annotations

import contextlib
import functools
import os
import resource
import threading
import time
from collections import defaultdict
from collections.abc import Iterable

from jaxembed.engine import Engine
from jaxembed.stats import Histogram

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    """What the HTTP layer observes. Updated from the event loop and read by scrapes; the lock
    keeps a scrape from seeing a histogram half-updated."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, str], int] = defaultdict(int)
        self.latency: dict[str, Histogram] = {}
        self.queue_time = Histogram(LATENCY_BOUNDS)
        self.inference_time = Histogram(LATENCY_BOUNDS)

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(route, method, str(status))] += 1
            self.latency.setdefault(route, Histogram(LATENCY_BOUNDS)).observe(seconds)

    def observe_timing(self, queue_seconds: float, inference_seconds: float) -> None:
        with self._lock:
            self.queue_time.observe(queue_seconds)
            self.inference_time.observe(inference_seconds)

    def render(self, engine: Engine | None, ready: bool) -> str:
        out = _Writer()
        with self._lock:
            out.metric("jaxembed_http_requests_total", "counter",
                       "HTTP requests answered, by route template, method and status.",
                       [({"route": r, "method": m, "status": s}, n)
                        for (r, m, s), n in sorted(self.requests.items())])
            out.histogram("jaxembed_http_request_duration_seconds",
                          "Time from a request's arrival to its response, by route template.",
                          [({"route": r}, h) for r, h in sorted(self.latency.items())])
            out.histogram("jaxembed_request_queue_seconds",
                          "Time an embeddings request waited for the engine.",
                          [({}, self.queue_time)])
            out.histogram("jaxembed_request_inference_seconds",
                          "Time from an embeddings request's first step to its last.",
                          [({}, self.inference_time)])
        _process_metrics(out)
        out.metric("jaxembed_ready", "gauge",
                   "1 once the model is loaded and warm, 0 while loading or draining.",
                   [({}, int(ready))])
        if engine is None:
            return out.text()
        st = engine.stats_snapshot()
        out.metric("jaxembed_queue_depth", "gauge",
                   "Requests accepted by the engine and not yet finished.",
                   [({}, engine.queue_depth)])
        out.metric("jaxembed_queue_capacity", "gauge",
                   "Requests the engine holds at once before refusing more (429).",
                   [({}, engine.max_queued_requests)])
        out.metric("jaxembed_requests_rejected_total", "counter",
                   "Requests refused because the queue was full.", [({}, st.rejected)])
        out.metric("jaxembed_requests_cancelled_total", "counter",
                   "Requests dropped before being computed because their caller went away.",
                   [({}, st.cancelled)])
        out.metric("jaxembed_requests_completed_total", "counter",
                   "Requests the engine computed.", [({}, st.requests)])
        out.metric("jaxembed_steps_total", "counter", "Batched steps the engine ran.",
                   [({}, st.steps)])
        out.histogram("jaxembed_batch_inputs", "Sequences (inputs) per batched step.",
                      [({}, st.step_sequences)])
        out.histogram("jaxembed_batch_requests", "Requests sharing one batched step.",
                      [({}, st.step_requests)])
        out.histogram("jaxembed_batch_tokens", "Real (non-padding) tokens per batched step.",
                      [({}, st.step_tokens)])
        out.metric("jaxembed_batch_padding_ratio", "gauge",
                   "Share of all step slots that were padding, since start.",
                   [({}, st.padding_ratio)])
        out.metric("jaxembed_tokens_embedded_total", "counter",
                   "Tokens run through the model for embeddings.", [({}, st.real_tokens)])
        out.metric("jaxembed_tokens_padded_total", "counter",
                   "Token slots run, padding included.", [({}, st.padded_tokens)])
        out.metric("jaxembed_tokens_generated_total", "counter",
                   "Tokens generated (sampled), all choices of all requests.",
                   [({}, st.generated_tokens)])
        out.metric("jaxembed_generation_requests_completed_total", "counter",
                   "Generation requests finished (every choice stopped).",
                   [({}, st.generation_requests)])
        out.metric("jaxembed_generation_steps_total", "counter",
                   "Generation steps: prefill (prompts into free slots) and decode (a token for "
                   "every running sequence).",
                   [({"kind": "prefill"}, st.prefill_steps), ({"kind": "decode"}, st.decode_steps)])
        out.metric("jaxembed_sequences_running", "gauge",
                   "Sequences holding a KV cache slot.", [({}, engine.running_sequences)])
        out.metric("jaxembed_sequences_capacity", "gauge",
                   "KV cache slots (--max-num-seqs).", [({}, engine.max_num_seqs)])
        out.metric("jaxembed_compilations_total", "counter",
                   "Step shapes compiled by XLA (warm-up included).", [({}, st.compilations)])
        out.metric("jaxembed_engine_busy_seconds_total", "counter",
                   "Time the engine thread spent running steps.", [({}, st.busy_seconds)])
        return out.text()


def _process_metrics(out: _Writer) -> None:
    """The process figures operators expect of any exporter, under Prometheus's standard names
    (as its client libraries write them), read from /proc where there is one."""
    cpu = os.times()
    out.metric("process_cpu_seconds_total", "counter", "User and system CPU time spent.",
               [({}, cpu.user + cpu.system)])
    statm = _read("/proc/self/statm")
    if statm:
        page = os.sysconf("SC_PAGE_SIZE")
        virtual, resident = (int(x) * page for x in statm.split()[:2])
        out.metric("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.",
                   [({}, resident)])
        out.metric("process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes.",
                   [({}, virtual)])
    with contextlib.suppress(OSError):
        out.metric("process_open_fds", "gauge", "Number of open file descriptors.",
                   [({}, len(os.listdir("/proc/self/fd")))])
    out.metric("process_max_fds", "gauge", "Maximum number of open file descriptors.",
               [({}, resource.getrlimit(resource.RLIMIT_NOFILE)[0])])
    out.metric("process_start_time_seconds", "gauge",
               "Start time of the process since the Unix epoch in seconds.",
               [({}, _start_time())])


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


@functools.cache
def _start_time() -> float:
    """When this process started: its start in clock ticks after boot (/proc/self/stat's 22nd
    field, counted past the command's parentheses, which may hold spaces), plus the boot time."""
    stat, boot = _read("/proc/self/stat"), _read("/proc/stat")
    if stat and boot:
        ticks = int(stat.rsplit(")", 1)[1].split()[19])
        btime = next(int(line.split()[1]) for line in boot.splitlines()
                     if line.startswith("btime "))
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    return _IMPORTED


_IMPORTED = time.time()  # where there is no /proc: when the server's modules were loaded


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"

    def metric(self, name: str, kind: str, help: str,
               samples: Iterable[tuple[dict[str, str], float]]) -> None:
        self.lines += [f"# HELP {name} {help}", f"# TYPE {name} {kind}"]
        self.lines += [f"{name}{_labels(labels)} {_number(v)}" for labels, v in samples]

    def histogram(self, name: str, help: str,
                  series: Iterable[tuple[dict[str, str], Histogram]]) -> None:
        self.lines += [f"# HELP {name} {help}", f"# TYPE {name} histogram"]
        for labels, h in series:
            for bound, n in zip([*h.bounds, "+Inf"], h.cumulative(), strict=True):
                le = bound if isinstance(bound, str) else _number(bound)
                self.lines.append(f"{name}_bucket{_labels({**labels, 'le': le})} {n}")
            self.lines.append(f"{name}_sum{_labels(labels)} {_number(h.total)}")
            self.lines.append(f"{name}_count{_labels(labels)} {h.count}")


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))
