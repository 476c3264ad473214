"""
Tests for L{mailserver.limits}: the per-client key (IPv4 address, IPv6 /64),
L{ConnectionLimiter}'s total and per-client counts, and L{AuthThrottle}.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailserver.limits import AuthThrottle, ConnectionLimiter, client_key


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


class AuthThrottleTests(SynchronousTestCase):
    """L{AuthThrottle}: failed logins per client, delays per account."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)

    def throttle(
        self,
        max_failures: int = 5,
        delay: float = 2.0,
        max_delay: float = 30.0,
        max_clients: int = 10_000,
        max_accounts: int = 10_000,
        max_pending: int = 32,
    ) -> AuthThrottle:
        """A throttle on C{self.clock} with a 600 s window."""
        return AuthThrottle(
            self.clock,
            max_failures=max_failures,
            window=600.0,
            delay=delay,
            max_delay=max_delay,
            max_clients=max_clients,
            max_accounts=max_accounts,
            max_pending=max_pending,
        )

    def fail_times(self, throttle: AuthThrottle, host: str, account: str, n: int) -> list[float]:
        return [throttle.failed(host, account) for _ in range(n)]

    def test_new_client_not_refused(self) -> None:
        """A client with no failures may try."""
        self.assertFalse(self.throttle().refused("192.0.2.1"))

    def test_refused_after_max_failures(self) -> None:
        """Four failures leave the client free to try; the fifth makes it refused."""
        throttle = self.throttle()
        self.fail_times(throttle, "192.0.2.1", "alice@example.org", 4)
        self.assertFalse(throttle.refused("192.0.2.1"))
        throttle.failed("192.0.2.1", "alice@example.org")
        self.assertTrue(throttle.refused("192.0.2.1"))

    def test_failures_for_different_accounts_add_up(self) -> None:
        """A client is counted over all the names it tries, not per name."""
        throttle = self.throttle()
        for i in range(5):
            throttle.failed("192.0.2.1", f"user{i}@example.org")
        self.assertTrue(throttle.refused("192.0.2.1"))

    def test_other_ipv4_address_not_refused(self) -> None:
        """Another IPv4 address, even next door, is another client."""
        throttle = self.throttle()
        self.fail_times(throttle, "192.0.2.1", "alice@example.org", 5)
        self.assertFalse(throttle.refused("192.0.2.2"))

    def test_ipv6_counted_per_64(self) -> None:
        """Failures from different addresses of one IPv6 /64 add up; another /64 is free."""
        throttle = self.throttle()
        for i in range(5):
            throttle.failed(f"2001:db8:1:2::{i + 1:x}", "alice@example.org")
        self.assertTrue(throttle.refused("2001:db8:1:2:ffff::9"))
        self.assertFalse(throttle.refused("2001:db8:1:3::1"))

    def test_mapped_ipv4_counted_with_ipv4(self) -> None:
        """An IPv4-mapped IPv6 peer is the same client as its IPv4 address."""
        throttle = self.throttle()
        self.fail_times(throttle, "::ffff:192.0.2.1", "alice@example.org", 5)
        self.assertTrue(throttle.refused("192.0.2.1"))

    def test_failures_expire_after_window(self) -> None:
        """Once its failures are older than the window, the client may try again."""
        throttle = self.throttle()
        self.fail_times(throttle, "192.0.2.1", "alice@example.org", 5)
        self.clock.advance(599)
        self.assertTrue(throttle.refused("192.0.2.1"))
        self.clock.advance(1)
        self.assertFalse(throttle.refused("192.0.2.1"))

    def test_window_slides(self) -> None:
        """
        Only failures inside the window count: when the oldest leaves it, one more try is
        allowed, not a fresh five.
        """
        throttle = self.throttle()
        throttle.failed("192.0.2.1", "a@example.org")
        self.clock.advance(300)
        self.fail_times(throttle, "192.0.2.1", "a@example.org", 4)
        self.assertTrue(throttle.refused("192.0.2.1"))
        self.clock.advance(300)
        self.assertFalse(throttle.refused("192.0.2.1"))
        throttle.failed("192.0.2.1", "a@example.org")
        self.assertTrue(throttle.refused("192.0.2.1"))

    def test_failure_delay(self) -> None:
        """Each failure returns the configured delay."""
        throttle = self.throttle(delay=0.25)
        self.assertEqual(self.fail_times(throttle, "192.0.2.1", "a@example.org", 3), [0.25] * 3)

    def test_zero_delay(self) -> None:
        """A delay of 0 stays 0, however attacked the account."""
        throttle = self.throttle(delay=0.0)
        delays = [throttle.failed(f"192.0.2.{i}", "a@example.org") for i in range(20)]
        self.assertEqual(delays, [0.0] * 20)

    def test_attacked_account_delay_grows_and_is_capped(self) -> None:
        """
        Failures for one account from many addresses: the delay stays the base one up to
        max_failures, then doubles with each failure, up to max_delay.
        """
        throttle = self.throttle(delay=2.0, max_delay=30.0)
        delays = [throttle.failed(f"192.0.2.{i}", "alice@example.org") for i in range(1, 11)]
        self.assertEqual(delays, [2.0] * 5 + [4.0, 8.0, 16.0, 30.0, 30.0])

    def test_attacked_account_delay_falls_back_after_window(self) -> None:
        """An account's failures leave the window too, and its delay returns to the base."""
        throttle = self.throttle(delay=2.0)
        for i in range(10):
            throttle.failed(f"192.0.2.{i}", "alice@example.org")
        self.clock.advance(600)
        self.assertEqual(throttle.failed("192.0.2.100", "alice@example.org"), 2.0)

    def test_attacked_account_never_refuses_another_client(self) -> None:
        """
        However many failures an account has, a client with no failures of its own is not
        refused: the real user gets in from elsewhere.
        """
        throttle = self.throttle()
        for i in range(200):
            throttle.failed(f"2001:db8:{i:x}::1", "alice@example.org")
        self.assertFalse(throttle.refused("198.51.100.7"))
        attempt = throttle.attempt("198.51.100.7")
        assert attempt is not None
        attempt.succeeded("alice@example.org")

    def test_other_accounts_keep_base_delay(self) -> None:
        """The extra delay is for the attacked account only."""
        throttle = self.throttle(delay=1.0)
        for i in range(10):
            throttle.failed(f"192.0.2.{i}", "alice@example.org")
        self.assertEqual(throttle.failed("192.0.2.200", "bob@example.org"), 1.0)

    def test_success_forgives_that_accounts_failures_only(self) -> None:
        """
        After a success for alice, the client's failures for alice no longer count; its
        failures for other accounts still do.
        """
        throttle = self.throttle()
        self.fail_times(throttle, "192.0.2.1", "alice@example.org", 3)
        self.fail_times(throttle, "192.0.2.1", "bob@example.org", 2)
        self.assertTrue(throttle.refused("192.0.2.1"))
        throttle.succeeded("192.0.2.1", "alice@example.org")
        self.assertFalse(throttle.refused("192.0.2.1"))
        self.fail_times(throttle, "192.0.2.1", "carol@example.org", 2)
        self.assertFalse(throttle.refused("192.0.2.1"))
        throttle.failed("192.0.2.1", "carol@example.org")
        self.assertTrue(throttle.refused("192.0.2.1"))

    def test_success_for_own_account_buys_no_guesses(self) -> None:
        """Logging in to one's own account does not reset failures for someone else's."""
        throttle = self.throttle()
        self.fail_times(throttle, "192.0.2.1", "victim@example.org", 5)
        throttle.succeeded("192.0.2.1", "mallory@example.org")
        self.assertTrue(throttle.refused("192.0.2.1"))

    def test_attempt_refused_returns_none(self) -> None:
        """C{attempt} gives C{None} to a refused client."""
        throttle = self.throttle()
        self.fail_times(throttle, "192.0.2.1", "a@example.org", 5)
        self.assertIsNone(throttle.attempt("192.0.2.1"))
        self.assertIsNotNone(throttle.attempt("192.0.2.2"))

    def test_checks_in_progress_do_not_count_but_are_capped(self) -> None:
        """
        Logins still being checked are not failures (a mail client logs in on several
        connections at once), but one client may have at most max_pending of them.
        """
        throttle = self.throttle(max_failures=2, max_pending=4)
        attempts = [throttle.attempt("192.0.2.1") for _ in range(4)]
        self.assertNotIn(None, attempts)
        self.assertFalse(throttle.refused("192.0.2.1"))
        self.assertIsNone(throttle.attempt("192.0.2.1"))
        self.assertIsNotNone(throttle.attempt("192.0.2.2"))
        attempts[0].succeeded("a@example.org")  # type: ignore[union-attr]
        self.assertIsNotNone(throttle.attempt("192.0.2.1"))

    def test_attempt_end_releases_its_slot(self) -> None:
        """
        Success and abandon free the in-progress slot without counting a failure; failure
        turns it into a counted failure.
        """
        throttle = self.throttle(max_failures=2, max_pending=2)
        first = throttle.attempt("192.0.2.1")
        second = throttle.attempt("192.0.2.1")
        assert first is not None and second is not None
        self.assertIsNone(throttle.attempt("192.0.2.1"))
        first.succeeded("a@example.org")
        second.abandon()
        self.assertFalse(throttle.refused("192.0.2.1"))
        third = throttle.attempt("192.0.2.1")
        assert third is not None
        self.assertEqual(third.failed("a@example.org"), 2.0)
        self.assertFalse(throttle.refused("192.0.2.1"))
        fourth = throttle.attempt("192.0.2.1")
        assert fourth is not None
        fourth.failed("a@example.org")
        self.assertTrue(throttle.refused("192.0.2.1"))

    def test_attempt_ends_once(self) -> None:
        """Ending an attempt twice releases one slot and counts one failure."""
        throttle = self.throttle(max_failures=2, max_pending=2)
        keep = throttle.attempt("192.0.2.1")
        attempt = throttle.attempt("192.0.2.1")
        assert keep is not None and attempt is not None
        attempt.failed("a@example.org")
        attempt.failed("a@example.org")
        attempt.abandon()
        # One failure counted (not two), one slot freed (not two).
        self.assertFalse(throttle.refused("192.0.2.1"))
        self.assertIsNotNone(throttle.attempt("192.0.2.1"))
        self.assertIsNone(throttle.attempt("192.0.2.1"))

    def test_memory_cap_on_clients(self) -> None:
        """
        A flood of addresses keeps at most max_clients on record; the client whose last failure
        is oldest is forgotten first.
        """
        throttle = self.throttle(max_clients=100, max_accounts=50)
        self.fail_times(throttle, "198.51.100.1", "a@example.org", 5)
        for i in range(1000):
            self.clock.advance(0.01)
            throttle.failed(f"2001:db8:{i:x}::1", f"user{i}@example.org")
        self.assertEqual(throttle.tracked, (100, 50))
        self.assertFalse(throttle.refused("198.51.100.1"))

    def test_memory_cap_keeps_the_newest(self) -> None:
        """Under the cap, the most recent failing clients are the ones still counted."""
        throttle = self.throttle(max_clients=10)
        for i in range(20):
            self.clock.advance(1)
            self.fail_times(throttle, f"192.0.2.{i}", "a@example.org", 5)
        self.assertTrue(all(throttle.refused(f"192.0.2.{i}") for i in range(10, 20)))
        self.assertFalse(any(throttle.refused(f"192.0.2.{i}") for i in range(10)))

    def test_expired_entries_are_dropped(self) -> None:
        """Clients and accounts whose failures left the window take no memory."""
        throttle = self.throttle()
        for i in range(50):
            throttle.failed(f"192.0.2.{i}", f"user{i}@example.org")
        self.assertEqual(throttle.tracked, (50, 50))
        self.clock.advance(600)
        self.assertEqual(throttle.tracked, (0, 0))

    def test_history_per_entry_is_bounded(self) -> None:
        """
        Endless failures for one account from one client keep a bounded history: the client
        stays refused and the account's delay stays at the cap.
        """
        throttle = self.throttle(delay=1.0, max_delay=8.0)
        for _ in range(10_000):
            delay = throttle.failed("192.0.2.1", "alice@example.org")
        self.assertEqual(delay, 8.0)
        self.assertLessEqual(len(throttle._clients[client_key("192.0.2.1")]), 5)
        self.assertLessEqual(len(throttle._accounts["alice@example.org"]), 5 + 3)
        self.assertTrue(throttle.refused("192.0.2.1"))

    def test_max_failures_must_be_positive(self) -> None:
        """A throttle that would refuse everyone is a programming error."""
        self.assertRaises(ValueError, AuthThrottle, self.clock, max_failures=0)
