"""A small micro-batcher: concurrent requests share one forward pass.

Requests put their images on a queue and wait on a future. One worker thread
takes the first waiting request, keeps collecting for a few milliseconds (or
until the batch is full), runs the model once on the concatenated batch and
hands every request its own slice of the result. The event loop only awaits
futures, so it never runs the model, and a big request is one item among others.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable

import torch

_STOP = object()


class MicroBatcher:
    """Run ``fn(x: [N,1,28,28]) -> list`` (one entry per image) on batches gathered from concurrent callers.

    ``max_batch`` bounds the images in one forward pass (a single larger request
    still runs alone); ``max_wait_ms`` is how long the first request of a batch
    waits for company.
    """

    def __init__(self, fn: Callable[[torch.Tensor], list[Any]], max_batch: int = 64, max_wait_ms: float = 2.0) -> None:
        self.fn = fn
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.batches_run = 0  # forward passes so far (for /api/health and tests)
        self.items_run = 0  # requests served so far
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._worker, name="mnistrec-batcher", daemon=True)
        self._thread.start()

    def submit(self, x: torch.Tensor) -> Future:
        """Queue ``x`` ([k,1,28,28]); the future resolves to the ``k`` results of ``fn``."""
        if not self._thread.is_alive():
            raise RuntimeError("the batcher is closed")
        future: Future = Future()
        self._queue.put((x, future))
        return future

    async def run(self, x: torch.Tensor) -> list[Any]:
        """``await`` the results for ``x`` without blocking the event loop."""
        return await asyncio.wrap_future(self.submit(x))

    def close(self) -> None:
        """Finish the queued work and stop the worker thread."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(timeout=10)

    def _collect(self, first) -> tuple[list, bool]:
        items, size, stop = [first], len(first[0]), False
        deadline = time.monotonic() + self.max_wait
        while size < self.max_batch:
            timeout = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                stop = True
                break
            items.append(item)
            size += len(item[0])
        return items, stop

    def _worker(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            items, stop = self._collect(first)
            # A caller that gave up (cancelled) no longer needs its slice.
            items = [(x, f) for x, f in items if f.set_running_or_notify_cancel()]
            if items:
                self._run(items)
            if stop:
                return

    def _run(self, items: list) -> None:
        try:
            results = self.fn(torch.cat([x for x, _ in items]))
        except Exception as exc:  # hand the failure to every waiting caller, keep serving
            for _, future in items:
                future.set_exception(exc)
            return
        self.batches_run += 1
        self.items_run += len(items)
        start = 0
        for x, future in items:
            future.set_result(results[start:start + len(x)])
            start += len(x)
