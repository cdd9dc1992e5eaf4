"""An asyncio event loop in a thread of its own: where the router's async replicas and its frontends run.

Servers on it are started and stopped from synchronous code (the CLI, the deployment, tests) without
that code owning the loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop where it is installed (the router extra brings it on Linux and macOS), else asyncio's.

    Frontends pay the loop's cost on every query: in one pair of runs at 500 q/s on 2 cores, uvloop
    took the router's CPU per query from 1.09 to 0.92 ms over HTTP (1.21 to 1.07 ms over gRPC). Timers are
    only deadlines here, so libuv's millisecond timer resolution costs nothing; the replay tool,
    whose send times are measurements, keeps asyncio's own loop.
    """
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class LoopThread:
    """An asyncio event loop running in a daemon thread, so servers on it can be started and
    stopped from synchronous code (the CLI, the deployment, tests) without owning their loop."""

    def __init__(self, name: str, make_loop: Callable[[], asyncio.AbstractEventLoop] = new_event_loop) -> None:
        self.loop = make_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def call(self, coro: Coroutine[Any, Any, T], timeout_s: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.call(_cancel_others(), timeout_s=10.0)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10.0)
        self.loop.close()


async def _cancel_others() -> None:
    """Cancel what is left on the loop (requests still waiting) so it closes without warnings."""
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
