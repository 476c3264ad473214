"""Tests for L{mailserver.delivery} and L{mailserver.policy.relay} on the real directory."""

from __future__ import annotations

from pathlib import Path

from argon2 import PasswordHasher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailserver.delivery import LocalDeliveryAgent
from mailserver.directory import SQLiteDirectory
from mailserver.interfaces import IDelivery, IDeliveryAgent
from mailserver.policy.relay import RcptVerdict
from mailserver.store.memory import MemoryStore


class LocalDeliveryTests(SynchronousTestCase):
    def setUp(self) -> None:
        path = Path(self.mktemp())
        path.mkdir()
        cheap = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
        self.directory = SQLiteDirectory(path / "d.sqlite", "example.org", hasher=cheap)
        self.addCleanup(self.directory.close)
        self.directory.add_domain("example.org")
        self.directory.add_user("alice@example.org", "password1")
        self.directory.add_user("bob@example.org", "password1")
        self.directory.add_alias("team@example.org", "alice@example.org")
        self.directory.add_alias("team@example.org", "bob@example.org")
        self.store = MemoryStore()
        self.agent = LocalDeliveryAgent(self.directory, self.store, None)

    def test_provides_interfaces(self) -> None:
        """The agent and its transactions provide their interfaces."""
        self.assertTrue(verifyObject(IDeliveryAgent, self.agent))
        self.assertTrue(verifyObject(IDelivery, self.agent.begin("", "m1")))

    def test_verdicts(self) -> None:
        """Local users are accepted; unknown local users and foreign domains are refused."""
        d = self.agent.begin("x@elsewhere.example", "m1")
        self.assertIs(d.add_rcpt("alice@example.org"), RcptVerdict.ACCEPT)
        self.assertIs(d.add_rcpt("nobody@example.org"), RcptVerdict.UNKNOWN_USER)
        self.assertIs(d.add_rcpt("x@elsewhere.example"), RcptVerdict.RELAY_DENIED)
        self.assertIs(d.add_rcpt("postmaster"), RcptVerdict.UNKNOWN_USER)  # no postmaster yet
        self.directory.add_user("postmaster@example.org", "password1")
        self.assertIs(d.add_rcpt("postmaster"), RcptVerdict.ACCEPT)

    def test_one_copy_per_account_even_when_reached_twice(self) -> None:
        """A user named directly and through an alias gets one copy, with its own headers."""
        d = self.agent.begin("x@elsewhere.example", "m1")
        d.add_rcpt("alice@example.org")
        d.add_rcpt("team@example.org")
        d.write(b"Subject: s\r\n\r\nbody\r\n")
        self.successResultOf(d.commit(b"Received: r\r\n"))
        self.assertEqual(
            self.store.messages,
            {
                "alice@example.org": [
                    b"Return-Path: <x@elsewhere.example>\r\nDelivered-To: alice@example.org\r\n"
                    b"Received: r\r\nSubject: s\r\n\r\nbody\r\n"
                ],
                "bob@example.org": [
                    b"Return-Path: <x@elsewhere.example>\r\nDelivered-To: bob@example.org\r\n"
                    b"Received: r\r\nSubject: s\r\n\r\nbody\r\n"
                ],
            },
        )

    def test_null_sender_return_path(self) -> None:
        """A bounce (null sender) is stored with Return-Path: <>."""
        d = self.agent.begin("", "m1")
        d.add_rcpt("alice@example.org")
        d.write(b"x\r\n")
        self.successResultOf(d.commit(b""))
        [stored] = self.store.messages["alice@example.org"]
        self.assertTrue(stored.startswith(b"Return-Path: <>\r\n"))

    def test_abort_stores_nothing(self) -> None:
        """An aborted transaction delivers nothing."""
        d = self.agent.begin("a@b.example", "m1")
        d.add_rcpt("alice@example.org")
        d.write(b"x\r\n")
        d.abort()
        self.assertEqual(self.store.messages, {})

    def test_store_failure_propagates(self) -> None:
        """A store failure fails the commit (the SMTP layer answers 451)."""
        self.store.fail_with = OSError("disk full")
        d = self.agent.begin("a@b.example", "m1")
        d.add_rcpt("alice@example.org")
        self.failureResultOf(d.commit(b""), OSError)
