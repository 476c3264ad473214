"""
Tests for L{mailserver.auth}: logins through C{twisted.cred} on a real SQLite directory, with the
password checks in a real thread pool, throttled by L{AuthThrottle} and delayed on a L{Clock}.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from argon2 import PasswordHasher
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater
from twisted.logger import capturedLogs, eventAsJSON
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from mailserver.auth import (
    Account,
    AccountRealm,
    Authenticator,
    DirectoryChecker,
    IAccount,
    LoginFailed,
    Throttled,
    account_name,
)
from mailserver.directory import DirectoryError, SQLiteDirectory
from mailserver.limits import AuthThrottle
from mailserver.sasl import ScramCredentials, ScramSHA256, Success
from tests.test_sasl import client_final

PASSWORD = "correct horse battery staple"
WRONG = "wrong-password-1234"
DELAY = 0.5
MAX_FAILURES = 3


class RecordingDirectory:
    """The real directory, recording each check: the name asked for and the thread it ran in."""

    def __init__(self, directory: SQLiteDirectory) -> None:
        self.directory = directory
        self.checks: list[tuple[str, str]] = []
        self.error: Exception | None = None

    def verify_password(self, address: str, password: str | bytes) -> bool:
        self.checks.append((address, threading.current_thread().name))
        if self.error is not None:
            raise self.error
        return self.directory.verify_password(address, password)

    def scram_credentials(self, address: str) -> ScramCredentials:
        self.checks.append((address, threading.current_thread().name))
        return self.directory.scram_credentials(address)


class AccountNameTests(SynchronousTestCase):
    """L{account_name}."""

    def test_full_address_normalized(self) -> None:
        """Spaces around and the case of the domain and local part are folded."""
        self.assertEqual(account_name(" Alice@Example.ORG ", "example.org"), "alice@example.org")

    def test_bare_local_part_gets_primary_domain(self) -> None:
        """A name without @ is an account of the primary domain."""
        self.assertEqual(account_name("Alice", "example.org"), "alice@example.org")

    def test_bare_local_part_without_primary_domain(self) -> None:
        """With no primary domain, a bare name is no account."""
        self.assertRaises(DirectoryError, account_name, "alice", "")

    def test_bad_names_refused(self) -> None:
        """Names that cannot be accounts raise L{DirectoryError}."""
        for bad in ("", "a@b@c", "../x@example.org", "al ice@example.org"):
            self.assertRaises(DirectoryError, account_name, bad, "example.org")


class CredTests(SynchronousTestCase):
    """The C{twisted.cred} pieces."""

    def test_interfaces(self) -> None:
        """The checker and realm provide their C{twisted.cred} interfaces."""
        pool = ThreadPool()
        checker = DirectoryChecker(
            RecordingDirectory(None),  # type: ignore[arg-type]
            reactor,  # type: ignore[arg-type]
            pool,
        )
        self.assertTrue(verifyObject(ICredentialsChecker, checker))
        self.assertTrue(verifyObject(IRealm, AccountRealm()))
        self.assertTrue(verifyObject(IAccount, Account("alice@example.org")))

    def test_realm_gives_account_avatar(self) -> None:
        """The realm's avatar for an avatar id is the L{Account} of that address."""
        interface, avatar, logout = AccountRealm().requestAvatar(
            "bj\u00f6rn@example.org".encode(), None, IAccount
        )
        self.assertIs(interface, IAccount)
        self.assertEqual(avatar, Account("bj\u00f6rn@example.org"))
        logout()

    def test_realm_refuses_other_interfaces(self) -> None:
        """Asked for another interface, the realm refuses."""
        self.assertRaises(
            NotImplementedError, AccountRealm().requestAvatar, b"a@example.org", None, IRealm
        )


