# -*- test-case-name: tests.test_queue_delivery -*-
"""
Delivery to the next hop (L{IOutbound}): where mail for a domain goes, and sending it there.

The next hop of a domain is, in this order: its C{[[route]]} (a transport map entry), the
smarthost (C{[relay] host}), or the domain's own MX hosts. A hop written C{[host]} is that
host's addresses; otherwise its MX records are looked up (Postfix's reading). MX hosts are
tried in preference order, hosts of equal preference in random order (RFC 5321 §5.1); a domain
without MX records is its own mail host (its A/AAAA records); a null MX (RFC 7505) refuses
mail at once (556 5.1.10); a domain that does not exist fails (5.1.2); any DNS trouble defers.

Each address is tried in turn until one gives a usable session: a refused or timed-out
connection, a greeting other than 220, a failed EHLO, STARTTLS or AUTH, or a connection lost
before the first transaction all move on to the next address. All the messages given to one
L{Outbound.send} then go over that one connection, one after the other (up to
C{messages_per_connection}); if it dies between messages, a new connection is made (a bounded
number of times) for the rest. When no address takes mail, every message is deferred with the
last error, which names the host and the reason.

Connection cache (Postfix's C{smtp_connection_cache_on_demand}): a connection whose send is
done, still usable and under C{messages_per_connection} transactions, is not closed but kept
idle for C{connection_cache_time}, for the next send to the same domain and next hop (same
route, smarthost or MX lookup, TLS policy and credentials: the key is the domain and its hop).
That send takes it instead of connecting, without looking the MX hosts up again. At most
C{connections_per_domain} idle connections are kept per key and C{connections} in all; one the
peer closes leaves the cache at once; L{Outbound.close_idle} closes them all (at stop). A
connection on which something was deferred is not kept: the retry looks the next hop up again
(and may find another MX host) rather than going back to the host that said "later". A cached
connection that turns out dead when reused (no reply to MAIL, or a 421 and the connection gone:
the peer closed it while it waited) does not defer the message: it goes on a new connection.

TLS: mail to MX hosts uses opportunistic STARTTLS (encrypted when offered, certificate not
checked, RFC 7435); a route or the smarthost may require it (C{starttls}: STARTTLS must be
offered, C{implicit}: TLS from the first byte), and then the certificate must be valid for the
hop's name (service_identity, against the system's CAs or the trust root given).

Concurrency is not limited here: the scheduler decides how many sends run at once.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

from twisted.internet import error as neterror
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    connectProtocol,
    wrapClientTLS,
)
from twisted.internet.interfaces import IDelayedCall
from twisted.python.failure import Failure
from zope.interface import implementer

from mailserver import log
from mailserver.config import QueueConfig, RelayConfig, RouteConfig
from mailserver.dns import DNSTemporaryError, MXResolver, NXDomain
from mailserver.interfaces import IOutbound
from mailserver.queue.model import NextHop, Outcome, Outgoing, RcptResult, parse_next_hop
from mailserver.smtp.client import (
    ClientSettings,
    SessionError,
    SMTPClient,
    TLSPolicy,
    client_tls,
)

__all__ = ["MAX_ADDRESSES", "MAX_RECONNECTS", "Outbound"]

MAX_ADDRESSES = 10
"""Addresses tried, at most, to open one connection (Postfix tries 5 MX addresses)."""
MAX_RECONNECTS = 2
"""New connections made, at most, after one died in the middle of a send."""
_TLS_POLICIES = ("opportunistic", "starttls", "implicit", "none")


@dataclass(frozen=True, slots=True)
class _Hop:
    """Where one domain's mail goes and how."""

    next_hop: NextHop
    tls: TLSPolicy
    auth: tuple[str, str] | None
    own_mx: bool
    """The domain's own MX (no route, no smarthost): DNS answers about it are final."""


_Key = tuple[str, _Hop]
"""What a cached connection may be used for: the domain and its next hop."""


