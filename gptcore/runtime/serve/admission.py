"""Bounded work for the HTTP server: a fixed pool of model threads, a bounded wait, and a body cap.

At most `max_concurrency` model calls run at once (ONNX Runtime sessions are thread-safe for
`run`, so they share one session) and at most `max_queue` requests wait for a slot; any request
beyond that is turned away at once (HTTP 429), so load past the bound costs neither memory nor
latency for the requests already admitted. A slot is held until the model thread's work ends,
not until the request handler stops waiting for it: a client that hangs up cannot push more
model calls into the pool than there are slots.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from typing import Any


class Overloaded(Exception):
    """Every slot is busy and the wait queue is full."""


class Admission:
    def __init__(self, max_concurrency: int, max_queue: int):
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency: must be >= 1, got {max_concurrency}")
        if max_queue < 0:
            raise ValueError(f"max_queue: must be >= 0, got {max_queue}")
        self.max_concurrency, self.max_queue = max_concurrency, max_queue
        self.running = self.waiting = 0
        self._slots = asyncio.Semaphore(max_concurrency)  # binds to the running loop on first use
        self._pool = concurrent.futures.ThreadPoolExecutor(max_concurrency, thread_name_prefix="gptcore-model")

    async def acquire(self) -> None:
        """Take a slot, waiting in the queue if need be; `Overloaded` when the queue is full too."""
        if self.running + self.waiting >= self.max_concurrency + self.max_queue:
            raise Overloaded(
                f"busy: {self.running} requests running (at most {self.max_concurrency}) and "
                f"{self.waiting} waiting (at most {self.max_queue}); retry later"
            )
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.running += 1

    def release(self) -> None:
        self.running -= 1
        self._slots.release()

    def start(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
        """Run `fn(*args)` on a model thread under a slot taken with `acquire`; the slot frees when it ends."""
        loop = asyncio.get_running_loop()
        try:
            future = self._pool.submit(fn, *args)
        except BaseException:
            self.release()
            raise
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(self.release))
        return future

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` on a model thread: wait for a slot (or `Overloaded`), run, return its result."""
        await self.acquire()
        return await asyncio.wrap_future(self.start(fn, *args))

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` gets 413 before it is read into memory.

    uvicorn sets no limit of its own, and FastAPI reads the whole body before validating it.
    """

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from fastapi import HTTPException

        from gptcore.runtime.serve.access import route_path
        from gptcore.runtime.serve.requests import refusal

        message = f"request body: at most {self.max_bytes} bytes"
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.max_bytes:
            return await refusal(route_path(scope), 413, message)(scope, receive, send)
        seen = 0

        async def bounded_receive():
            nonlocal seen
            event = await receive()
            seen += len(event.get("body", b""))
            if seen > self.max_bytes:  # a chunked body declares no length: count it as it comes
                raise HTTPException(413, message)  # FastAPI answers it while parsing the body
            return event

        await self.app(scope, bounded_receive, send)
