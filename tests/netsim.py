"""
A small simulated Internet on loopback, for tests of outbound mail (and end-to-end tests).

Everything here is real network code on 127.0.0.0/8, so the code under test uses its real
sockets, parsers and TLS:

  - L{start_dns}: a twisted.names DNS server (UDP and TCP on 127.0.0.1, a free port) serving
    zones given as plain dicts, changeable during a test (L{DNSFixture.set}), with names that
    answer SERVFAIL (L{DNSFixture.servfail}).
  - L{start_silent_udp}: a UDP port that takes queries and never answers (resolver timeouts).
  - L{start_sink} / L{start_sinks}: SMTP servers that record what arrives (L{Sink.messages})
    and misbehave on request (L{SinkBehaviour}: temporary failures, refused recipients, a
    connection dropped in the middle of DATA, a 421/554 greeting, which extensions are
    offered, STARTTLS, AUTH PLAIN).
  - L{TestCA}: a certificate authority made in the test, to issue server certificates and to
    give clients a trust root.
  - L{unused_port}: a port where nothing listens (a "down" host).

MX hosts are usually different loopback addresses (127.0.0.2, 127.0.0.3, ...) all listening on
the same port: give that port to the delivery code as its MX port. Linux routes all of
127.0.0.0/8 to the loopback interface, so no set-up is needed.

Every fixture has a C{stop()} returning a Deferred; call it (e.g. with C{addCleanup}) so that
the reactor is clean at the end of the test.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet import ssl
from twisted.internet._sslverify import IOpenSSLTrustRoot
from twisted.internet.defer import Deferred, DeferredList, fail, maybeDeferred, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
from twisted.names import common, error, server
from twisted.names import dns as tdns
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

from mailserver.tls import ServerTLS

__all__ = [
    "DNSFixture",
    "SilentUDP",
    "Sink",
    "SinkBehaviour",
    "SinkMessage",
    "TestCA",
    "start_dns",
    "start_silent_udp",
    "start_sink",
    "start_sinks",
    "unused_port",
]

# --- DNS ------------------------------------------------------------------------------------

_TYPES = {
    "A": tdns.A,
    "AAAA": tdns.AAAA,
    "MX": tdns.MX,
    "CNAME": tdns.CNAME,
    "TXT": tdns.TXT,
}
_TYPE_NAMES = {v: k for k, v in _TYPES.items()}
_TTL = 60


class _ServFail(Exception):
    """Makes the server answer SERVFAIL (without logging an error)."""


def _key(name: str | bytes) -> str:
    if isinstance(name, bytes):
        name = name.decode("ascii")
    return name.strip().rstrip(".").lower()


class _Zones(common.ResolverBase):
    """
    The records the fixture serves: C{{name: {rtype: [values]}}}. A name in the table exists
    (NOERROR, possibly with no data); any other name is NXDOMAIN. A CNAME is followed to its
    target within the table.
    """

    def __init__(self) -> None:
        common.ResolverBase.__init__(self)
        self.records: dict[str, dict[str, list[Any]]] = {}
        self.failing: set[str] = set()
        self.queries: list[tuple[str, str]] = []

    def _lookup(self, name: bytes, cls: int, type: int, timeout: Any) -> Deferred[Any]:  # noqa: A002
        key = _key(name)
        self.queries.append((key, _TYPE_NAMES.get(type, str(type))))
        answers: list[tdns.RRHeader] = []
        current = key
        for _ in range(8):
            if current in self.failing:
                return fail(_ServFail(current))
            records = self.records.get(current)
            if records is None:
                if answers:
                    return succeed((answers, [], []))
                return fail(error.AuthoritativeDomainError(current))
            cname = records.get("CNAME")
            if cname and type != tdns.CNAME:
                answers.append(self._rr(current, "CNAME", cname[0]))
                current = _key(cname[0])
                continue
            for value in records.get(_TYPE_NAMES.get(type, ""), []):
                answers.append(self._rr(current, _TYPE_NAMES[type], value))
            break
        return succeed((answers, [], []))

    @staticmethod
    def _rr(name: str, rtype: str, value: Any) -> tdns.RRHeader:
        payload: Any
        if rtype == "A":
            payload = tdns.Record_A(value, ttl=_TTL)
        elif rtype == "AAAA":
            payload = tdns.Record_AAAA(value, ttl=_TTL)
        elif rtype == "MX":
            preference, host = value
            host = "" if host in (".", "") else host
            payload = tdns.Record_MX(preference, host.encode("idna") if host else b"", ttl=_TTL)
        elif rtype == "CNAME":
            payload = tdns.Record_CNAME(value.encode("ascii"), ttl=_TTL)
        else:
            data = value.encode() if isinstance(value, str) else value
            parts = [data[i : i + 255] for i in range(0, len(data), 255)] or [b""]
            payload = tdns.Record_TXT(*parts, ttl=_TTL)
        return tdns.RRHeader(name.encode("ascii"), payload.TYPE, tdns.IN, _TTL, payload, auth=True)


class _ServerFactory(server.DNSServerFactory):
    tcp_queries = 0

    def messageReceived(self, message: Any, proto: Any, address: Any = None) -> None:
        if address is None:
            self.tcp_queries += 1
        super().messageReceived(message, proto, address)

    def sendReply(self, protocol: Any, message: Any, address: Any) -> None:
        # Truncate UDP answers beyond the asker's payload size like a real server: header and
        # question only, TC set (twisted.names does not truncate EDNS answers itself).
        if address is not None:
            limit = max(getattr(message, "maxSize", 512) or 512, 512)
            if len(message.toStr()) > limit:
                message.answers, message.authority, message.additional = [], [], []
                message.trunc = 1
        super().sendReply(protocol, message, address)

    def gotResolverError(self, failure: Failure, protocol: Any, message: Any, address: Any) -> None:
        # DNSServerFactory logs every failure as an error, which trial counts against the
        # test; a SERVFAIL asked for is no error.
        if failure.check(error.DomainError, error.AuthoritativeDomainError):
            rcode = tdns.ENAME
        elif failure.check(_ServFail):
            rcode = tdns.ESERVER
        else:  # pragma: no cover - a bug in the fixture
            super().gotResolverError(failure, protocol, message, address)
            return
        response = self._responseFromMessage(message=message, rCode=rcode)
        self.sendReply(protocol, response, address)


class DNSFixture:
    """
    A running loopback DNS server (see L{start_dns}).

    @ivar port: the UDP and TCP port on 127.0.0.1.
    @ivar nameserver: C{"127.0.0.1:PORT"}, as C{DNSConfig.nameservers} takes it.
    @ivar queries: every question asked so far, as C{(name, rtype)} (C{("example.test",
        "MX")}), names lower case without the trailing dot.
    """

    def __init__(self, zones: _Zones, factory: _ServerFactory, udp: Any, tcp: Any) -> None:
        self._zones = zones
        self._factory = factory
        self._udp = udp
        self._tcp = tcp
        self.port: int = udp.getHost().port
        self.nameserver = f"127.0.0.1:{self.port}"

    @property
    def queries(self) -> list[tuple[str, str]]:
        return self._zones.queries

    @property
    def tcp_queries(self) -> int:
        """How many queries came over TCP (after a truncated UDP answer, say)."""
        return self._factory.tcp_queries

    def set(self, name: str, rtype: str, values: Sequence[Any]) -> None:
        """
        Replace the C{rtype} records of C{name} (creating the name); an empty C{values}
        removes them (the name stays: NODATA).

        Values: C{"A"}/C{"AAAA"}: address strings; C{"MX"}: C{(preference, host)} pairs, host
        C{"."} for a null MX (RFC 7505); C{"CNAME"}: one target name; C{"TXT"}: strings (or
        bytes), each one record, split in 255-octet strings as needed.
        """
        rtype = rtype.upper()
        if isinstance(values, str | bytes):
            values = [values]
        if rtype not in _TYPES:
            raise ValueError(f"unsupported record type {rtype!r}")
        records = self._zones.records.setdefault(_key(name), {})
        if values:
            records[rtype] = list(values)
        else:
            records.pop(rtype, None)

    def remove(self, name: str) -> None:
        """Forget C{name}: it answers NXDOMAIN from now on."""
        self._zones.records.pop(_key(name), None)
        self._zones.failing.discard(_key(name))

    def servfail(self, name: str, on: bool = True) -> None:
        """Make every question about C{name} (or reached through a CNAME) answer SERVFAIL."""
        if on:
            self._zones.failing.add(_key(name))
        else:
            self._zones.failing.discard(_key(name))

    def stop(self) -> Deferred[Any]:
        """Close both ports."""
        return DeferredList(
            [maybeDeferred(self._udp.stopListening), maybeDeferred(self._tcp.stopListening)]
        )


def start_dns(reactor: Any, zones: Mapping[str, Mapping[str, Any]] | None = None) -> DNSFixture:
    """
    Start a DNS server on 127.0.0.1 (UDP and TCP, the same free port) serving C{zones}.

    C{zones} maps names to their records by type, e.g.::

        {"example.test": {"MX": [(10, "mx1.example.test"), (20, "mx2.example.test")]},
         "mx1.example.test": {"A": ["127.0.0.2"]},
         "null.test": {"MX": [(0, ".")]},
         "alias.test": {"CNAME": "example.test"},
         "broken.test": {"SERVFAIL": True}}

    Types: A, AAAA, MX, CNAME (one name, or a one-element list), TXT, and the pseudo-type
    C{"SERVFAIL"} (true: the name answers SERVFAIL). A name present with no records answers
    NOERROR with no data; an absent one NXDOMAIN. UDP answers are truncated (TC) beyond the
    asker's EDNS payload size (512 without EDNS), so large record sets exercise TCP.
    """
    table = _Zones()
    fixture_zones = zones or {}
    for name, records in fixture_zones.items():
        for rtype, values in records.items():
            if rtype.upper() == "SERVFAIL":
                if values:
                    table.failing.add(_key(name))
                table.records.setdefault(_key(name), {})
                continue
            if rtype.upper() == "CNAME" and isinstance(values, str):
                values = [values]
            table.records.setdefault(_key(name), {})[rtype.upper()] = list(values)
    factory = _ServerFactory(authorities=[table], verbose=0)
    for _ in range(20):
        udp = reactor.listenUDP(0, tdns.DNSDatagramProtocol(factory), interface="127.0.0.1")
        try:
            tcp = reactor.listenTCP(udp.getHost().port, factory, interface="127.0.0.1")
        except CannotListenError:
            udp.stopListening()
            continue
        return DNSFixture(table, factory, udp, tcp)
    raise RuntimeError("no port free for both UDP and TCP")  # pragma: no cover


class _Silent(DatagramProtocol):
    def __init__(self) -> None:
        self.received = 0

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.received += 1


class SilentUDP:
    """
    A UDP port on 127.0.0.1 that takes datagrams and never answers (see L{start_silent_udp}).

    @ivar nameserver: C{"127.0.0.1:PORT"}.
    @ivar received: how many datagrams arrived.
    """

    def __init__(self, port: Any, protocol: _Silent) -> None:
        self._port = port
        self._protocol = protocol
        self.nameserver = f"127.0.0.1:{port.getHost().port}"

    @property
    def received(self) -> int:
        return self._protocol.received

    def stop(self) -> Deferred[Any]:
        return maybeDeferred(self._port.stopListening)


def start_silent_udp(reactor: Any) -> SilentUDP:
    """A name server that never answers: for resolver timeouts."""
    protocol = _Silent()
    return SilentUDP(reactor.listenUDP(0, protocol, interface="127.0.0.1"), protocol)


def unused_port(interface: str = "127.0.0.1") -> int:
    """A TCP port where nothing listens on C{interface} right now (bound, then closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((interface, 0))
        port: int = s.getsockname()[1]
    return port


# --- SMTP sinks -----------------------------------------------------------------------------


@dataclass
class SinkBehaviour:
    """
    What a sink offers and how it misbehaves. The default accepts everything and offers
    PIPELINING, 8BITMIME, SMTPUTF8, DSN, ENHANCEDSTATUSCODES and SIZE (no limit stated).

    A I{transaction} is a MAIL command that got its C{250}; counters (C{temp_fail},
    C{drop_in_data}) count transactions over all connections of the sink.
    """

    greeting: int = 220
    """The greeting's code: 421 or 554 make the host unusable (the sink then closes)."""
    ehlo: bool = True
    """False: EHLO is answered 502 (an old HELO-only server)."""
    pipelining: bool = True
    eight_bit_mime: bool = True
    smtputf8: bool = True
    dsn: bool = True
    enhanced_status_codes: bool = True
    size: int | None = 0
    """C{SIZE n} offered (0: no limit stated) and enforced at MAIL; None: SIZE not offered."""
    tls: Any = None
    """A server TLS connection creator (L{ServerTLS}): STARTTLS is offered (before TLS)."""
    implicit_tls: bool = False
    """With C{tls}: TLS from the first byte instead of STARTTLS."""
    auth: tuple[str, str] | None = None
    """C{(user, password)}: AUTH PLAIN offered (after STARTTLS when C{tls} is set)."""
    auth_required: bool = False
    """MAIL is refused (530 5.7.0) before a successful AUTH."""
    temp_fail: int = 0
    """The first N transactions get a temporary failure (see C{temp_fail_at})."""
    temp_fail_at: Literal["rcpt", "data"] = "rcpt"
    """rcpt: every RCPT is answered 451 4.3.0; data: the end of DATA is answered 451 4.3.0."""
    reject: frozenset[str] = frozenset()
    """Recipients answered 550 5.1.1 at RCPT."""
    mail_reply: str | None = None
    """A reply line (C{"550 5.7.1 go away"}) for every MAIL instead of 250."""
    drop_in_data: int = 0
    """The first N transactions lose the connection (abort) when message data arrives."""


@dataclass
class SinkMessage:
    """
    One message the sink accepted (the end of DATA answered 250).

    @ivar data: the message as received, after removing dot-stuffing and the final C{.}
        line, byte for byte (a bare LF stays a bare LF).
    @ivar raw: the DATA octets exactly as on the wire, up to and including C{CRLF.CRLF}.
    """

    mail_from: str
    mail_params: dict[str, str | None]
    rcpts: list[tuple[str, dict[str, str | None]]]
    data: bytes
    raw: bytes
    tls: bool
    auth: str | None
    helo: str

    @property
    def recipients(self) -> list[str]:
        return [address for address, _ in self.rcpts]


class Sink:
    """
    A running SMTP sink (see L{start_sink}).

    @ivar interface: its address; C{port}: its port; C{hop}: C{"[interface]:port"} (a route's
        C{host}).
    @ivar messages: accepted messages, in order (L{SinkMessage}).
    @ivar connections: connections accepted so far.
    @ivar transactions: MAIL commands answered 250 so far.
    @ivar commands: every command line received (CRLF removed, AUTH arguments hidden), all
        connections.
    """

    def __init__(self, behaviour: SinkBehaviour) -> None:
        self.behaviour = behaviour
        self.messages: list[SinkMessage] = []
        self.connections = 0
        self.transactions = 0
        self.commands: list[str] = []
        self.interface = ""
        self.port = 0
        self._listening: Any = None
        self._open: set[_SinkProtocol] = set()

    @property
    def hop(self) -> str:
        return f"[{self.interface}]:{self.port}"

    def stop(self) -> Deferred[Any]:
        """Stop listening and abort the connections still open; fires when all are closed."""
        waits: list[Deferred[Any]] = [maybeDeferred(self._listening.stopListening)]
        for proto in list(self._open):
            waits.append(proto.closed)
            if proto.transport is not None:
                proto.transport.abortConnection()  # type: ignore[attr-defined]
        return DeferredList(waits)


_CMD, _DATA, _AUTH = range(3)


class _SinkProtocol(Protocol):
    def __init__(self, sink: Sink, tls: bool) -> None:
        self.sink = sink
        self.b = sink.behaviour
        self.closed: Deferred[None] = Deferred()
        self._buf = b""
        self._mode = _CMD
        self._tls = tls
        self._helo = ""
        self._esmtp = False
        self._auth: str | None = None
        self._reset()

    def _reset(self) -> None:
        self._from: str | None = None
        self._params: dict[str, str | None] = {}
        self._rcpts: list[tuple[str, dict[str, str | None]]] = []
        self._temp = False
        self._drop = False

    def connectionMade(self) -> None:
        self.sink.connections += 1
        self.sink._open.add(self)
        code = self.b.greeting
        if code != 220:
            self._send(f"{code} sink.test not accepting mail")
            assert self.transport is not None
            self.transport.loseConnection()
            return
        self._send("220 sink.test ESMTP sink")

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008
        self.sink._open.discard(self)
        if not self.closed.called:
            self.closed.callback(None)

    def _send(self, *lines: str) -> None:
        if self.transport is not None:
            self.transport.write("".join(line + "\r\n" for line in lines).encode("utf-8"))

    def dataReceived(self, data: bytes) -> None:
        self._buf += data
        while self.transport is not None:
            if self._mode == _DATA:
                if not self._data():
                    return
                continue
            end = self._buf.find(b"\r\n")
            if end < 0:
                return
            line, self._buf = self._buf[:end], self._buf[end + 2 :]
            text = line.decode("utf-8", "replace")
            if self._mode == _AUTH:
                self.sink.commands.append("(auth response)")
                self._mode = _CMD
                self._check_plain(text)
                continue
            self._command(text)

    def _command(self, text: str) -> None:
        verb, _, arg = text.partition(" ")
        verb = verb.upper()
        self.sink.commands.append(f"{verb} (hidden)" if verb == "AUTH" else text)
        handler = getattr(self, "_c_" + verb.lower(), None) if verb.isalpha() else None
        if handler is None:
            self._send("500 5.5.2 command not recognized")
            return
        handler(arg)

    # -- commands --------------------------------------------------------------------------

    def _extensions(self) -> list[str]:
        b = self.b
        ext = []
        if b.pipelining:
            ext.append("PIPELINING")
        if b.eight_bit_mime:
            ext.append("8BITMIME")
        if b.smtputf8:
            ext.append("SMTPUTF8")
        if b.dsn:
            ext.append("DSN")
        if b.enhanced_status_codes:
            ext.append("ENHANCEDSTATUSCODES")
        if b.size is not None:
            ext.append(f"SIZE {b.size}" if b.size else "SIZE")
        if b.tls is not None and not b.implicit_tls and not self._tls:
            ext.append("STARTTLS")
        if b.auth is not None and (self._tls or b.tls is None):
            ext.append("AUTH PLAIN")
        return ext

    def _c_ehlo(self, arg: str) -> None:
        if not self.b.ehlo:
            self._send("502 5.5.1 EHLO not implemented")
            return
        self._helo, self._esmtp = arg.strip(), True
        self._reset()
        lines = ["sink.test greets " + self._helo, *self._extensions()]
        self._send(*[f"250-{x}" for x in lines[:-1]], f"250 {lines[-1]}")

    def _c_helo(self, arg: str) -> None:
        self._helo, self._esmtp = arg.strip(), False
        self._reset()
        self._send("250 sink.test")

    def _c_starttls(self, arg: str) -> None:
        if "STARTTLS" not in self._extensions():
            self._send("502 5.5.1 STARTTLS not available")
            return
        self._send("220 2.0.0 ready to start TLS")
        self._buf = b""
        assert self.transport is not None
        self.transport.startTLS(self.b.tls)  # type: ignore[attr-defined]
        self._tls = True
        self._helo, self._esmtp = "", False
        self._reset()

    def _c_auth(self, arg: str) -> None:
        words = arg.split()
        if "AUTH PLAIN" not in self._extensions() or not words or words[0].upper() != "PLAIN":
            self._send("504 5.5.4 mechanism not available")
            return
        if self._auth is not None:
            self._send("503 5.5.1 already authenticated")
            return
        if len(words) == 1:
            self._mode = _AUTH
            self._send("334 ")
            return
        self._check_plain(words[1])

    def _check_plain(self, response: str) -> None:
        assert self.b.auth is not None
        try:
            parts = base64.b64decode(response, validate=True).split(b"\0")
        except (binascii.Error, ValueError):
            self._send("501 5.5.2 bad base64")
            return
        user, password = self.b.auth
        if len(parts) == 3 and parts[1] == user.encode() and parts[2] == password.encode():
            self._auth = user
            self._send("235 2.7.0 authenticated")
        else:
            self._send("535 5.7.8 authentication failed")

    def _c_mail(self, arg: str) -> None:
        if not self._helo:
            self._send("503 5.5.1 EHLO first")
            return
        if self._from is not None:
            self._send("503 5.5.1 nested MAIL")
            return
        if self.b.auth_required and self._auth is None:
            self._send("530 5.7.0 authentication required")
            return
        path = _path(arg, "FROM:")
        if path is None:
            self._send("501 5.5.4 syntax: MAIL FROM:<address>")
            return
        address, params = path
        ext = {e.split()[0] for e in self._extensions()}
        allowed = {
            "SIZE": "SIZE",
            "BODY": "8BITMIME",
            "SMTPUTF8": "SMTPUTF8",
            "RET": "DSN",
            "ENVID": "DSN",
        }
        for name in params:
            if allowed.get(name) not in ext:
                self._send(f"555 5.5.4 parameter {name} not supported")
                return
        size = params.get("SIZE")
        if self.b.size and size is not None and int(size) > self.b.size:
            self._send("552 5.3.4 message too big")
            return
        if self.b.mail_reply is not None:
            self._send(self.b.mail_reply)
            return
        self.sink.transactions += 1
        n = self.sink.transactions
        self._from, self._params = address, params
        self._temp = n <= self.b.temp_fail
        self._drop = n <= self.b.drop_in_data
        self._send("250 2.1.0 sender ok")

    def _c_rcpt(self, arg: str) -> None:
        if self._from is None:
            self._send("503 5.5.1 MAIL first")
            return
        path = _path(arg, "TO:")
        if path is None:
            self._send("501 5.5.4 syntax: RCPT TO:<address>")
            return
        address, params = path
        for name in params:
            if name not in ("NOTIFY", "ORCPT") or not self.b.dsn:
                self._send(f"555 5.5.4 parameter {name} not supported")
                return
        if self._temp and self.b.temp_fail_at == "rcpt":
            self._send("451 4.3.0 try again later")
        elif address in self.b.reject:
            self._send("550 5.1.1 no such user")
        else:
            self._rcpts.append((address, params))
            self._send("250 2.1.5 recipient ok")

    def _c_data(self, arg: str) -> None:
        if self._from is None:
            self._send("503 5.5.1 MAIL first")
        elif not self._rcpts:
            self._send("554 5.5.1 no valid recipients")
        else:
            self._mode = _DATA
            self._send("354 go ahead")

    def _data(self) -> bool:
        """Consume DATA input; False when the end has not arrived yet."""
        if self._drop:
            assert self.transport is not None
            self._buf = b""
            self.transport.abortConnection()  # type: ignore[attr-defined]
            return False
        buf = b"\r\n" + self._buf
        end = buf.find(b"\r\n.\r\n")
        if end < 0:
            return False
        raw = buf[2 : end + 5]
        self._buf = buf[end + 5 :]
        self._mode = _CMD
        lines = buf[2:end].split(b"\r\n") if end > 0 else []
        data = b"".join((line[1:] if line.startswith(b".") else line) + b"\r\n" for line in lines)
        if self._temp and self.b.temp_fail_at == "data":
            self._send("451 4.3.0 try again later")
        else:
            assert self._from is not None
            self.sink.messages.append(
                SinkMessage(
                    self._from,
                    self._params,
                    self._rcpts,
                    data,
                    raw,
                    self._tls,
                    self._auth,
                    self._helo,
                )
            )
            self._send("250 2.0.0 message accepted")
        self._reset()
        return True

    def _c_rset(self, arg: str) -> None:
        self._reset()
        self._send("250 2.0.0 reset")

    def _c_noop(self, arg: str) -> None:
        self._send("250 2.0.0 ok")

    def _c_quit(self, arg: str) -> None:
        self._send("221 2.0.0 bye")
        assert self.transport is not None
        self.transport.loseConnection()


def _path(arg: str, keyword: str) -> tuple[str, dict[str, str | None]] | None:
    if not arg[: len(keyword)].upper() == keyword:
        return None
    rest = arg[len(keyword) :].strip()
    if not rest.startswith("<") or ">" not in rest:
        return None
    address, _, params_text = rest[1:].partition(">")
    params: dict[str, str | None] = {}
    for word in params_text.split():
        name, eq, value = word.partition("=")
        params[name.upper()] = value if eq else None
    return address, params


class _SinkFactory(Factory):
    def __init__(self, sink: Sink) -> None:
        self.sink = sink

    def buildProtocol(self, addr: Any) -> _SinkProtocol:
        return _SinkProtocol(self.sink, self.sink.behaviour.implicit_tls)


def start_sink(
    reactor: Any,
    behaviour: SinkBehaviour | None = None,
    interface: str = "127.0.0.2",
    port: int = 0,
) -> Sink:
    """
    Start an SMTP sink listening on C{interface}:C{port} (0: a free port; see L{Sink.port}).

    The sink speaks enough ESMTP for a client: EHLO/HELO, STARTTLS, AUTH PLAIN (initial
    response or 334), MAIL (refusing parameters of extensions it did not offer, with 555),
    RCPT, DATA (un-dot-stuffing; only CRLF.CRLF ends it), RSET, NOOP, QUIT. Commands that
    arrive together (pipelining) are answered in order.

    @raise CannotListenError: the port is taken on that address.
    """
    sink = Sink(behaviour or SinkBehaviour())
    factory: Any = _SinkFactory(sink)
    if sink.behaviour.implicit_tls:
        factory = TLSMemoryBIOFactory(sink.behaviour.tls, False, factory)
    sink._listening = reactor.listenTCP(port, factory, interface=interface)
    sink.interface = interface
    sink.port = sink._listening.getHost().port
    return sink


def start_sinks(
    reactor: Any, behaviours: Mapping[str, SinkBehaviour | None]
) -> tuple[int, dict[str, Sink]]:
    """
    Start one sink per address of C{behaviours} (C{{"127.0.0.2": SinkBehaviour(), ...}}),
    all on the same free port (as MX hosts on port 25).

    @return: C{(port, {address: sink})}.
    """
    for _ in range(20):
        started: dict[str, Sink] = {}
        port = 0
        try:
            for address, behaviour in behaviours.items():
                sink = start_sink(reactor, behaviour, interface=address, port=port)
                port = sink.port
                started[address] = sink
        except CannotListenError:
            for sink in started.values():
                sink._listening.stopListening()
            continue
        return port, started
    raise RuntimeError("no port free on all the addresses")  # pragma: no cover


# --- TLS --------------------------------------------------------------------------------------


class TestCA:
    """
    A certificate authority made for one test (ECDSA P-256, valid for a day).

    @ivar cert_pem: its certificate, PEM.
    """

    __test__ = False  # not a test case, whatever its name

    def __init__(self, name: str = "mailserver test CA") -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.now(UTC)
        public = self._key.public_key()
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(hours=1))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        self.cert_pem = self._cert.public_bytes(serialization.Encoding.PEM)

    def trust_root(self) -> IOpenSSLTrustRoot:
        """A trust root (for C{optionsForClientTLS}) that trusts this CA only."""
        root: IOpenSSLTrustRoot = ssl.trustRootFromCertificates(
            [ssl.Certificate.loadPEM(self.cert_pem)]
        )
        return root

    def issue(self, directory: str | Path, names: Iterable[str]) -> tuple[Path, Path]:
        """
        Issue a server certificate for C{names} (DNS names or IP addresses) and write it and
        its key as C{cert.pem} and C{key.pem} in C{directory} (created).

        @return: C{(cert_path, key_path)}.
        """
        names = list(names)
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = []
        for name in names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                sans.append(x509.DNSName(name))
        now = datetime.now(UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(hours=1))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        cert_path, key_path = folder / "cert.pem", folder / "key.pem"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return cert_path, key_path

    def server_tls(self, directory: str | Path, names: Iterable[str]) -> ServerTLS:
        """A server TLS context (for L{SinkBehaviour.tls}) with a certificate for C{names}."""
        return ServerTLS(*self.issue(directory, names))