class _Verdict(Exception):
    """The next hop cannot be used at all: the same result for every recipient."""

    def __init__(self, outcome: Outcome, code: int, text: str) -> None:
        super().__init__(text)
        self.outcome = outcome
        self.code = code
        self.text = text


class _Addresses:
    """
    The addresses of a hop in the order to try them, resolved as they are needed (the MX
    hosts in order, each one's addresses looked up only when the previous ones failed).
    """

    def __init__(self, resolver: MXResolver, names: list[str], known: dict[str, list[str]]) -> None:
        self._resolver = resolver
        self._names = names
        self._known = known
        self._seen: set[str] = set()
        self.found: list[tuple[str, str]] = []
        self.errors: list[str] = []

    async def get(self, index: int) -> tuple[str, str] | None:
        """The C{index}th C{(name, ip)}, or None when there are no more."""
        while len(self.found) <= index and self._names:
            name = self._names.pop(0)
            try:
                ips = self._known.get(name) or await self._resolver.addresses(name)
            except NXDomain:
                self.errors.append(f"4.4.4 mail host {name} not found in DNS")
                continue
            except DNSTemporaryError as e:
                self.errors.append(f"4.4.3 DNS look-up of mail host failed: {e}")
                continue
            if not ips:
                self.errors.append(f"4.4.4 mail host {name} has no address")
            for ip in ips:
                if ip not in self._seen:
                    self._seen.add(ip)
                    self.found.append((name, ip))
        return self.found[index] if index < len(self.found) else None


