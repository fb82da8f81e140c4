"""The gateway's upstream client when the upstream closes a connection without answering (what a
kept-alive connection closed by the server at the moment a request goes out looks like): sent once
more on a fresh connection, and a 502 only when the second try fails the same way."""

from __future__ import annotations

import asyncio
import json

import pytest

from genforge.serve.upstream import UpstreamError, UpstreamService

MODELS = {"object": "list", "data": [{"id": "m", "object": "model", "created": 0, "owned_by": "x"}]}


async def _upstream(drop_first: int) -> tuple[asyncio.AbstractServer, str, list[str]]:
    """An HTTP/1.1 server on a real port that reads each request and, for the first `drop_first` of them,
    closes the connection without a byte of response; it answers the others with MODELS."""
    seen: list[str] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n") if not reader.at_eof() else b""
            if not head:
                break
            seen.append(head.split(b"\r\n", 1)[0].decode())
            if len(seen) <= drop_first:
                break
            body = json.dumps(MODELS).encode()
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                         + str(len(body)).encode() + b"\r\n\r\n" + body)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", seen


def test_a_request_the_upstream_dropped_unanswered_is_sent_once_more() -> None:
    async def main() -> None:
        server, url, seen = await _upstream(drop_first=1)
        service = UpstreamService(url)
        try:
            resp = await service.models()
        finally:
            await service.close()
            server.close()
        assert resp.status_code == 200 and json.loads(resp.body) == MODELS
        assert seen == ["GET /v1/models HTTP/1.1"] * 2

    asyncio.run(main())


def test_an_upstream_that_drops_it_twice_is_a_502() -> None:
    async def main() -> None:
        server, url, seen = await _upstream(drop_first=10)
        service = UpstreamService(url)
        try:
            with pytest.raises(UpstreamError, match="cannot be reached") as err:
                await service.models()
        finally:
            await service.close()
            server.close()
        assert err.value.status == 502 and err.value.code == "upstream_unavailable"
        assert len(seen) == 2  # one retry, not a loop

    asyncio.run(main())
