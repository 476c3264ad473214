"""
Tests for L{mailserver.limits}: the per-client key (IPv4 address, IPv6 /64) and
L{ConnectionLimiter}'s total and per-client counts.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from mailserver.limits import ConnectionLimiter, client_key


class ClientKeyTests(SynchronousTestCase):
    """L{client_key}."""

    def test_ipv4_is_the_address(self) -> None:
        """An IPv4 client is counted by its address."""
        self.assertEqual(client_key("192.0.2.7"), "192.0.2.7")

    def test_distinct_ipv4_addresses_are_distinct(self) -> None:
        """Two IPv4 addresses of one /24 are two clients."""
        self.assertNotEqual(client_key("192.0.2.7"), client_key("192.0.2.8"))

    def test_ipv6_is_grouped_by_64(self) -> None:
        """Two IPv6 addresses in one /64 are one client, named by the /64."""
        a = client_key("2001:db8:1:2::1")
        b = client_key("2001:db8:1:2:ffff:ffff:ffff:ffff")
        self.assertEqual(a, b)
        self.assertEqual(a, "2001:db8:1:2::/64")

    def test_ipv6_in_different_64s_are_distinct(self) -> None:
        """Addresses that differ in the upper 64 bits are different clients."""
        self.assertNotEqual(client_key("2001:db8:1:2::1"), client_key("2001:db8:1:3::1"))

    def test_ipv6_spellings_are_normalised(self) -> None:
        """Upper case and uncompressed spellings give the same key."""
        self.assertEqual(client_key("2001:DB8:0001:0002:0:0:0:1"), client_key("2001:db8:1:2::abcd"))

    def test_ipv4_mapped_ipv6_is_the_ipv4_address(self) -> None:
        """C{::ffff:a.b.c.d} (a dual-stack socket) counts as the IPv4 client."""
        self.assertEqual(client_key("::ffff:192.0.2.7"), "192.0.2.7")
        self.assertEqual(client_key("::FFFF:c000:207"), "192.0.2.7")

    def test_scope_id_is_ignored(self) -> None:
        """A link-local address with a zone (C{%eth0}) is keyed by its /64."""
        self.assertEqual(client_key("fe80::1%eth0"), "fe80::/64")

    def test_not_an_address_is_kept(self) -> None:
        """Something that is not an IP address (a UNIX socket peer) is its own key."""
        self.assertEqual(client_key("unknown"), "unknown")
        self.assertEqual(client_key(""), "")


class ConnectionLimiterTests(SynchronousTestCase):
    """L{ConnectionLimiter}."""

    def test_acquire_under_limits_counts(self) -> None:
        """Under both limits, C{acquire} returns C{None} and counts the connection."""
        limiter = ConnectionLimiter(max_total=3, max_per_client=2)
        self.assertIsNone(limiter.acquire("192.0.2.1"))
        self.assertIsNone(limiter.acquire("192.0.2.2"))
        self.assertEqual(limiter.total, 2)

    def test_total_limit(self) -> None:
        """Past C{max_total}, C{acquire} returns C{"total"} and counts nothing."""
        limiter = ConnectionLimiter(max_total=2, max_per_client=5)
        limiter.acquire("192.0.2.1")
        limiter.acquire("192.0.2.2")
        self.assertEqual(limiter.acquire("192.0.2.3"), "total")
        self.assertEqual(limiter.total, 2)

    def test_per_client_limit(self) -> None:
        """Past C{max_per_client}, that client gets C{"per-client"}; others still get in."""
        limiter = ConnectionLimiter(max_total=10, max_per_client=2)
        self.assertIsNone(limiter.acquire("192.0.2.1"))
        self.assertIsNone(limiter.acquire("192.0.2.1"))
        self.assertEqual(limiter.acquire("192.0.2.1"), "per-client")
        self.assertIsNone(limiter.acquire("192.0.2.2"))
        self.assertEqual(limiter.total, 3)

    def test_per_client_limit_groups_ipv6_64(self) -> None:
        """Different addresses of one IPv6 /64 share the per-client count."""
        limiter = ConnectionLimiter(max_total=10, max_per_client=2)
        self.assertIsNone(limiter.acquire("2001:db8::1"))
        self.assertIsNone(limiter.acquire("2001:db8::2"))
        self.assertEqual(limiter.acquire("2001:db8::ffff"), "per-client")
        self.assertIsNone(limiter.acquire("2001:db8:0:1::1"))

    def test_per_client_limit_counts_mapped_ipv4_with_ipv4(self) -> None:
        """An IPv4-mapped IPv6 peer and the same IPv4 peer share the per-client count."""
        limiter = ConnectionLimiter(max_total=10, max_per_client=1)
        self.assertIsNone(limiter.acquire("192.0.2.1"))
        self.assertEqual(limiter.acquire("::ffff:192.0.2.1"), "per-client")

    def test_release_frees_total_and_per_client_slots(self) -> None:
        """After C{release}, the same client can connect again."""
        limiter = ConnectionLimiter(max_total=1, max_per_client=1)
        self.assertIsNone(limiter.acquire("192.0.2.1"))
        self.assertEqual(limiter.acquire("192.0.2.1"), "total")
        limiter.release("192.0.2.1")
        self.assertEqual(limiter.total, 0)
        self.assertIsNone(limiter.acquire("192.0.2.1"))

    def test_release_frees_one_slot_only(self) -> None:
        """With two connections from one client, releasing one leaves one counted."""
        limiter = ConnectionLimiter(max_total=10, max_per_client=2)
        limiter.acquire("192.0.2.1")
        limiter.acquire("192.0.2.1")
        limiter.release("192.0.2.1")
        self.assertEqual(limiter.total, 1)
        self.assertIsNone(limiter.acquire("192.0.2.1"))
        self.assertEqual(limiter.acquire("192.0.2.1"), "per-client")

    def test_release_by_another_address_of_same_64(self) -> None:
        """Release is keyed like acquire: another address of the /64 frees the slot."""
        limiter = ConnectionLimiter(max_total=10, max_per_client=1)
        limiter.acquire("2001:db8::1")
        limiter.release("2001:db8::2")
        self.assertIsNone(limiter.acquire("2001:db8::3"))

    def test_total_limit_checked_before_per_client(self) -> None:
        """When both limits are reached, the reason is C{"total"}."""
        limiter = ConnectionLimiter(max_total=1, max_per_client=1)
        limiter.acquire("192.0.2.1")
        self.assertEqual(limiter.acquire("192.0.2.1"), "total")

    def test_zero_limits_refuse_everyone(self) -> None:
        """Limits of 0 refuse every connection."""
        self.assertEqual(ConnectionLimiter(0, 5).acquire("192.0.2.1"), "total")
        self.assertEqual(ConnectionLimiter(5, 0).acquire("192.0.2.1"), "per-client")

    def test_total_never_negative(self) -> None:
        """An extra C{release} does not drive the total below zero."""
        limiter = ConnectionLimiter(max_total=1, max_per_client=1)
        limiter.release("192.0.2.1")
        self.assertEqual(limiter.total, 0)
        self.assertIsNone(limiter.acquire("192.0.2.1"))
        self.assertEqual(limiter.acquire("192.0.2.2"), "total")
