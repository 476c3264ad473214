# -*- test-case-name: tests.test_delivery -*-
"""
The interfaces the layers meet at.

Protocol code talks to these, never to a concrete store or database: L{IDirectory} answers who
exists, L{IDeliveryAgent} opens one message transaction (L{IDelivery}) whose C{commit} fires only
once the message is durable, and L{IMailStore} is what durably stores a message in a mailbox.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from mailserver.policy.relay import RcptVerdict
    from mailserver.store.body import MessageBody


class IDirectory(Interface):
    """
    Domains, accounts and aliases. Look-ups are small reads answered at once (no Deferred): they
    always see the newest committed state, so changes by the admin CLI apply without a restart.
    """

    def is_local_domain(domain: str) -> bool:
        """Whether mail for C{domain} (lower case, no trailing dot) is delivered here."""

    def resolve(address: str) -> list[str]:
        """
        The accounts (as C{local@domain}) that mail to C{address} goes to, after aliases,
        catch-alls and plus-addressing; C{[]} when nobody receives it. C{address} is
        C{local@domain}, the domain lower case.
        """


class IMailStore(Interface):
    """Mailboxes on disk (or in memory for tests)."""

    def deliver(targets: Sequence[tuple[str, bytes]], body: MessageBody) -> Deferred[list[str]]:
        """
        Store one message in the INBOX of each account.

        @param targets: C{(account, prefix)} pairs: C{prefix} is the header block written before
            C{body} in that account's copy (C{Return-Path:}, C{Delivered-To:}, C{Received:}).
        @return: fires with the stored copies' names once every copy is on disk and its directory
            entry synced; fails (storing nothing new visible) otherwise.
        """


class IDelivery(Interface):
    """
    One message transaction: recipients, then the body in chunks, then C{commit} or C{abort}.
    The SMTP C{250} after DATA waits for C{commit}'s Deferred.
    """

    size = Attribute("Octets of body received so far.")

    def add_rcpt(address: str) -> RcptVerdict:
        """Check one recipient (C{local@domain}) and remember it if accepted."""

    def write(data: bytes) -> None:
        """Append body octets (already un-dot-stuffed, CRLF line endings)."""

    def commit(trace: bytes) -> Deferred[None]:
        """
        Deliver to every accepted recipient. C{trace} is the C{Received:} header block to put on
        top. Fires once the message is durable for all of them.
        """

    def abort() -> None:
        """Forget the transaction; nothing is delivered. Safe to call more than once."""


class IDeliveryAgent(Interface):
    """Opens message transactions."""

    def begin(mail_from: str, message_id: str) -> IDelivery:
        """Start transaction C{message_id} (the id logged and put in C{Received:}) for envelope
        sender C{mail_from} (C{""} for the null sender)."""
