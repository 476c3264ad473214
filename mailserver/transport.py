# -*- test-case-name: tests.test_transport -*-
"""
Small helpers over Twisted transports, shared by the protocol servers: write a reply now,
pause reading, turn Nagle off.
"""

from __future__ import annotations

from twisted.internet import tcp
from twisted.internet.interfaces import ITransport


def write_now(transport: ITransport, data: bytes) -> None:
    """
    Write C{data}, sending it at once when the connection is plain TCP with nothing queued.

    C{transport.write} only queues and asks the reactor to watch the socket for writability,
    so each reply costs two more C{epoll_ctl} calls and a trip through the reactor loop; a
    reply is small and the socket almost always has room. A TLS connection (STARTTLS flips
    C{TLS} to true), a wrapped transport, or queued data take the normal path, which keeps the
    order of bytes.
    """
    if (
        isinstance(transport, tcp.Connection)
        and transport.TLS is False
        and transport.connected
        and not transport.disconnecting
        and not transport.dataBuffer
        and not transport._tempDataBuffer
        and transport.producer is None
    ):
        sent = transport.writeSomeData(data)
        if isinstance(sent, int):
            if sent == len(data):
                return
            data = data[sent:]
    transport.write(data)


def pause(transport: object, paused: bool) -> None:
    """Stop (or start again) reading from the connection: TCP pushes back on the client."""
    method = getattr(transport, "pauseProducing" if paused else "resumeProducing", None)
    if method is not None:
        method()


def set_nodelay(transport: object) -> None:
    """Turn Nagle off on the TCP connection under C{transport} (through a TLS wrapper)."""
    for t in (transport, getattr(transport, "transport", None)):
        setter = getattr(t, "setTcpNoDelay", None)
        if setter is not None:
            try:
                setter(True)
            except OSError:
                pass
            return
