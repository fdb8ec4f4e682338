"""The HTTP server against hostile or careless clients on loopback (issue #18): slow-header clients and
idle connections are closed, a connection cap holds, /healthz needs no token, the Bearer scheme is
case-insensitive, and a 100 KB header gets a clean 431 without an ERROR traceback in the log."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import aiohttp
import pytest

from daemon.http import HttpServer
from daemon.metrics import Metrics


def _server(token: str = "", **limits: float) -> HttpServer:
    if not limits:  # the defaults
        return HttpServer("127.0.0.1", 0, Metrics().render, lambda: {"ok": True}, token)
    from daemon.config import HttpConfig

    return HttpServer("127.0.0.1", 0, Metrics().render, lambda: {"ok": True}, token,
                      limits=HttpConfig(**limits))


async def _closed_by_server(reader: asyncio.StreamReader, within_s: float) -> bool:
    """True when the server closes the connection (EOF or reset) within ``within_s``."""
    try:
        data = await asyncio.wait_for(reader.read(65536), within_s)
    except (ConnectionError, OSError):
        return True
    except TimeoutError:
        return False
    while data:  # an error response first is fine; then EOF must follow
        try:
            data = await asyncio.wait_for(reader.read(65536), within_s)
        except (ConnectionError, OSError):
            return True
        except TimeoutError:
            return False
    return True


def test_slow_header_clients_are_closed() -> None:
    async def main() -> None:
        async with _server(header_timeout_s=0.5, idle_timeout_s=30.0) as srv:
            conns = [await asyncio.open_connection("127.0.0.1", srv.port) for _ in range(5)]
            t0 = time.monotonic()

            async def trickle(writer: asyncio.StreamWriter) -> None:  # one byte every 0.1 s, never done
                with contextlib.suppress(ConnectionError, OSError):
                    for ch in b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
                        writer.write(bytes([ch]))
                        await writer.drain()
                        await asyncio.sleep(0.1)

            tasks = [asyncio.create_task(trickle(w)) for _, w in conns]
            closed = await asyncio.gather(*(_closed_by_server(r, 5.0) for r, _ in conns))
            elapsed = time.monotonic() - t0
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            assert all(closed), closed
            assert elapsed < 3.0, elapsed  # the idle timer (30 s) did not do it
            assert srv.stats.header_timeouts == 5

    asyncio.run(main())


def test_idle_connections_are_closed() -> None:
    async def main() -> None:
        async with _server(idle_timeout_s=0.5) as srv:
            silent = [await asyncio.open_connection("127.0.0.1", srv.port) for _ in range(50)]
            reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)  # keep-alive after a request
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200")
            length = next(int(ln.split(b":")[1]) for ln in head.split(b"\r\n")
                          if ln.lower().startswith(b"content-length"))
            await reader.readexactly(length)
            t0 = time.monotonic()
            closed = await asyncio.gather(*(_closed_by_server(r, 5.0) for r, _ in [*silent, (reader, writer)]))
            assert all(closed) and time.monotonic() - t0 < 4.0

    asyncio.run(main())


def test_connection_cap() -> None:
    async def main() -> None:
        async with _server(max_connections=8, idle_timeout_s=30.0) as srv:
            held = [await asyncio.open_connection("127.0.0.1", srv.port) for _ in range(8)]
            await asyncio.sleep(0.2)
            extra_r, _ = await asyncio.open_connection("127.0.0.1", srv.port)
            assert await _closed_by_server(extra_r, 3.0)
            assert srv.stats.refused == 1
            for _, w in held:  # freeing slots lets clients in again
                w.close()
            await asyncio.sleep(0.3)
            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://127.0.0.1:{srv.port}/healthz") as r:
                    assert r.status == 200

    asyncio.run(main())


def test_healthz_exempt_and_bearer_scheme_case_insensitive() -> None:
    async def main() -> None:
        async with _server(token="s3cret") as srv:
            url = f"http://127.0.0.1:{srv.port}"
            async with aiohttp.ClientSession() as http:
                async with http.get(url + "/healthz") as r:  # a liveness probe has no token
                    assert r.status == 200 and (await r.json()) == {"ok": True}
                async with http.get(url + "/metrics") as r:
                    assert r.status == 401
                for scheme in ("Bearer", "bearer", "BEARER", "bEaReR"):
                    async with http.get(url + "/metrics", headers={"Authorization": f"{scheme} s3cret"}) as r:
                        assert r.status == 200, scheme
                for bad in ("Bearer s3cre", "Basic s3cret", "s3cret", "Bearer"):
                    async with http.get(url + "/metrics", headers={"Authorization": bad}) as r:
                        assert r.status == 403, bad

    asyncio.run(main())


def test_huge_header_gets_431_without_traceback(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> bytes:
        async with _server() as srv:
            reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n")
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            try:
                return await asyncio.wait_for(reader.read(4096), 5)
            except ConnectionError:
                return b"(reset)"

    with caplog.at_level(logging.DEBUG):
        reply = asyncio.run(main())
    assert reply.split(b"\r\n")[0].endswith(b" 431 Request Header Fields Too Large"), reply[:100]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]
    assert not any(r.exc_info for r in caplog.records if r.levelno >= logging.INFO)
