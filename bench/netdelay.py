"""A TCP proxy that delivers every byte a fixed delay after it arrived, in each direction: the network between a
function and Firestore, which the local emulator (on the same machine) does not have.

Each chunk read from one side is written to the other `delay` seconds after it was read, in order; nothing is
throttled, so a round trip costs two delays more and reads made at once wait them side by side.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator

from shared import config


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def deliver() -> None:
        while True:
            due, chunk = await queue.get()
            if not chunk:
                break
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(chunk)
            await writer.drain()
        with contextlib.suppress(OSError):
            writer.close()

    delivering = asyncio.ensure_future(deliver())
    try:
        while chunk := await reader.read(65536):
            queue.put_nowait((time.monotonic() + delay, chunk))
    except OSError:
        pass
    finally:
        queue.put_nowait((0.0, b""))
        with contextlib.suppress(OSError):
            await delivering


async def _serve_forever(upstream: str, delay: float) -> None:
    host, port = upstream.rsplit(":", 1)

    async def serve(downstream_reader: asyncio.StreamReader, downstream_writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(host, int(port))
        await asyncio.gather(_pump(downstream_reader, upstream_writer, delay), _pump(upstream_reader, downstream_writer, delay))

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    print(f"127.0.0.1:{server.sockets[0].getsockname()[1]}", flush=True)
    await server.serve_forever()


@contextlib.contextmanager
def delayed(upstream: str, delay: float) -> Iterator[str]:
    """A proxy to `upstream` (host:port) adding `delay` seconds each way, in a process of its own (its work is the
    network's, not the measured client's); yields its host:port."""
    proxy = subprocess.Popen(
        [sys.executable, "-m", "bench.netdelay", upstream, str(delay)], stdout=subprocess.PIPE, text=True, cwd=config.REPO_ROOT
    )
    try:
        assert proxy.stdout is not None
        address = proxy.stdout.readline().strip()
        if not address:
            raise RuntimeError(f"the delaying proxy did not start (exit {proxy.poll()})")
        yield address
    finally:
        proxy.terminate()
        proxy.wait(10)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve_forever(sys.argv[1], float(sys.argv[2])))