@implementer(IOutbound)
class Outbound:
    """Sends queued messages to their next hop (see the module's description)."""

    def __init__(
        self,
        reactor: Any,
        resolver: MXResolver,
        queue: QueueConfig,
        hostname: str,
        routes: Sequence[RouteConfig] = (),
        relay: RelayConfig | None = None,
        trust_root: Any = None,
        rng: random.Random | None = None,
    ) -> None:
        """
        @param reactor: provides C{IReactorTCP} and C{IReactorTime}.
        @param resolver: MX and address look-ups (L{mailserver.dns.Resolver}).
        @param queue: timeouts, C{mx_port} and C{messages_per_connection}.
        @param hostname: our name in EHLO.
        @param routes: the C{[[route]]} entries.
        @param relay: the smarthost (None or an empty host: none).
        @param trust_root: C{IOpenSSLTrustRoot} for required TLS; None: the system's CAs.
        @param rng: the random source for ordering MX hosts of equal preference.
        @raise OSError: the smarthost's password file cannot be read (read once, here).
        """
        self._reactor = reactor
        self._resolver = resolver
        self._queue = queue
        self._hostname = hostname
        self._routes = {r.domain.lower().rstrip("."): r for r in routes}
        self._relay = relay if relay is not None and relay.host else None
        self._trust_root = trust_root
        self._rng = rng if rng is not None else random.Random()
        self._relay_auth: tuple[str, str] | None = None
        if self._relay is not None and self._relay.user:
            if self._relay.password_file is None:
                raise OSError("relay.user is set but relay.password_file is not")
            lines = self._relay.password_file.read_text(encoding="utf-8").splitlines()
            self._relay_auth = (self._relay.user, lines[0] if lines else "")
        self._idle: dict[_Key, list[SMTPClient]] = {}
        """The cached connections of each key, the most recently used last."""
        self._expiry: dict[SMTPClient, tuple[_Key, IDelayedCall]] = {}
        """Each cached connection's key and the timer that closes it (oldest first)."""
        self._closing: set[Deferred[None]] = set()
        """Cached connections being closed in the background."""

    # -- IOutbound -------------------------------------------------------------------------

    def send(self, domain: str, messages: Sequence[Outgoing]) -> Deferred[list[list[RcptResult]]]:
        """
        Deliver C{messages} (all for recipients in C{domain}) to the domain's next hop.

        @return: one list of results per message, one result per recipient, in order; never
            fails (an unexpected error defers everyone).
        """
        batch = list(messages)
        d = Deferred.fromCoroutine(self._send(domain.lower().rstrip("."), batch))

        def internal(f: Failure) -> list[list[RcptResult]]:
            log.internal_error("outbound", domain, "delivery", f)
            text = f"4.3.0 internal error delivering to {domain}"
            return [_all(m, "deferred", 0, text) for m in batch]

        return d.addErrback(internal)

    def close_idle(self) -> Deferred[None]:
        """
        Close (QUIT) every cached idle connection; fires once they, and any being closed in
        the background, are closed (each within the command timeout). Connections of sends
        still running are cached again when those end: call this once sending has stopped.
        """
        waits = list(self._closing)
        for client in list(self._expiry):
            self._uncache(client)
            waits.append(self._close_later(client))
        d = DeferredList(waits, consumeErrors=True)
        return d.addCallback(lambda _: None)

    @property
    def idle_connections(self) -> int:
        """How many connections are cached now."""
        return len(self._expiry)

    # -- the next hop ----------------------------------------------------------------------

    def _hop_for(self, domain: str) -> _Hop:
        """Where mail for C{domain} goes: its route, the smarthost or its own MX hosts."""
        port = self._queue.mx_port
        route = self._routes.get(domain)
        if route is not None:
            return _Hop(parse_next_hop(route.host, port), _policy(route.tls), None, False)
        if self._relay is not None:
            hop = parse_next_hop(self._relay.host, port)
            return _Hop(hop, _policy(self._relay.tls), self._relay_auth, False)
        return _Hop(NextHop(domain, port, True), "opportunistic", None, True)

    async def _mail_hosts(self, hop: _Hop, known: dict[str, list[str]]) -> list[str]:
        """
        The names to connect to, in order (addresses already looked up go into C{known}).

        @raise _Verdict: the hop cannot be used now (or ever).
        """
        host = hop.next_hop.host
        if not hop.next_hop.mx:
            return [host]
        try:
            records = await self._resolver.mx(host)
        except NXDomain:
            if hop.own_mx:
                raise _Verdict("failed", 0, f"5.1.2 domain not found: {host}")
            raise _Verdict("deferred", 0, f"4.4.4 next hop {host} not found in DNS")
        except DNSTemporaryError as e:
            raise _Verdict("deferred", 0, f"4.4.3 DNS look-up failed: {e}")
        if len(records) == 1 and records[0][1] == ".":
            if hop.own_mx:
                raise _Verdict("failed", 556, f"5.1.10 {host} does not accept mail (null MX)")
            raise _Verdict("deferred", 0, f"4.4.4 next hop {host} has a null MX")
        if not records:
            # RFC 5321 §5.1: the domain is its own mail host, if it has an address.
            if hop.own_mx:
                known[host] = await self._own_addresses(host)
            return [host]
        return self._order([(pref, name) for pref, name in records if name != "."])

    async def _own_addresses(self, domain: str) -> list[str]:
        try:
            ips = await self._resolver.addresses(domain)
        except NXDomain:
            raise _Verdict("failed", 0, f"5.1.2 domain not found: {domain}")
        except DNSTemporaryError as e:
            raise _Verdict("deferred", 0, f"4.4.3 DNS look-up failed: {e}")
        if not ips:
            raise _Verdict("failed", 0, f"5.1.2 {domain} has no MX and no address record")
        return ips

    def _order(self, records: list[tuple[int, str]]) -> list[str]:
        """Preference order; equal preferences shuffled."""
        by_preference: dict[int, list[str]] = {}
        for pref, name in records:
            by_preference.setdefault(pref, []).append(name)
        out: list[str] = []
        for pref in sorted(by_preference):
            group = by_preference[pref]
            self._rng.shuffle(group)
            out.extend(group)
        return out

    # -- sending ---------------------------------------------------------------------------

    async def _send(self, domain: str, messages: list[Outgoing]) -> list[list[RcptResult]]:
        hop = self._hop_for(domain)
        key = (domain, hop)
        limit = self._queue.messages_per_connection
        results: dict[int, list[RcptResult]] = {}
        todo = list(range(len(messages)))
        cached = self._take(key)
        addresses: _Addresses | None = None
        start = 0
        losses = 0
        last = SessionError("4.4.1 no address to connect to")
        while todo:
            reused = cached is not None
            if cached is not None:
                client, cached = cached, None
            else:
                if addresses is None:
                    known: dict[str, list[str]] = {}
                    try:
                        names = await self._mail_hosts(hop, known)
                    except _Verdict as v:
                        for i in todo:
                            results[i] = _all(messages[i], v.outcome, v.code, v.text)
                        todo = []
                        break
                    addresses = _Addresses(self._resolver, names, known)
                opened = await self._connect(hop, addresses, start)
                if isinstance(opened, SessionError):
                    last = opened
                    break
                client, start = opened
            first = client.messages
            stale = deferred = False
            while todo and client.usable and client.messages < limit:
                i = todo.pop(0)
                before = client.messages
                result = await client.deliver(messages[i])
                if reused and before == first and _stale(client, result):
                    # The peer closed the cached connection while it waited: not a failure
                    # of the message, which goes on a new connection.
                    todo.insert(0, i)
                    stale = True
                    break
                results[i] = result
                deferred = deferred or any(r.outcome == "deferred" for r in result)
            lost = not client.usable
            if not todo and not lost and not deferred and self._cache(key, client):
                break
            await self._close(client)
            if stale:
                continue
            if lost and todo:
                if client.messages == first and not reused:
                    start += 1  # lost before any transaction: next address
                losses += 1
                last = SessionError(f"4.4.2 lost connection with {client.label}", 0, client.label)
                if losses > MAX_RECONNECTS:
                    break
        # A deferred result keeps a reply code only of its class (a 421); a 5xx greeting or
        # AUTH refusal that made us give up for now is in the text.
        code = last.code if last.code // 100 == 4 else 0
        for i in todo:
            results[i] = _all(messages[i], "deferred", code, _with_status(last.text), last.host)
        return [results[i] for i in range(len(messages))]

    # -- the connection cache --------------------------------------------------------------

    def _take(self, key: _Key) -> SMTPClient | None:
        """A cached connection for C{key} (the most recently used), or None."""
        clients = self._idle.get(key)
        while clients:
            client = clients[-1]
            self._uncache(client)
            if client.idle:
                return client
            self._close_later(client)
        return None

    def _cache(self, key: _Key, client: SMTPClient) -> bool:
        """Keep C{client} for the next send of C{key}, if it can and may be kept."""
        q = self._queue
        if q.connection_cache_time <= 0 or not client.idle:
            return False
        if client.messages >= q.messages_per_connection:
            return False
        if len(self._idle.get(key, ())) >= q.connections_per_domain:
            return False
        if len(self._expiry) >= q.connections:
            oldest = next(iter(self._expiry))
            self._uncache(oldest)
            self._close_later(oldest)
        self._idle.setdefault(key, []).append(client)
        timer = self._reactor.callLater(q.connection_cache_time, self._expire, client)
        self._expiry[client] = (key, timer)
        return True

    def _uncache(self, client: SMTPClient) -> None:
        """Take C{client} out of the cache (if it is there), its timer stopped."""
        entry = self._expiry.pop(client, None)
        if entry is None:
            return
        key, timer = entry
        if timer.active():
            timer.cancel()
        clients = self._idle.get(key)
        if clients is not None:
            clients.remove(client)
            if not clients:
                del self._idle[key]

    def _expire(self, client: SMTPClient) -> None:
        """C{client} stayed idle for C{connection_cache_time}: close it."""
        self._uncache(client)
        self._close_later(client)

    def _close_later(self, client: SMTPClient) -> Deferred[None]:
        """QUIT C{client} in the background (L{close_idle} waits for it)."""
        d: Deferred[None] = Deferred.fromCoroutine(self._close(client))
        self._closing.add(d)

        def done(result: object) -> object:
            self._closing.discard(d)
            return result

        d.addBoth(done)
        d.addErrback(lambda f: log.internal_error("outbound", client.label, "closing", f))
        return d

    async def _connect(
        self, hop: _Hop, addresses: _Addresses, start: int
    ) -> tuple[SMTPClient, int] | SessionError:
        """
        A usable session with the first address, from C{start} on, that gives one, and that
        address's index; or the last error when none does.
        """
        last: SessionError | None = None
        index = start
        while index < start + MAX_ADDRESSES:
            target = await addresses.get(index)
            if target is None:
                break
            name, ip = target
            try:
                return await self._open(hop, name, ip), index
            except SessionError as e:
                last = e
            index += 1
        if last is not None:
            return last
        if addresses.errors:
            return SessionError(addresses.errors[-1])
        return SessionError(f"4.4.4 no address for {hop.next_hop.host}")

    async def _open(self, hop: _Hop, name: str, ip: str) -> SMTPClient:
        """Connect to C{ip} and set the session up. @raise SessionError: it did not work."""
        q = self._queue
        settings = ClientSettings(
            helo=self._hostname,
            tls=hop.tls,
            tls_name=name,
            trust_root=self._trust_root,
            auth=hop.auth,
            connect_timeout=q.connect_timeout,
            command_timeout=q.command_timeout,
        )
        client = SMTPClient(self._reactor, settings, name, ip)
        port = hop.next_hop.port
        endpoint: Any
        if ":" in ip:
            endpoint = TCP6ClientEndpoint(self._reactor, ip, port, timeout=q.connect_timeout)
        else:
            endpoint = TCP4ClientEndpoint(self._reactor, ip, port, timeout=q.connect_timeout)
        if hop.tls == "implicit":
            endpoint = wrapClientTLS(client_tls(name, self._trust_root), endpoint)
        try:
            await connectProtocol(endpoint, client)
        except Exception as e:
            raise SessionError(f"4.4.1 {client.label}: {_connect_error(e)}")
        try:
            await client.ready
        except SessionError as e:
            await self._closed(client)
            raise SessionError(_with_status(e.text, "4.4.2"), e.code, client.label)
        # Closed by the peer while cached: out of the cache at once.
        client.when_closed().addCallback(lambda _: self._uncache(client))
        return client

    async def _close(self, client: SMTPClient) -> None:
        """QUIT and wait for the connection to close (bounded)."""
        client.quit()
        await self._closed(client)

    async def _closed(self, client: SMTPClient) -> None:
        timer = self._reactor.callLater(
            self._queue.command_timeout + 1, client.abort, "timeout closing"
        )
        await client.when_closed()
        if timer.active():
            timer.cancel()


