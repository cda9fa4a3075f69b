"""Running the async orchestrator from the synchronous CLI.

The event loop lives in a daemon thread; the main thread keeps the terminal (readline input) and
receives Ctrl-C, which cancels the request in flight instead of killing the process. Engine
processes are spawned from the loop thread with SIGINT blocked (see engines.vllm_local), so the
terminal's Ctrl-C never reaches them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")
_DONE = object()


class BackgroundLoop:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="coe-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Awaitable[T]) -> T:
        """Run a coroutine on the loop and wait for it; Ctrl-C cancels it and re-raises."""
        future = asyncio.run_coroutine_threadsafe(_as_coroutine(coro), self.loop)
        return _wait(future)

    def iterate(self, make_stream: Callable[[], AsyncIterator[T]]) -> Iterator[T]:
        """Iterate an async stream from the main thread. Ctrl-C (or closing the iterator)
        cancels the producer, which aborts the engine request."""
        items: queue.Queue[Any] = queue.Queue()

        async def pump() -> None:
            try:
                async for item in make_stream():
                    items.put(item)
            finally:
                items.put(_DONE)

        future = asyncio.run_coroutine_threadsafe(pump(), self.loop)
        try:
            while True:
                try:
                    item = items.get(timeout=0.1)
                except queue.Empty:
                    continue
                if item is _DONE:
                    break
                yield item
            future.result()  # re-raise the producer's error, if any
        finally:
            if not future.done():
                future.cancel()
                # Let the cancellation reach the engine before the caller moves on.
                concurrent.futures.wait([future], timeout=5)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)


async def _as_coroutine(awaitable: Awaitable[T]) -> T:
    return await awaitable


def _wait(future: concurrent.futures.Future[T]) -> T:
    try:
        while True:
            try:
                return future.result(timeout=0.1)
            except concurrent.futures.TimeoutError:
                continue
    except KeyboardInterrupt:
        future.cancel()
        raise
