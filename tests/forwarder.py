"""A loopback TCP forwarder that a test can switch off and on: an S3 endpoint that refuses connections.

Tests of storage retries need the S3 endpoint to refuse connections for N
seconds and then come back *with its data intact*. moto's server keeps its
buckets in memory, so stopping and restarting it would lose the bucket;
instead the test points the client at this forwarder in front of moto and
stops/starts the forwarder. ``stop()`` closes the listening socket (new
connections are refused) and resets every live forwarded connection (so a
client's pooled keep-alive connections fail too, as when a real endpoint
goes away); ``start()`` listens again on the same port.

    with Forwarder("127.0.0.1", moto_port) as fwd:
        fs = S3FileSystem(endpoint_override=f"127.0.0.1:{fwd.port}", scheme="http")
        fwd.stop(); time.sleep(20); fwd.start()

Standard library only; an asyncio loop runs in a background thread while started.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from typing import Self

_CHUNK = 64 * 1024
# SO_LINGER on, timeout 0: close() sends RST instead of FIN, so the client sees a reset, not a clean EOF.
_LINGER_RESET = struct.pack("ii", 1, 0)


class Forwarder:
    """Forwards 127.0.0.1:``port`` to ``target_host``:``target_port``; restartable on the same port."""

    def __init__(self, target_host: str, target_port: int, listen_port: int | None = None) -> None:
        self.target = (target_host, target_port)
        self.port = listen_port or 0  # 0 until the first start() picks a free port
        self.bytes_forwarded = 0  # client -> server, all connections, all starts
        self.bytes_returned = 0  # server -> client
        self.connections = 0  # accepted connections, all starts
        # Upstream bytes per second, 0 for no limit: a slow link, so a test can act in the middle of an upload.
        self.upstream_rate = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self) -> Forwarder:
        if self._loop is not None:
            return self
        self._loop = asyncio.new_event_loop()
        # This loop's connections only: a writer of a closed loop cannot even be aborted.
        self._writers, self._tasks = set(), set()
        self._thread = threading.Thread(target=self._loop.run_forever, name="forwarder", daemon=True)
        self._thread.start()
        # reuse_address: the port may still have TIME_WAIT connections from before the last stop().
        coro = asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True)
        try:
            self._server = asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)
        except BaseException:
            self._shutdown_loop()
            raise
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        """Refuse new connections and reset every live one; ``start()`` listens on the same port again."""
        if self._loop is None:
            return
        asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(timeout=10)
        self._shutdown_loop()

    def _shutdown_loop(self) -> None:
        assert self._loop is not None and self._thread is not None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
        self._loop = self._thread = self._server = None

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()  # closes the listening socket now: connects get ECONNREFUSED
        me = asyncio.current_task()
        # Until none is left: a connection accepted just before the close starts its
        # handler after it, and a handler left pending would outlive its loop.
        while others := [task for task in asyncio.all_tasks() if task is not me]:
            for writer in list(self._writers):
                _reset(writer)
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)
        self._writers.clear()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(client_w)
        self.connections += 1
        writers = [client_w]
        pumps: list[asyncio.Task[None]] = []
        try:
            server_r, server_w = await asyncio.open_connection(*self.target)
            writers.append(server_w)
            self._writers.add(server_w)
            pumps = [asyncio.create_task(self._pump(client_r, server_w, True)),
                     asyncio.create_task(self._pump(server_r, client_w, False))]
            await asyncio.gather(*pumps)
        except OSError:
            # Target down, or one side reset: reset the other side too, so no client is left hanging.
            for writer in writers:
                _reset(writer)
        except asyncio.CancelledError:
            pass  # only stop() cancels us, after resetting both sides; asyncio would log a re-raise as an error
        finally:
            for pump in pumps:
                pump.cancel()  # no-op when finished; on stop() or failure, don't leave one running
            await asyncio.gather(*pumps, return_exceptions=True)
            for writer in writers:
                writer.close()
                self._writers.discard(writer)
            self._tasks.discard(task)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: bool) -> None:
        while data := await reader.read(_CHUNK if not (upstream and self.upstream_rate) else 4096):
            if upstream and self.upstream_rate:
                await asyncio.sleep(len(data) / self.upstream_rate)
            writer.write(data)
            await writer.drain()
            if upstream:
                self.bytes_forwarded += len(data)
            else:
                self.bytes_returned += len(data)
        if writer.can_write_eof():
            writer.write_eof()  # pass a half-close on (HTTP clients rarely do it, but keep TCP semantics)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Abort the connection with an RST (not a FIN), so keep-alive clients see 'connection reset'."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        except OSError:
            pass  # already closed
    writer.transport.abort()
