"""Hand byte chunks from a worker thread to an async response body, with backpressure.

The producer (an archive writer, a log follower) runs in its own thread and calls
:meth:`Bridge.put`; it blocks while ``depth`` chunks wait unread, so a slow client slows
the producer down instead of filling memory. When the client goes away the consumer
calls :meth:`Bridge.cancel` and the producer's next ``put`` raises :class:`ClientGone`.
"""

from __future__ import annotations

import asyncio
import threading
from typing import AsyncIterator, Callable


class ClientGone(Exception):
    """The response was abandoned (client disconnected, server shutting down)."""


class Bridge:
    def __init__(self, loop: asyncio.AbstractEventLoop, depth: int = 8) -> None:
        self.loop = loop
        self.slots = threading.Semaphore(depth)
        self.queue: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue()
        self.cancelled = threading.Event()

    # -- producer side (any thread) ---------------------------------------------------
    def put(self, chunk: bytes) -> None:
        while not self.slots.acquire(timeout=0.5):
            if self.cancelled.is_set():
                raise ClientGone()
        if self.cancelled.is_set():
            raise ClientGone()
        self.loop.call_soon_threadsafe(self.queue.put_nowait, chunk)

    def close(self, error: BaseException | None = None) -> None:
        """No more chunks (``error``: the body ends abruptly, so the client sees it failed)."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, error)
        except RuntimeError:  # the loop is gone: the server stopped
            pass

    # -- consumer side (the event loop) -----------------------------------------------
    async def chunks(self, heartbeat: float | None = None, ping: bytes = b"") -> AsyncIterator[bytes]:
        """The producer's chunks; with ``heartbeat``, ``ping`` after that many idle seconds
        (so a stream that stays quiet still finds out when its client has gone)."""
        try:
            while True:
                if heartbeat is None:
                    item = await self.queue.get()
                else:
                    try:
                        item = await asyncio.wait_for(self.queue.get(), heartbeat)
                    except asyncio.TimeoutError:
                        yield ping
                        continue
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                self.slots.release()
                yield item
        finally:
            self.cancel()

    def cancel(self) -> None:
        self.cancelled.set()


def start(loop: asyncio.AbstractEventLoop, work: Callable[[Bridge], None], *, depth: int = 8,
          name: str = "hpcexp-serve-worker") -> Bridge:
    """Run ``work(bridge)`` in a new daemon thread; the bridge closes when it returns or fails."""
    bridge = Bridge(loop, depth)

    def main() -> None:
        try:
            work(bridge)
        except ClientGone:
            bridge.close()
        except BaseException as exc:  # noqa: BLE001 - handed to the response, which aborts
            bridge.close(exc)
        else:
            bridge.close()

    threading.Thread(target=main, name=name, daemon=True).start()
    return bridge


class Sink:
    """A raw, unseekable binary file object writing into a bridge in chunks of ``chunk`` bytes."""

    def __init__(self, bridge: Bridge, chunk: int = 256 * 1024) -> None:
        self.bridge = bridge
        self.chunk = chunk
        self.buf = bytearray()
        self.pos = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        n = len(data)
        self.buf += data
        self.pos += n
        if len(self.buf) >= self.chunk:
            self.flush()
        return n

    def flush(self) -> None:
        if self.buf:
            data = bytes(self.buf)
            self.buf.clear()
            self.bridge.put(data)

    def tell(self) -> int:
        return self.pos

    def seekable(self) -> bool:
        return False

    def seek(self, *args: object) -> int:
        import io

        raise io.UnsupportedOperation("the HTTP response cannot seek")

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        self.flush()
