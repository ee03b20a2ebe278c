"""The batching scheduler: one worker thread decodes queued requests in batches, tokens streamed out.

Requests for the same served id **and** the same rule parameters (:class:`DecodeConfig`) decode
together in :func:`amendlm.ram.generate.decode_steps` (the library's batched, KV-cached loop).  The
worker takes the oldest waiting request, waits at most ``max_wait_ms`` after its arrival for others
of the same kind (up to ``max_batch_size``), and decodes that batch to its end.  Requests that arrive
while a batch runs **join the next batch** (they never enter a running one).  A row that ends (EOS,
stop string, its own ``max_tokens``) or whose client left is dropped from the KV caches at the next
step, so the rest of its batch goes on without it.

Each request's events go to its ``emit`` callback, called on the worker thread (the app hands them
to its event loop).  One worker serves every pair: on a CPU two batches at once would only share the
same cores.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from amendlm.modeling import resolve_dtype
from amendlm.ram.decoding import DecodeConfig, get_mode
from amendlm.ram.generate import decode_steps
from amendlm.serve.models import ServedModel
from amendlm.serve.rows import RowText, Sampling, make_chooser, row_generators

logger = logging.getLogger(__name__)
_ids = itertools.count()


class QueueFull(RuntimeError):
    """The queue holds ``max_queue`` requests already (the app answers 503 with Retry-After)."""


class EngineStopped(RuntimeError):
    """The engine is shutting down and takes no new request."""


@dataclass
class Event:
    """What a request receives: a text delta; at the end a ``finish_reason`` (``stop``, ``length``) or an ``error``.

    ``completion_tokens`` counts the tokens generated so far (EOS excluded); ``full_text``, sent with
    the ``finish_reason``, is the decode of all the row's ids, stop-trimmed (the non-streaming answer).
    """

    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0
    error: str | None = None
    status: int = 500  # HTTP status of an error (503: shutting down)
    full_text: str | None = None


@dataclass
class Job:
    """One prompt to decode: the served id, prompt ids, rule and sampling parameters, and where events go."""

    served: ServedModel
    prompt_ids: list[int]
    decode: DecodeConfig
    sampling: Sampling
    emit: Callable[[Event], None]
    arrival: float = field(default_factory=time.monotonic)
    cancelled: threading.Event = field(default_factory=threading.Event)
    number: int = field(default_factory=lambda: next(_ids))

    @property
    def key(self) -> tuple:
        """Jobs with equal keys can share a batch: same served id, same rule parameters."""
        return (self.served.id, tuple(sorted(self.decode.to_dict().items())))

    def cancel(self) -> None:
        """Stop decoding this job at the next step (its client left); no more events are sent."""
        self.cancelled.set()


class Metrics:
    """Counters the worker updates (read by ``/metrics``); ``tokens_per_second`` is over the last ``window`` s."""

    def __init__(self, window: float = 10.0):
        self.window = window
        self.batches = 0
        self.batch_rows = 0
        self.generated_tokens = 0
        self.cancelled = 0
        self.running = 0
        self.lock = threading.Lock()
        self._recent: collections.deque[tuple[float, int]] = collections.deque()

    def tokens(self, count: int) -> None:
        now = time.monotonic()
        with self.lock:
            self.generated_tokens += count
            self._recent.append((now, count))
            while self._recent and self._recent[0][0] < now - self.window:
                self._recent.popleft()

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self.lock:
            return sum(n for t, n in self._recent if t >= now - self.window) / self.window


class Engine:
    """Queue + worker thread decoding :class:`Job` batches.

    Args:
        max_batch_size: rows decoded together at most (1 = no batching).
        max_wait_ms: how long the oldest waiting request waits for company before its batch starts.
        max_queue: waiting requests at most; :meth:`submit` raises :class:`QueueFull` beyond.
        dtype: ``fp32``, ``bf16`` or ``auto`` (resolved once on the first batch's device).
    """

    def __init__(self, max_batch_size: int = 8, max_wait_ms: float = 10.0, max_queue: int = 256, dtype: str = "fp32"):
        if max_batch_size < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError(f"max_batch_size ({max_batch_size}) and max_queue ({max_queue}) must be >= 1 and "
                             f"max_wait_ms ({max_wait_ms}) >= 0")
        self.max_batch_size, self.max_wait, self.max_queue, self.dtype = max_batch_size, max_wait_ms / 1000, max_queue, dtype
        self.metrics = Metrics()
        self._queue: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._running: list[Job] = []
        self._dtypes: dict[str, torch.dtype] = {}

    def start(self) -> None:
        """Start the worker thread (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="amendlm-serve-worker", daemon=True)
            self._thread.start()

    def queue_length(self) -> int:
        with self._cond:
            return len(self._queue)

    def submit(self, job: Job) -> None:
        """Queue a job for the next batch of its kind.

        Raises:
            QueueFull: ``max_queue`` jobs are waiting.
            EngineStopped: :meth:`stop` was called.
        """
        with self._cond:
            if self._stopping:
                raise EngineStopped("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are waiting (--max-queue {self.max_queue})")
            self._queue.append(job)
            self._cond.notify_all()

    def stop(self, timeout: float = 30.0) -> bool:
        """Take no new job, fail the waiting ones, let the running batch end (at most ``timeout`` s, then
        cancel its rows).  Returns whether the worker ended."""
        with self._cond:
            self._stopping = True
            waiting = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for job in waiting:
            job.emit(Event(error="the server is shutting down", status=503))
        if self._thread is None:
            return True
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._cancel_running()
            self._thread.join(5.0)
        return not self._thread.is_alive()

    # ------------------------------------------------------------------ worker

    def _take(self) -> list[Job] | None:
        with self._cond:
            while True:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue:
                    return None
                first = self._queue[0]
                key = first.key
                while not self._stopping:
                    same = sum(1 for job in self._queue if job.key == key and not job.cancelled.is_set())
                    left = first.arrival + self.max_wait - time.monotonic()
                    if same >= self.max_batch_size or left <= 0:
                        break
                    self._cond.wait(left)
                batch = [job for job in self._queue if job.key == key][: self.max_batch_size]
                for job in batch:
                    self._queue.remove(job)
                live = [job for job in batch if not job.cancelled.is_set()]
                self.metrics.cancelled += len(batch) - len(live)
                if live:
                    self._running = live
                    return live

    def _cancel_running(self) -> None:
        for job in list(self._running):
            job.cancel()

    def _work(self) -> None:
        while (batch := self._take()) is not None:
            try:
                self._decode(batch)
            except Exception as err:  # a fault in one batch fails its requests, never the server
                logger.exception("batch of %d failed", len(batch))
                message = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
                for job in batch:
                    job.emit(Event(error=message))
            finally:
                self._running = []
                self.metrics.running = 0

    @torch.inference_mode()
    def _decode(self, batch: list[Job]) -> None:
        served, decode = batch[0].served, batch[0].decode
        mode = get_mode(decode.mode)
        model = served.proposal if mode.uses_proposal else served.aligner
        device = next(model.parameters()).device
        if device.type not in self._dtypes:
            self._dtypes[device.type] = resolve_dtype(self.dtype, device)
        samplings = [job.sampling for job in batch]
        generators = row_generators(samplings, device)
        eos = served.eos_token_ids[0] if served.eos_token_ids else None
        texts = [RowText(served.tokenizer, s) for s in samplings]
        self.metrics.batches += 1
        self.metrics.batch_rows += len(batch)
        self.metrics.running = len(batch)
        steps = decode_steps(served.proposal, served.aligner, [job.prompt_ids for job in batch], decode,
                             max(s.max_tokens for s in samplings), vocab_size=served.vocab_size,
                             pad_token_id=served.pad_token_id, eos_token_ids=served.eos_token_ids,
                             dtype=self._dtypes[device.type], choose=make_chooser(decode, samplings, generators, eos),
                             prune_finished=True)
        for state in steps:
            new_tokens = 0
            for row in state.active.nonzero().flatten().tolist():
                job, text = batch[row], texts[row]
                if job.cancelled.is_set():
                    state.finished[row] = True
                    self.metrics.cancelled += 1
                    continue
                if bool(state.is_eos[row]):
                    delta = text.finish("stop")
                else:
                    new_tokens += 1
                    delta = text.add(int(state.next_ids[row]))
                if text.finish_reason is not None:
                    state.finished[row] = True
                job.emit(Event(delta, text.finish_reason, len(text.token_ids),
                               full_text=text.text if text.finish_reason else None))
            self.metrics.tokens(new_tokens)
            self.metrics.running = int((~state.finished).sum())
        for job, text in zip(batch, texts):  # rows the loop's last step left open (cannot happen: max_tokens)
            if text.finish_reason is None and not job.cancelled.is_set():
                job.emit(Event(text.finish("length"), text.finish_reason, len(text.token_ids), full_text=text.text))
