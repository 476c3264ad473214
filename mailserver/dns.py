# -*- test-case-name: tests.test_dns -*-
"""
DNS look-ups for outbound mail: MX records and host addresses, asynchronously, on the reactor.

dnspython builds the queries and reads the answers (C{dns.message}); the packets travel over
Twisted's UDP and TCP, so no thread ever waits on the network. Each try is a new UDP socket on
a port the kernel picks at random, "connected" to the name server (only its answers reach us),
with a random query id (dnspython's); a reply that does not match the question is ignored. A
truncated answer (TC) is asked again over TCP. Name servers are tried in turn until one
answers or L{Resolver}'s timeout (over all tries) runs out.

Errors are two kinds, which is what a mail queue needs to know: L{NXDomain} (the name does not
exist: permanent) and L{DNSTemporaryError} (SERVFAIL, REFUSED, a timeout, nothing reachable:
try again later). A name that exists but has no record of the type asked for is an empty list.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Sequence
from typing import Any
from typing import Protocol as TypingProtocol

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.resolver
import dns.rrset
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import DatagramProtocol, Protocol
from twisted.python.failure import Failure
from typing_extensions import override

from mailserver.queue.model import parse_next_hop

__all__ = [
    "DNSError",
    "DNSTemporaryError",
    "MXResolver",
    "NXDomain",
    "Resolver",
    "parse_nameserver",
    "system_nameservers",
]

TRY_TIMEOUT = 2.0
"""Seconds one UDP try waits for its answer before the next name server is asked."""
EDNS_PAYLOAD = 1232
"""The UDP payload size we announce (EDNS0): the DNS flag day 2020 value, no fragmentation."""
_MAX_TCP_ANSWER = 65535


class DNSError(Exception):
    """A look-up failed; C{str()} says which name and why."""


class NXDomain(DNSError):
    """The name does not exist (NXDOMAIN), or is not a valid domain name: permanent."""


class DNSTemporaryError(DNSError):
    """No usable answer now (SERVFAIL, REFUSED, timeout, unreachable name servers)."""


class MXResolver(TypingProtocol):
    """What outbound delivery needs from DNS (L{Resolver}, or a fake in tests)."""

    def mx(self, domain: str) -> Deferred[list[tuple[int, str]]]: ...

    def addresses(self, host: str) -> Deferred[list[str]]: ...


class _TryFailed(Exception):
    """One try at one name server got no usable answer."""

    def __init__(self, reason: str, retry: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry = retry
        """Whether the same server is worth asking again (a timeout, not a refusal)."""


def parse_nameserver(text: str) -> tuple[str, int]:
    """
    Read a name server as the config gives it: C{"192.0.2.53"}, C{"127.0.0.1:5353"},
    C{"[2001:db8::53]:53"} or a bare IPv6 address (as C{/etc/resolv.conf} has them).

    @return: C{(address, port)}.
    @raise ValueError: not an IP address with an optional port.
    """
    s = text.strip()
    try:
        return str(ipaddress.ip_address(s)), 53
    except ValueError:
        pass
    hop = parse_next_hop(s, default_port=53)
    return str(ipaddress.ip_address(hop.host)), hop.port


def system_nameservers() -> list[tuple[str, int]]:
    """
    The name servers of C{/etc/resolv.conf} (as dnspython reads it), C{[]} when there is none
    or the file cannot be read. Blocking (a small file read): call it at start-up.
    """
    try:
        system = dns.resolver.Resolver()
    except (OSError, dns.exception.DNSException):
        return []
    out = []
    for server in system.nameservers:
        try:
            out.append((str(ipaddress.ip_address(str(server))), int(system.port)))
        except ValueError:
            continue  # DNS-over-HTTPS and the like: not for us
    return out


class Resolver:
    """
    MX and address look-ups against configured name servers, asynchronously.

    @ivar servers: the name servers, as C{(address, port)}, in the order they are asked.
    """

    def __init__(
        self,
        reactor: Any,
        nameservers: Sequence[str] = (),
        timeout: float = 10.0,
        try_timeout: float = TRY_TIMEOUT,
    ) -> None:
        """
        @param reactor: provides C{IReactorUDP}, C{IReactorTCP} and C{IReactorTime}.
        @param nameservers: as in L{mailserver.config.DNSConfig.nameservers}; empty: those of
            C{/etc/resolv.conf} (read now).
        @param timeout: seconds one look-up may take over all its tries.
        @param try_timeout: seconds one UDP try waits before the next server is asked.
        @raise ValueError: a name server is not an IP address with an optional port.
        """
        self._reactor = reactor
        self.servers = [parse_nameserver(s) for s in nameservers] or system_nameservers()
        self.timeout = timeout
        self.try_timeout = try_timeout

    # -- the interface ---------------------------------------------------------------------

    def mx(self, domain: str) -> Deferred[list[tuple[int, str]]]:
        """
        The MX records of C{domain}, lowest preference first (equal ones in the order the
        server gave them).

        @return: fires with C{(preference, host)} pairs, the host lower case without its
            trailing dot (the null MX of RFC 7505 has host C{"."}); C{[]} when the domain exists
            but has no MX record. Fails with L{NXDomain} or L{DNSTemporaryError}. A CNAME in
            the answer is followed.
        """

        def records(rrset: dns.rrset.RRset | None) -> list[tuple[int, str]]:
            if rrset is None:
                return []
            out = [(int(r.preference), _host_text(r.exchange)) for r in rrset]
            out.sort(key=lambda pair: pair[0])
            return out

        return self.query(domain, dns.rdatatype.MX).addCallback(records)

    def addresses(self, host: str) -> Deferred[list[str]]:
        """
        The IPv4 then IPv6 addresses of C{host} (A and AAAA are asked at the same time).
        An IP address is its own answer.

        @return: fires with the addresses as text; C{[]} when the name exists but has neither
            record. Fails with L{NXDomain} (the name does not exist) or L{DNSTemporaryError}
            (when neither look-up gave an address and one of them failed so).
        """
        try:
            return succeed([str(ipaddress.ip_address(host.strip("[]")))])
        except ValueError:
            pass
        a = self.query(host, dns.rdatatype.A)
        aaaa = self.query(host, dns.rdatatype.AAAA)
        both: Deferred[list[tuple[bool, Any]]] = DeferredList([a, aaaa], consumeErrors=True)

        def combine(results: list[tuple[bool, Any]]) -> list[str]:
            found: list[str] = []
            errors: list[Failure] = []
            for ok, value in results:
                if ok:
                    found.extend(r.address for r in (value or ()))
                else:
                    errors.append(value)
            for f in errors:
                if f.check(NXDomain):
                    f.raiseException()
            if not found:
                for f in errors:
                    f.raiseException()
            return found

        return both.addCallback(combine)

    def query(self, name: str, rdtype: dns.rdatatype.RdataType) -> Deferred[dns.rrset.RRset | None]:
        """
        Ask for C{rdtype} records of C{name}.

        @return: fires with the answer's RRset after following any CNAME chain in it, or None
            when the name exists without such records; fails with L{NXDomain} or
            L{DNSTemporaryError}.
        """
        return Deferred.fromCoroutine(self._query(name, rdtype))

    # -- the exchange ----------------------------------------------------------------------

    async def _query(self, name: str, rdtype: dns.rdatatype.RdataType) -> dns.rrset.RRset | None:
        what = f"{name} {dns.rdatatype.to_text(rdtype)}"
        try:
            qname = dns.name.from_text(name.strip().rstrip(".") + ".")
        except (dns.exception.DNSException, UnicodeError, ValueError) as e:
            raise NXDomain(f"{name!r} is not a valid domain name ({e})")
        query = dns.message.make_query(qname, rdtype, use_edns=0, payload=EDNS_PAYLOAD)
        response = await self._exchange(query, what)
        rcode = response.rcode()
        if rcode == dns.rcode.NXDOMAIN:
            raise NXDomain(f"{what}: domain not found (NXDOMAIN)")
        if not isinstance(response, dns.message.QueryMessage):  # pragma: no cover
            raise DNSTemporaryError(f"{what}: unexpected answer")
        try:
            chain = response.resolve_chaining()
        except dns.exception.DNSException as e:
            raise DNSTemporaryError(f"{what}: unusable answer ({e})")
        return chain.answer

    async def _exchange(self, query: dns.message.Message, what: str) -> dns.message.Message:
        """
        Send C{query} to the name servers in turn until one answers NOERROR or NXDOMAIN.

        @raise DNSTemporaryError: every server refused or failed, or the time ran out.
        """
        if not self.servers:
            raise DNSTemporaryError(f"{what}: no name server configured")
        deadline = self._reactor.seconds() + self.timeout
        usable = list(self.servers)
        last = "no answer"
        turn = 0
        while usable:
            remaining = deadline - self._reactor.seconds()
            if remaining <= 0:
                break
            server = usable[turn % len(usable)]
            turn += 1
            try:
                response = await self._ask(query, server, deadline)
            except _TryFailed as e:
                last = f"{_server_text(server)}: {e.reason}"
                if not e.retry:
                    usable.remove(server)
                continue
            rcode = response.rcode()
            if rcode in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
                return response
            last = f"{_server_text(server)} answered {dns.rcode.to_text(rcode)}"
            usable.remove(server)
        if usable:
            raise DNSTemporaryError(f"{what}: no answer within {self.timeout:g}s ({last})")
        raise DNSTemporaryError(f"{what}: {last}")

    async def _ask(
        self, query: dns.message.Message, server: tuple[str, int], deadline: float
    ) -> dns.message.Message:
        """One try at one server: UDP, then TCP if the answer was truncated."""
        wire = query.to_wire()
        remaining = deadline - self._reactor.seconds()
        answer = await _UDPExchange(self._reactor, wire, query).run(
            server, min(self.try_timeout, remaining)
        )
        if struct.unpack("!H", answer[2:4])[0] & dns.flags.TC:
            remaining = deadline - self._reactor.seconds()
            if remaining <= 0:
                raise _TryFailed("truncated answer and no time left for TCP", retry=True)
            answer = await _tcp_exchange(self._reactor, wire, server, remaining)
        return _parse(query, answer)


def _host_text(name: dns.name.Name) -> str:
    if name == dns.name.root:
        return "."
    return str(name.to_text(omit_final_dot=True)).lower()


def _server_text(server: tuple[str, int]) -> str:
    host, port = server
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _parse(query: dns.message.Message, wire: bytes) -> dns.message.Message:
    try:
        response = dns.message.from_wire(wire)
    except dns.exception.DNSException as e:
        raise _TryFailed(f"malformed answer ({e})", retry=False)
    if not query.is_response(response):
        raise _TryFailed("answer does not match the question", retry=False)
    return response


def _matches(query: dns.message.Message, data: bytes) -> bool:
    """Whether a datagram is the answer to C{query} (same id, answer bit, same question)."""
    if len(data) < 12 or struct.unpack("!H", data[:2])[0] != query.id:
        return False
    flags = struct.unpack("!H", data[2:4])[0]
    if flags & dns.flags.TC:
        # Truncated: possibly unparsable; the id and the source address are what we check,
        # and the whole answer comes over TCP, where it is checked in full.
        return bool(flags & dns.flags.QR)
    try:
        return query.is_response(dns.message.from_wire(data))
    except dns.exception.DNSException:
        return False


class _UDPExchange(DatagramProtocol):
    """One query over UDP from a new socket: fires with the matching answer's bytes."""

    def __init__(self, reactor: Any, wire: bytes, query: dns.message.Message) -> None:
        self._reactor = reactor
        self._wire = wire
        self._query = query
        self._result: Deferred[bytes] = Deferred()
        self._timer: IDelayedCall | None = None
        self._port: Any = None
        self._finished = False

    def run(self, server: tuple[str, int], timeout: float) -> Deferred[bytes]:
        host, port = server
        try:
            self._port = self._reactor.listenUDP(0, self, interface="::" if ":" in host else "")
            self._port.connect(host, port)
            self._port.write(self._wire)
        except OSError as e:
            self._finish(Failure(_TryFailed(f"cannot send: {e}", retry=False)))
            return self._result
        self._timer = self._reactor.callLater(timeout, self._timed_out)
        return self._result

    @override
    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        if not self._finished and _matches(self._query, datagram):
            self._finish(datagram)

    @override
    def connectionRefused(self) -> None:
        self._finish(Failure(_TryFailed("port unreachable", retry=False)))

    @override
    def stopProtocol(self) -> None:
        # The reactor closes the socket itself when the kernel reports an error on it (ICMP
        # port unreachable, seen by epoll as an error event rather than a failed read).
        if not self._finished:
            self._port = None
            self._finish(Failure(_TryFailed("port unreachable", retry=False)))

    def _timed_out(self) -> None:
        self._timer = None
        self._finish(Failure(_TryFailed("timeout", retry=True)))

    def _finish(self, result: bytes | Failure) -> None:
        if self._finished:
            return
        self._finished = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        port, self._port = self._port, None
        stopped: Deferred[object] = maybeDeferred(port.stopListening) if port else succeed(None)
        # Fire once the socket is closed, so nothing of this try outlives it.
        stopped.addBoth(lambda _: self._deliver(result))

    def _deliver(self, result: bytes | Failure) -> None:
        if isinstance(result, Failure):
            self._result.errback(result)
        else:
            self._result.callback(result)


