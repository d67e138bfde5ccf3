"""Byte streams for a TDS session: plain TCP, and TLS driven through ``ssl.MemoryBIO``.

Azure SQL speaks TLS in two ways and the emulator serves both on the same port:

* TDS 7.x (``Encrypt=yes``): the client's first bytes are a PRELOGIN packet. After the PRELOGIN
  reply the TLS handshake flights travel *inside* TDS PRELOGIN (0x12) packets in both directions;
  once the handshake is done the connection carries raw TLS records whose plaintext is ordinary TDS
  packets. asyncio's ``start_tls`` cannot do the wrapped part, so the TLS engine is an
  ``SSLObject`` over two memory BIOs and this module moves bytes between the BIOs and either the
  socket or PRELOGIN packets. TLS 1.2 only on this path: TLS 1.3 session tickets written right after
  the handshake would land in the stream where the client expects TDS packets.
* TDS 8.0 (``Encrypt=strict``): the first byte is a TLS record (0x16); the handshake runs directly
  on the socket with ALPN ``tds/8.0`` and TLS 1.3, and TDS (PRELOGIN first) runs inside.

:class:`PlainStream` and :class:`TlsStream` share one tiny interface (``read_exactly``, ``write``,
``close``) so the TDS session code does not care which one it has.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

from sandbox.azuresql import tds

TLS_RECORD_HANDSHAKE = 0x16
ALPN_TDS8 = "tds/8.0"
_READ_CHUNK = 65536


class ByteStream(Protocol):
    async def read_exactly(self, n: int) -> bytes: ...

    async def write(self, data: bytes) -> None: ...

    async def close(self) -> None: ...


class PlainStream:
    """The TCP connection itself, with one-byte look-ahead for protocol sniffing."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._pushback = b""

    async def peek_byte(self) -> int:
        if not self._pushback:
            self._pushback = await self._reader.readexactly(1)
        return self._pushback[0]

    async def read_some(self) -> bytes:
        if self._pushback:
            data, self._pushback = self._pushback, b""
            return data
        return await self._reader.read(_READ_CHUNK)

    async def read_exactly(self, n: int) -> bytes:
        head, self._pushback = self._pushback[:n], self._pushback[n:]
        if len(head) == n:
            return head
        return head + await self._reader.readexactly(n - len(head))

    async def write(self, data: bytes) -> None:
        self._writer.write(data)
        await self._writer.drain()

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()


class TlsStream:
    """TLS over a :class:`PlainStream` through memory BIOs (see the module docstring)."""

    def __init__(self, context: ssl.SSLContext, raw: PlainStream) -> None:
        self._raw = raw
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._buffer = bytearray()

    @property
    def alpn(self) -> str | None:
        return self._ssl.selected_alpn_protocol()

    async def handshake_in_prelogin(self, packet_size: int = tds.MAX_PRELOGIN_PACKET) -> None:
        """TDS 7.x: handshake flights carried as payloads of PRELOGIN packets."""

        async def send(data: bytes) -> None:
            await self._raw.write(tds.packetize(tds.PacketType.PRELOGIN, data, packet_size))

        async def receive() -> bytes:
            ptype, _status, length = tds.parse_header(await self._raw.read_exactly(8))
            if ptype != tds.PacketType.PRELOGIN:
                raise tds.ProtocolError(f"expected a TLS handshake packet, got type 0x{ptype:02x}")
            return await self._raw.read_exactly(length)

        await self._handshake(send, receive)

    async def handshake_direct(self) -> None:
        """TDS 8.0: the handshake is the first thing on the socket."""
        await self._handshake(self._raw.write, self._raw.read_some)

    async def _handshake(
        self, send: Callable[[bytes], Awaitable[None]], receive: Callable[[], Awaitable[bytes]]
    ) -> None:
        while True:
            try:
                self._ssl.do_handshake()
                break
            except ssl.SSLWantReadError:
                pending = self._outgoing.read()
                if pending:
                    await send(pending)
                data = await receive()
                if not data:
                    raise ConnectionResetError(
                        "client closed the connection in the TLS handshake"
                    ) from None
                self._incoming.write(data)
        pending = self._outgoing.read()
        if pending:
            await send(pending)

    async def _flush(self) -> None:
        pending = self._outgoing.read()
        if pending:
            await self._raw.write(pending)

    async def read_exactly(self, n: int) -> bytes:
        while len(self._buffer) < n:
            try:
                self._buffer += self._ssl.read(_READ_CHUNK)
            except ssl.SSLWantReadError:
                await self._flush()
                data = await self._raw.read_some()
                if not data:
                    raise asyncio.IncompleteReadError(bytes(self._buffer), n) from None
                self._incoming.write(data)
            except ssl.SSLZeroReturnError:
                raise asyncio.IncompleteReadError(bytes(self._buffer), n) from None
        out = bytes(self._buffer[:n])
        del self._buffer[:n]
        return out

    async def write(self, data: bytes) -> None:
        self._ssl.write(data)
        await self._flush()

    async def close(self) -> None:
        with contextlib.suppress(ssl.SSLError, OSError):
            self._ssl.unwrap()
        with contextlib.suppress(Exception):
            await self._flush()
        await self._raw.close()


def server_contexts(cert: Path, key: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(TDS 7.x context: TLS 1.2 only, TDS 8.0 context: TLS 1.2+ with ALPN tds/8.0)."""
    legacy = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    legacy.minimum_version = ssl.TLSVersion.TLSv1_2
    legacy.maximum_version = ssl.TLSVersion.TLSv1_2
    legacy.load_cert_chain(cert, key)
    strict = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    strict.minimum_version = ssl.TLSVersion.TLSv1_2
    strict.set_alpn_protocols([ALPN_TDS8])
    strict.load_cert_chain(cert, key)
    return legacy, strict
