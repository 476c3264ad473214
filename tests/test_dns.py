"""
Tests for L{mailserver.dns}: the resolver against a real twisted.names server on loopback
(L{tests.netsim.start_dns}), a UDP port that never answers, and one where nothing listens.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor as _reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailserver.dns import (
    DNSTemporaryError,
    NXDomain,
    Resolver,
    parse_nameserver,
    system_nameservers,
)
from tests.netsim import start_dns, start_silent_udp

reactor: Any = _reactor

ZONES: dict[str, dict[str, Any]] = {
    "example.test": {
        "MX": [(20, "MX2.Example.Test"), (10, "mx1.example.test"), (20, "mx3.example.test")],
        "A": ["127.0.0.9"],
    },
    "mx1.example.test": {"A": ["127.0.0.2"], "AAAA": ["::1"]},
    "v6only.example.test": {"AAAA": ["2001:db8::25"]},
    "noaddress.example.test": {"TXT": ["v=spf1 -all"]},
    "alias.example.test": {"CNAME": "example.test"},
    "null.test": {"MX": [(0, ".")]},
    "broken.test": {"SERVFAIL": True},
    "xn--bcher-kva.test": {"MX": [(5, "mx.xn--bcher-kva.test")]},
}


class ParseNameserverTests(SynchronousTestCase):
    def test_forms(self) -> None:
        """The forms of DNSConfig.nameservers, and resolv.conf's bare IPv6 addresses."""
        self.assertEqual(parse_nameserver("192.0.2.53"), ("192.0.2.53", 53))
        self.assertEqual(parse_nameserver("127.0.0.1:5353"), ("127.0.0.1", 5353))
        self.assertEqual(parse_nameserver("[2001:db8::53]:5300"), ("2001:db8::53", 5300))
        self.assertEqual(parse_nameserver("[2001:db8::53]"), ("2001:db8::53", 53))
        self.assertEqual(parse_nameserver("2001:db8::53"), ("2001:db8::53", 53))

    def test_not_an_address(self) -> None:
        self.assertRaises(ValueError, parse_nameserver, "dns.example")
        self.assertRaises(ValueError, parse_nameserver, "127.0.0.1:99999")

    def test_system(self) -> None:
        """Empty nameservers: those of resolv.conf (whatever they are here), as (ip, port)."""
        servers = system_nameservers()
        self.assertEqual(Resolver(reactor, []).servers, servers)
        for host, port in servers:
            parse_nameserver(host)
            self.assertIsInstance(port, int)


