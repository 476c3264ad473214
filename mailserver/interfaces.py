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
    from mailserver.queue.model import MailOptions, Notify, Outgoing, RcptResult, Submission
    from mailserver.store.body import MessageBody


class IDirectory(Interface):
    """
    Domains, accounts and aliases. Look-ups are small reads answered at once (no Deferred): they
    see the directory's own changes at once, and those of the admin CLI by the time its command
    returns (L{mailserver.directory.RECHECK}), without a restart.
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

    def add_rcpt(
        address: str, notify: frozenset[Notify] | None = None, orcpt: str | None = None
    ) -> RcptVerdict:
        """
        Check one recipient (C{local@domain}) and remember it if accepted, with its RFC 3461
        NOTIFY and ORCPT (see L{mailserver.queue.model.QueuedRecipient}).
        """

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

    def begin(mail_from: str, message_id: str, options: MailOptions | None = None) -> IDelivery:
        """Start transaction C{message_id} (the id logged and put in C{Received:}) for envelope
        sender C{mail_from} (C{""} for the null sender), with the MAIL parameters and the
        authenticated account in C{options} (None: none, as on port 25)."""


class IQueue(Interface):
    """The outbound queue (L{mailserver.queue.service})."""

    def submit(submission: Submission, prefix: bytes, body: MessageBody) -> Deferred[None]:
        """
        Queue C{body} (with the header block C{prefix} on top) for C{submission}'s recipients.
        Fires once the entry is on disk and synced (the SMTP C{250} waits for it); the first
        delivery attempt is scheduled at once.
        """


class IOutbound(Interface):
    """Delivery to the next hop (L{mailserver.queue.delivery})."""

    def send(domain: str, messages: Sequence[Outgoing]) -> Deferred[list[list[RcptResult]]]:
        """
        Deliver C{messages}, all for recipients in C{domain}, to its next hop (route, smarthost
        or MX hosts in preference order), over one connection where the hop allows.

        @return: fires with one list of results per message, one result per recipient, in the
            order given; never fails (a local error is a C{deferred} result).
        """
