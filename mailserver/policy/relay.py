# -*- test-case-name: tests.test_delivery -*-
"""
Who may send mail where. Returns verdicts; the SMTP layer phrases the replies.

On the inbound listener (port 25) mail is taken only for local domains, for recipients that
exist; nothing is relayed, whoever asks (DESIGN.md §4). On a submission listener the client has
authenticated: local recipients are checked the same way, remote ones are accepted for the queue.
"""

from __future__ import annotations

import enum

from mailserver.interfaces import IDirectory


class RcptVerdict(enum.Enum):
    """What to do with one recipient."""

    ACCEPT = "accept"
    UNKNOWN_USER = "unknown-user"
    """A local domain, but nobody receives this address (550 5.1.1)."""
    RELAY_DENIED = "relay-denied"
    """Not a local domain, and relaying is not allowed here (554 5.7.1)."""
    TOO_MANY = "too-many-recipients"
    """Over the per-message recipient limit (452 4.5.3)."""


def check_inbound_rcpt(directory: IDirectory, address: str) -> tuple[RcptVerdict, list[str]]:
    """
    Decide on recipient C{address} (C{local@domain} or C{"postmaster"}) for inbound mail.

    @return: the verdict and, when accepted, the accounts the mail goes to.
    """
    if address != "postmaster":
        domain = address.rpartition("@")[2]
        if not directory.is_local_domain(domain):
            return RcptVerdict.RELAY_DENIED, []
    accounts = directory.resolve(address)
    if not accounts:
        return RcptVerdict.UNKNOWN_USER, []
    return RcptVerdict.ACCEPT, accounts


def check_submission_rcpt(directory: IDirectory, address: str) -> tuple[RcptVerdict, list[str]]:
    """
    Decide on recipient C{address} for mail from an authenticated user (submission).

    A local domain (or the bare C{"postmaster"}) is checked as on port 25: an address nobody
    receives is L{RcptVerdict.UNKNOWN_USER}. Any other domain is remote and accepted.

    @return: the verdict and the accounts the mail goes to; C{ACCEPT} with C{[]} means a remote
        recipient: queue the message for it.
    """
    if address != "postmaster":
        domain = address.rpartition("@")[2]
        if not directory.is_local_domain(domain):
            return RcptVerdict.ACCEPT, []
    return check_inbound_rcpt(directory, address)