class AuthTestCase(TestCase):
    """An L{Authenticator} on a real directory and thread pool, delays on a L{Clock}."""

    def setUp(self) -> None:
        root = Path(self.mktemp())
        root.mkdir(parents=True)
        cheap = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
        directory = SQLiteDirectory(root / "d.sqlite", "example.org", hasher=cheap)
        self.addCleanup(directory.close)
        directory.add_domain("example.org")
        directory.add_user("alice@example.org", PASSWORD)
        directory.add_user("bj\u00f6rn@example.org", PASSWORD)
        self.directory = RecordingDirectory(directory)
        self.pool = ThreadPool(minthreads=1, maxthreads=4, name="test-auth-pool")
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.throttle = AuthThrottle(
            self.clock, max_failures=MAX_FAILURES, window=600.0, delay=DELAY
        )
        self.auth = self.authenticator("example.org")

    def authenticator(self, primary_domain: str) -> Authenticator:
        return Authenticator(
            self.directory,
            reactor,  # type: ignore[arg-type]
            self.pool,
            self.throttle,
            primary_domain,
            clock=self.clock,
        )

    async def settle(self, d: Deferred[Any] | None, delayed: int = 0) -> None:
        """
        Let the real reactor run until C{d} has fired or the clock holds more than C{delayed}
        calls (a failure's delay has begun).
        """
        done: list[bool] = []
        if d is not None:
            d.addBoth(lambda result: done.append(True) or result)
        for _ in range(2000):
            if done or len(self.clock.getDelayedCalls()) > delayed:
                return
            await deferLater(reactor, 0.005, lambda: None)  # type: ignore[arg-type]
        self.fail("the login neither finished nor began its delay")

    async def login(self, host: str, username: str, password: str) -> str:
        """A login that must succeed at once, with no delay."""
        d = self.auth.authenticate(host, username, password)
        await self.settle(d)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        account: str = self.successResultOf(d)
        return account

    async def fail_login(self, host: str, username: str, password: str) -> None:
        """A login that must fail with L{LoginFailed} exactly C{DELAY} seconds later."""
        d = self.auth.authenticate(host, username, password)
        await self.settle(d)
        self.assertFalse(d.called, "a failed login must not be answered before its delay")
        [call] = self.clock.getDelayedCalls()
        self.assertAlmostEqual(call.getTime() - self.clock.seconds(), DELAY)
        self.clock.advance(DELAY - 0.01)
        self.assertFalse(d.called)
        self.clock.advance(0.01)
        self.failureResultOf(d, LoginFailed)