class _TCPQuery(Protocol):
    """One query over TCP (two-octet length prefix, RFC 1035 §4.2.2)."""

    def __init__(self, wire: bytes) -> None:
        self._wire = wire
        self._buf = b""
        self.answer: bytes | None = None
        self.closed: Deferred[None] = Deferred()

    @override
    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(struct.pack("!H", len(self._wire)) + self._wire)

    @override
    def dataReceived(self, data: bytes) -> None:
        self._buf += data
        if len(self._buf) >= 2:
            size = struct.unpack("!H", self._buf[:2])[0]
            if len(self._buf) >= 2 + size:
                self.answer = self._buf[2 : 2 + size]
                assert self.transport is not None
                self.transport.loseConnection()
            elif len(self._buf) > _MAX_TCP_ANSWER + 2:  # pragma: no cover - size is 16 bits
                assert self.transport is not None
                self.transport.loseConnection()

    @override
    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008
        if not self.closed.called:
            self.closed.callback(None)


async def _tcp_exchange(
    reactor: Any, wire: bytes, server: tuple[str, int], timeout: float
) -> bytes:
    host, port = server
    endpoint: TCP4ClientEndpoint | TCP6ClientEndpoint
    if ":" in host:
        endpoint = TCP6ClientEndpoint(reactor, host, port, timeout=timeout)
    else:
        endpoint = TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
    proto = _TCPQuery(wire)
    try:
        await connectProtocol(endpoint, proto)
    except Exception as e:
        raise _TryFailed(f"TCP connection failed ({e.__class__.__name__})", retry=False)
    timer = reactor.callLater(timeout, _abort, proto)
    await proto.closed
    if timer.active():
        timer.cancel()
    if proto.answer is None:
        raise _TryFailed("no answer over TCP", retry=False)
    return proto.answer


def _abort(proto: Protocol) -> None:
    if proto.transport is not None:
        proto.transport.abortConnection()  # type: ignore[attr-defined]