def _stale(client: SMTPClient, results: list[RcptResult]) -> bool:
    """
    Whether a message sent on a reused connection met a connection its peer had closed in the
    meantime: the session is gone, MAIL got no reply (or a 421, the server's goodbye) and no
    recipient has a final answer. Nothing was accepted, so sending it again is safe.
    """
    if client.usable or any(r.outcome != "deferred" for r in results):
        return False
    reply = client.mail_reply
    return reply is None or reply.code in (0, 421)


def _policy(text: str) -> TLSPolicy:
    return cast(TLSPolicy, text) if text in _TLS_POLICIES else "opportunistic"


def _all(
    message: Outgoing, outcome: Outcome, code: int, text: str, host: str = ""
) -> list[RcptResult]:
    return [RcptResult(r.address, outcome, code, text, host) for r in message.recipients]


def _with_status(text: str, status: str = "4.4.1") -> str:
    """C{text} with an enhanced status code in front if it has none."""
    head = text.split(" ", 1)[0]
    parts = head.split(".")
    if len(parts) == 3 and all(p.isdigit() for p in parts):
        return text
    return f"{status} {text}"


def _connect_error(e: Exception) -> str:
    if isinstance(e, neterror.ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, neterror.TimeoutError):
        return "connection timed out"
    if isinstance(e, neterror.NoRouteError):
        return "no route to host"
    return str(e) or e.__class__.__name__