class AuthenticatorTests(AuthTestCase):
    """L{Authenticator.authenticate} against a real directory and thread pool."""

    async def test_right_password(self) -> None:
        """The right password fires with the account address, checked in the pool's thread."""
        self.assertEqual(
            await self.login("192.0.2.1", "alice@example.org", PASSWORD), "alice@example.org"
        )
        [(name, thread)] = self.directory.checks
        self.assertEqual(name, "alice@example.org")
        self.assertNotEqual(thread, threading.current_thread().name)
        self.assertIn("test-auth-pool", thread)

    async def test_address_case_folded(self) -> None:
        """Any case of the address logs in to the account, named as the directory names it."""
        self.assertEqual(
            await self.login("192.0.2.1", "Alice@EXAMPLE.Org", PASSWORD), "alice@example.org"
        )

    async def test_utf8_local_part(self) -> None:
        """A UTF-8 local part logs in to its account."""
        self.assertEqual(
            await self.login("192.0.2.1", "Bj\u00d6rn@example.org", PASSWORD),
            "bj\u00f6rn@example.org",
        )

    async def test_bare_local_part(self) -> None:
        """A bare local part means the account of the primary domain."""
        self.assertEqual(await self.login("192.0.2.1", "alice", PASSWORD), "alice@example.org")

    async def test_bare_local_part_without_primary_domain(self) -> None:
        """With no primary domain a bare name is no account: the login fails."""
        self.auth = self.authenticator("")
        await self.fail_login("192.0.2.1", "alice", PASSWORD)

    async def test_wrong_password(self) -> None:
        """A wrong password fails with L{LoginFailed}, after the configured delay."""
        await self.fail_login("192.0.2.1", "alice@example.org", WRONG)
        self.assertEqual([name for name, _ in self.directory.checks], ["alice@example.org"])

    async def test_unknown_user(self) -> None:
        """
        An unknown user fails like a wrong password: checked all the same (the directory's
        dummy hash), after the same delay.
        """
        await self.fail_login("192.0.2.1", "nobody@example.org", PASSWORD)
        self.assertEqual([name for name, _ in self.directory.checks], ["nobody@example.org"])

    async def test_bad_name(self) -> None:
        """A name that cannot be an account fails like a wrong password, and is checked."""
        await self.fail_login("192.0.2.1", "a b@@example.org", PASSWORD)
        self.assertEqual(len(self.directory.checks), 1)

    async def test_lone_surrogate_password_fails(self) -> None:
        """A password that is not valid Unicode fails as a wrong password, not an error."""
        await self.fail_login("192.0.2.1", "alice@example.org", "\ud800")

    async def test_throttled_after_max_failures(self) -> None:
        """
        After C{MAX_FAILURES} failures a client is refused at once with L{Throttled}, even with
        the right password, and nothing is checked; another address still gets in at once.
        """
        for _ in range(MAX_FAILURES):
            await self.fail_login("192.0.2.1", "alice@example.org", WRONG)
        checks = len(self.directory.checks)
        d = self.auth.authenticate("192.0.2.1", "alice@example.org", PASSWORD)
        self.failureResultOf(d, Throttled)
        self.assertEqual(len(self.directory.checks), checks)
        self.assertEqual(
            await self.login("198.51.100.7", "alice@example.org", PASSWORD), "alice@example.org"
        )

    async def test_throttled_per_ipv6_64(self) -> None:
        """Failures from several addresses of one IPv6 /64 throttle the whole /64."""
        for i in range(MAX_FAILURES):
            await self.fail_login(f"2001:db8:1:2::{i + 1}", "alice@example.org", WRONG)
        d = self.auth.authenticate("2001:db8:1:2::ffff", "alice@example.org", PASSWORD)
        self.failureResultOf(d, Throttled)
        self.assertEqual(
            await self.login("2001:db8:1:3::1", "alice@example.org", PASSWORD),
            "alice@example.org",
        )

    async def test_throttle_expires(self) -> None:
        """After the window, a throttled client may log in again."""
        for _ in range(MAX_FAILURES):
            await self.fail_login("192.0.2.1", "alice@example.org", WRONG)
        self.failureResultOf(self.auth.authenticate("192.0.2.1", "alice", PASSWORD), Throttled)
        self.clock.advance(600)
        self.assertEqual(await self.login("192.0.2.1", "alice", PASSWORD), "alice@example.org")

    async def test_attacked_account_not_locked_out(self) -> None:
        """
        While alice's account fails from many addresses (each delayed longer), her right
        password from another address gets in at once, with no delay.
        """
        delays = []
        for i in range(MAX_FAILURES + 3):
            d = self.auth.authenticate(f"203.0.113.{i}", "alice@example.org", WRONG)
            await self.settle(d)
            [call] = self.clock.getDelayedCalls()
            delays.append(call.getTime() - self.clock.seconds())
            self.clock.advance(call.getTime() - self.clock.seconds())
            self.failureResultOf(d, LoginFailed)
        self.assertEqual(delays, [DELAY] * MAX_FAILURES + [DELAY * 2, DELAY * 4, DELAY * 8])
        self.assertEqual(
            await self.login("198.51.100.7", "alice@example.org", PASSWORD), "alice@example.org"
        )

    async def test_parallel_guesses_capped(self) -> None:
        """
        Guesses sent at once on parallel connections are checked two at a time, and once
        MAX_FAILURES of them have failed the rest are refused without a check: no more than
        MAX_FAILURES + 2 passwords are ever checked.
        """
        results = [
            self.auth.authenticate("192.0.2.1", "alice@example.org", f"guess{i}")
            for i in range(MAX_FAILURES + 6)
        ]
        for _ in range(300):  # bounded: each round lets queued checks run, then their delays
            if all(d.called for d in results):
                break
            await deferLater(reactor, 0.01, lambda: None)  # type: ignore[arg-type]
            self.clock.advance(DELAY)
        outcomes = [self.failureResultOf(d).type for d in results]
        self.assertGreaterEqual(outcomes.count(Throttled), 4)
        self.assertEqual(outcomes.count(LoginFailed), len(self.directory.checks))
        self.assertLessEqual(len(self.directory.checks), MAX_FAILURES + 2)

    async def test_internal_error_is_not_a_failure(self) -> None:
        """
        When the directory cannot check, the login fails with that error (the protocol answers
        with an internal error), and it counts neither as a failure nor as a check in progress.
        """
        self.directory.error = RuntimeError("database is locked")
        for _ in range(MAX_FAILURES + 1):
            d = self.auth.authenticate("192.0.2.1", "alice@example.org", PASSWORD)
            await self.settle(d)
            self.failureResultOf(d, RuntimeError)
        self.directory.error = None
        self.assertEqual(await self.login("192.0.2.1", "alice", PASSWORD), "alice@example.org")

    async def test_portal_login(self) -> None:
        """The portal logs in with plain C{twisted.cred} credentials to an L{IAccount}."""
        d = self.auth.portal.login(
            UsernamePassword(b"alice@example.org", PASSWORD.encode()), None, IAccount
        )
        await self.settle(d)
        interface, avatar, _ = self.successResultOf(d)
        self.assertIs(interface, IAccount)
        self.assertEqual(avatar, Account("alice@example.org"))
        d = self.auth.portal.login(
            UsernamePassword(b"alice@example.org", WRONG.encode()), None, IAccount
        )
        await self.settle(d)
        self.failureResultOf(d, UnauthorizedLogin)

    async def test_log_events_never_hold_the_password(self) -> None:
        """
        Success, failure and throttling are logged with the peer and the name; no event holds
        the password, in any field.
        """
        with capturedLogs() as events:
            await self.login("192.0.2.9", "alice", PASSWORD)
            for _ in range(MAX_FAILURES):
                await self.fail_login("192.0.2.1", "alice@example.org", PASSWORD + "x")
            self.failureResultOf(
                self.auth.authenticate("192.0.2.1", "alice@example.org", PASSWORD), Throttled
            )
        ours = [e for e in events if str(e.get("event", "")).startswith("auth.")]
        self.assertEqual(
            [(e["event"], e["peer"]) for e in ours],
            [("auth.succeeded", "192.0.2.9")]
            + [("auth.failed", "192.0.2.1")] * MAX_FAILURES
            + [("auth.throttled", "192.0.2.1")],
        )
        self.assertEqual(ours[0]["account"], "alice@example.org")
        self.assertEqual(ours[1]["username"], "alice@example.org")
        self.assertEqual(ours[-1]["username"], "alice@example.org")
        for event in events:
            self.assertNotIn(PASSWORD, eventAsJSON(event))
            self.assertNotIn(json.dumps(PASSWORD)[1:-1], repr(event))

    async def test_logged_name_cannot_forge_a_line(self) -> None:
        """A name with a line break is logged on one line, its control characters escaped."""
        name = "x\r\n[203.0.113.66] login failed for root"
        with capturedLogs() as events:
            await self.fail_login("192.0.2.1", name, WRONG)
        [event] = [e for e in events if e.get("event") == "auth.failed"]
        self.assertNotIn("\n", event["username"])
        self.assertNotIn("\r", event["username"])
        self.assertIn("203.0.113.66", event["username"])


