"""Dynamic batching: requests for one model that arrive close together share one pipeline call.

The first waiting request waits at most `max_wait_ms` for others; a call takes up to `max_batch_size` images
of requests with the same steps and size (a denoising loop has one step count and one latent shape). While a
call runs, new requests queue up and form the next batch. The queue is bounded: `submit` raises QueueFull
rather than letting latency grow without limit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field

from services.serving.metrics import Metrics
from services.serving.models import ModelSlot

log = logging.getLogger(__name__)


class QueueFull(Exception):
    pass


Result = tuple[int, list[str]]  # (the version that generated, base64 PNGs)


@dataclass
class Pending:
    prompt: str
    n: int
    seed: int
    steps: int | None  # None: the served version's default
    size: int
    future: asyncio.Future[Result] = field(repr=False)
    arrived: float = field(default_factory=time.monotonic)


class Batcher:
    def __init__(self, slot: ModelSlot, max_batch_size: int, max_wait_ms: float, max_queue: int, metrics: Metrics):
        self.slot = slot
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self.max_queue = max_queue
        self.metrics = metrics
        self.waiting: deque[Pending] = deque()
        self.arrival = asyncio.Event()

    def submit(self, prompt: str, n: int, seed: int, steps: int | None, size: int) -> asyncio.Future[Result]:
        if len(self.waiting) >= self.max_queue:
            raise QueueFull
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self.waiting.append(Pending(prompt, n, seed, steps, size, future))
        self.metrics.queue_depth.labels(self.slot.name).set(len(self.waiting))
        self.arrival.set()
        return future

    async def run(self) -> None:
        """Forever: wait for a request, gather a batch, generate it in a thread, answer each request."""
        while True:
            await self._wait_for_batch()
            batch = self._take_batch()
            if batch:
                await self._generate(batch)

    async def _wait_for_batch(self) -> None:
        while not self.waiting:
            self.arrival.clear()
            await self.arrival.wait()
        deadline = self.waiting[0].arrived + self.max_wait
        while sum(p.n for p in self.waiting) < self.max_batch_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self.arrival.clear()
            try:
                await asyncio.wait_for(self.arrival.wait(), remaining)
            except asyncio.TimeoutError:
                return

    def _take_batch(self) -> list[Pending]:
        """The oldest live request and those after it that fit with it (same steps and size), in arrival order;
        the others keep their place. Requests whose caller gave up (timeout, disconnect) are dropped."""
        batch: list[Pending] = []
        kept: deque[Pending] = deque()
        images = 0
        for pending in self.waiting:
            if pending.future.done():
                continue
            first = batch[0] if batch else pending
            fits = (pending.steps, pending.size) == (first.steps, first.size)
            if fits and images + pending.n <= self.max_batch_size:
                batch.append(pending)
                images += pending.n
            else:
                kept.append(pending)
        self.waiting = kept
        self.metrics.queue_depth.labels(self.slot.name).set(len(self.waiting))
        return batch

    async def _generate(self, batch: list[Pending]) -> None:
        served = self.slot.current  # read once: a switch during the call affects the next batch only
        if served is None:
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(RuntimeError("no version loaded"))
            return
        prompts = [p.prompt for p in batch for _ in range(p.n)]
        seeds = [p.seed + i for p in batch for i in range(p.n)]
        steps = batch[0].steps or served.steps
        self.metrics.batch_images.labels(self.slot.name).observe(len(prompts))
        try:
            images = await asyncio.to_thread(served.generate, prompts, seeds, steps, batch[0].size)
        except Exception as exc:
            log.exception("generation failed", extra={"model": served.name, "version": served.version})
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(exc)
            return
        start = 0
        for pending in batch:
            if not pending.future.done():
                pending.future.set_result((served.version, images[start : start + pending.n]))
            start += pending.n