class ResolverTests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.dns = start_dns(reactor, ZONES)
        self.addCleanup(self.dns.stop)
        self.resolver = Resolver(reactor, [self.dns.nameserver], timeout=5.0)

    async def test_mx_order(self) -> None:
        """MX records come lowest preference first, hosts lower case without the dot."""
        mx = await self.resolver.mx("example.test")
        self.assertEqual(mx[0], (10, "mx1.example.test"))
        self.assertEqual(sorted(mx[1:]), [(20, "mx2.example.test"), (20, "mx3.example.test")])

    async def test_mx_trailing_dot_and_case(self) -> None:
        self.assertEqual(
            await self.resolver.mx("Example.TEST."), await self.resolver.mx("example.test")
        )

    async def test_mx_nodata(self) -> None:
        """A name that exists without MX records: an empty list (then A/AAAA apply)."""
        self.assertEqual(await self.resolver.mx("mx1.example.test"), [])

    async def test_mx_nxdomain(self) -> None:
        with self.assertRaises(NXDomain) as e:
            await self.resolver.mx("nowhere.test")
        self.assertIn("nowhere.test", str(e.exception))

    async def test_mx_servfail_is_temporary(self) -> None:
        """SERVFAIL is a temporary error at once, not after the timeout."""
        started = reactor.seconds()
        with self.assertRaises(DNSTemporaryError) as e:
            await self.resolver.mx("broken.test")
        self.assertIn("SERVFAIL", str(e.exception))
        self.assertLess(reactor.seconds() - started, 2.0)

    async def test_null_mx(self) -> None:
        self.assertEqual(await self.resolver.mx("null.test"), [(0, ".")])

    async def test_mx_through_cname(self) -> None:
        """A CNAME in the answer is followed to the target's MX records."""
        mx = await self.resolver.mx("alias.example.test")
        self.assertEqual(mx, await self.resolver.mx("example.test"))

    async def test_mx_idna(self) -> None:
        """A domain in Unicode is asked in its A-label form."""
        self.assertEqual(await self.resolver.mx("bücher.test"), [(5, "mx.xn--bcher-kva.test")])

    async def test_invalid_name(self) -> None:
        with self.assertRaises(NXDomain):
            await self.resolver.mx("a..b.test")

    async def test_changed_during_test(self) -> None:
        """The fixture's set() applies to the next question."""
        self.dns.set("example.test", "MX", [(1, "other.example.test")])
        self.assertEqual(await self.resolver.mx("example.test"), [(1, "other.example.test")])
        self.dns.set("example.test", "MX", [])
        self.assertEqual(await self.resolver.mx("example.test"), [])
        self.dns.remove("example.test")
        with self.assertRaises(NXDomain):
            await self.resolver.mx("example.test")

    async def test_addresses_v4_first(self) -> None:
        self.assertEqual(await self.resolver.addresses("mx1.example.test"), ["127.0.0.2", "::1"])
        self.assertEqual(await self.resolver.addresses("v6only.example.test"), ["2001:db8::25"])
        self.assertIn(("mx1.example.test", "A"), self.dns.queries)
        self.assertIn(("mx1.example.test", "AAAA"), self.dns.queries)

    async def test_addresses_nodata(self) -> None:
        self.assertEqual(await self.resolver.addresses("noaddress.example.test"), [])

    async def test_addresses_nxdomain(self) -> None:
        with self.assertRaises(NXDomain):
            await self.resolver.addresses("nowhere.example.test")

    async def test_addresses_servfail(self) -> None:
        with self.assertRaises(DNSTemporaryError):
            await self.resolver.addresses("broken.test")

    async def test_addresses_cname(self) -> None:
        self.dns.set("www.example.test", "CNAME", ["mx1.example.test"])
        self.assertEqual(await self.resolver.addresses("www.example.test"), ["127.0.0.2", "::1"])

    async def test_address_literal(self) -> None:
        """An IP address needs no look-up."""
        self.assertEqual(await self.resolver.addresses("192.0.2.1"), ["192.0.2.1"])
        self.assertEqual(await self.resolver.addresses("[2001:db8::1]"), ["2001:db8::1"])
        self.assertEqual(self.dns.queries, [])

    async def test_truncated_answer_over_tcp(self) -> None:
        """An answer too big for UDP (TC set) is asked again over TCP and arrives whole."""
        hosts = [
            (i, f"mx{i:03d}.a-rather-long-label-to-fill-the-packet.example.test") for i in range(60)
        ]
        self.dns.set("big.test", "MX", hosts)
        self.assertEqual(await self.resolver.mx("big.test"), hosts)
        self.assertEqual(self.dns.tcp_queries, 1)

    async def test_small_answer_no_tcp(self) -> None:
        await self.resolver.mx("example.test")
        self.assertEqual(self.dns.tcp_queries, 0)


class UnreachableServerTests(TestCase):
    timeout = 30

    async def test_timeout(self) -> None:
        """A server that never answers: a temporary error once the look-up's time is up."""
        silent = start_silent_udp(reactor)
        self.addCleanup(silent.stop)
        resolver = Resolver(reactor, [silent.nameserver], timeout=0.5, try_timeout=0.2)
        started = reactor.seconds()
        with self.assertRaises(DNSTemporaryError) as e:
            await resolver.mx("example.test")
        elapsed = reactor.seconds() - started
        self.assertIn("no answer within", str(e.exception))
        self.assertGreaterEqual(elapsed, 0.45)
        self.assertLess(elapsed, 2.0)
        self.assertGreaterEqual(silent.received, 2)  # tried again within the time

    async def test_next_server_after_silent_one(self) -> None:
        silent = start_silent_udp(reactor)
        self.addCleanup(silent.stop)
        dns = start_dns(reactor, ZONES)
        self.addCleanup(dns.stop)
        resolver = Resolver(
            reactor, [silent.nameserver, dns.nameserver], timeout=5, try_timeout=0.2
        )
        self.assertEqual((await resolver.mx("example.test"))[0], (10, "mx1.example.test"))
        self.assertEqual(silent.received, 1)

    async def test_next_server_after_unreachable_one(self) -> None:
        """A port where nothing listens (ICMP port unreachable): the next server at once."""
        silent = start_silent_udp(reactor)
        closed = silent.nameserver
        await silent.stop()
        dns = start_dns(reactor, ZONES)
        self.addCleanup(dns.stop)
        resolver = Resolver(reactor, [closed, dns.nameserver], timeout=5, try_timeout=2)
        started = reactor.seconds()
        self.assertEqual((await resolver.mx("example.test"))[0], (10, "mx1.example.test"))
        self.assertLess(reactor.seconds() - started, 1.0)

    async def test_all_unreachable(self) -> None:
        silent = start_silent_udp(reactor)
        closed = silent.nameserver
        await silent.stop()
        resolver = Resolver(reactor, [closed], timeout=5, try_timeout=2)
        with self.assertRaises(DNSTemporaryError) as e:
            await resolver.mx("example.test")
        self.assertIn("unreachable", str(e.exception))

    async def test_no_nameservers(self) -> None:
        resolver = Resolver(reactor, ["127.0.0.1:1"])
        resolver.servers = []
        with self.assertRaises(DNSTemporaryError):
            await resolver.addresses("example.test")