class ScramTests(AuthTestCase):
    """The SCRAM-SHA-256 path: credentials by login name, outcomes through the throttle."""

    def scram_exchange(self, username: str, password: str) -> bool:
        """A SCRAM exchange with the authenticator's look-up: whether the proof was right."""
        scram = ScramSHA256(self.auth.scram_credentials)
        bare = f"n={username},r=nonce"
        challenge = scram.respond(f"n,,{bare}".encode())
        final, _ = client_final(password, bare, challenge.data.decode())  # type: ignore[union-attr]
        return isinstance(scram.respond(final), Success)

    async def scram_fail(self, host: str, username: str, delay: float | None = DELAY) -> None:
        """A wrong proof must fail with L{LoginFailed} C{delay} seconds later (None: any)."""
        d = self.auth.scram_login(host, username, False)
        self.assertFalse(d.called, "a failed login must not be answered before its delay")
        [call] = self.clock.getDelayedCalls()
        waited = call.getTime() - self.clock.seconds()
        if delay is not None:
            self.assertAlmostEqual(waited, delay)
        self.clock.advance(waited)
        self.failureResultOf(d, LoginFailed)

    def test_credentials_by_login_name(self) -> None:
        """Names follow L{account_name}: any case, a bare name in the primary domain; the
        look-up is a small read on the calling thread."""
        real = self.directory.directory.scram_credentials("alice@example.org")
        self.assertEqual(self.auth.scram_credentials("Alice@Example.ORG"), real)
        self.assertEqual(self.auth.scram_credentials("alice"), real)
        self.assertEqual(self.directory.checks[0][1], threading.current_thread().name)
        self.assertTrue(self.scram_exchange("alice", PASSWORD))
        self.assertFalse(self.scram_exchange("alice", WRONG))

    def test_unknown_and_bad_names_get_stable_fakes(self) -> None:
        for name in ("nobody@example.org", "a b@@example.org"):
            fake = self.auth.scram_credentials(name)
            self.assertEqual(self.auth.scram_credentials(name), fake)
            self.assertFalse(self.scram_exchange(name, PASSWORD))

    def test_success(self) -> None:
        """A right proof fires at once with the account, named as the directory names it."""
        with capturedLogs() as events:
            d = self.auth.scram_login("192.0.2.1", "Alice", True)
        self.assertEqual(self.successResultOf(d), "alice@example.org")
        self.assertEqual(
            [(e["event"], e["account"]) for e in events if e.get("event") == "auth.succeeded"],
            [("auth.succeeded", "alice@example.org")],
        )

    async def test_wrong_proofs_throttled(self) -> None:
        """
        Wrong proofs are failures with the password's delay; after C{MAX_FAILURES} the
        client gets L{Throttled} at once even with a right proof; another address gets in.
        """
        for _ in range(MAX_FAILURES):
            await self.scram_fail("192.0.2.1", "alice@example.org")
        self.failureResultOf(self.auth.scram_login("192.0.2.1", "alice", True), Throttled)
        self.assertEqual(
            self.successResultOf(self.auth.scram_login("198.51.100.7", "alice", True)),
            "alice@example.org",
        )

    async def test_one_throttle_for_passwords_and_scram(self) -> None:
        """Failed SCRAM proofs and wrong passwords count together."""
        await self.scram_fail("192.0.2.1", "alice@example.org")
        for _ in range(MAX_FAILURES - 1):
            await self.fail_login("192.0.2.1", "alice@example.org", WRONG)
        self.failureResultOf(
            self.auth.authenticate("192.0.2.1", "alice@example.org", PASSWORD), Throttled
        )
        self.failureResultOf(self.auth.scram_login("192.0.2.1", "alice", True), Throttled)

    async def test_success_forgives_own_failures(self) -> None:
        """As with passwords, a success forgives this client's failures on that account."""
        for _ in range(MAX_FAILURES - 1):
            await self.scram_fail("192.0.2.1", "alice")
        self.successResultOf(self.auth.scram_login("192.0.2.1", "alice", True))
        for _ in range(MAX_FAILURES - 1):
            await self.scram_fail("192.0.2.1", "alice", None)
        self.successResultOf(self.auth.scram_login("192.0.2.1", "alice", True))

    async def test_attacked_account_delays_grow(self) -> None:
        """Failures of one account from many addresses make its delay grow (capped)."""
        for i in range(MAX_FAILURES):
            await self.scram_fail(f"203.0.113.{i}", "alice")
        d = self.auth.scram_login("203.0.113.99", "alice", False)
        [call] = self.clock.getDelayedCalls()
        self.assertAlmostEqual(call.getTime() - self.clock.seconds(), DELAY * 2)
        self.clock.advance(DELAY * 2)
        self.failureResultOf(d, LoginFailed)


class SlowDirectory:
    """Password checks that wait until the test lets them go, counting how many overlap."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.running = 0
        self.most = 0

    def verify_password(self, address: str, password: str | bytes) -> bool:
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        self.release.wait(10)
        with self.lock:
            self.running -= 1
        return password == PASSWORD.encode()


class CheckConcurrencyTests(TestCase):
    async def test_password_checks_are_bounded(self) -> None:
        """
        However many logins arrive at once, at most C{concurrency} argon2id checks run at a
        time, so the other I/O threads stay free for deliveries.
        """
        pool = ThreadPool(minthreads=1, maxthreads=8, name="test-auth-bound")
        pool.start()
        self.addCleanup(pool.stop)
        directory = SlowDirectory()
        checker = DirectoryChecker(directory, reactor, pool, concurrency=2)  # type: ignore[arg-type]
        checks = [
            checker.requestAvatarId(UsernamePassword(b"alice@example.org", PASSWORD.encode()))
            for _ in range(6)
        ]
        await deferLater(reactor, 0.2, lambda: None)  # type: ignore[arg-type]
        self.assertEqual(directory.running, 2)
        directory.release.set()
        for d in checks:
            self.assertEqual(await d, b"alice@example.org")
        self.assertEqual(directory.most, 2)
