# -*- test-case-name: tests.test_delivery -*-
"""
Local delivery transactions: the L{IDeliveryAgent} that the inbound SMTP listener uses.

Recipients are checked against the directory as they come (policy in L{mailserver.policy.relay});
the body is collected in a L{MessageBody}; C{commit} stores one copy per account, each with its
own C{Return-Path:} and C{Delivered-To:}, and fires only when every copy is durable.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from zope.interface import implementer

from mailserver import log
from mailserver.interfaces import IDelivery, IDeliveryAgent, IDirectory, IMailStore
from mailserver.policy.relay import RcptVerdict, check_inbound_rcpt
from mailserver.queue.model import MailOptions, Notify
from mailserver.store.body import MessageBody


@implementer(IDelivery)
class LocalDelivery:
    """One message on its way into local mailboxes."""

    def __init__(
        self,
        directory: IDirectory,
        store: IMailStore,
        mail_from: str,
        message_id: str,
        spill_dir: Path | None,
        notify: Callable[[str], None] | None = None,
    ) -> None:
        self._directory = directory
        self._store = store
        self._notify = notify
        self._mail_from = mail_from
        self._message_id = message_id
        self._accounts: dict[str, None] = {}  # ordered set
        self._body = MessageBody(spill_dir)

    @property
    def size(self) -> int:
        return self._body.size

    def add_rcpt(
        self, address: str, notify: frozenset[Notify] | None = None, orcpt: str | None = None
    ) -> RcptVerdict:
        verdict, accounts = check_inbound_rcpt(self._directory, address)
        for account in accounts:
            self._accounts[account] = None
        return verdict

    def write(self, data: bytes) -> None:
        self._body.append(data)

    def commit(self, trace: bytes) -> Deferred[None]:
        return_path = b"Return-Path: <" + self._mail_from.encode("utf-8") + b">\r\n"
        targets = [
            (account, return_path + b"Delivered-To: " + account.encode("utf-8") + b"\r\n" + trace)
            for account in self._accounts
        ]
        d = self._store.deliver(targets, self._body)

        def delivered(names: list[str]) -> None:
            for (account, _), name in zip(targets, names, strict=True):
                log.delivered(self._message_id, account, name, self._body.size)
            self._body.close()
            if self._notify is not None:
                for account, _ in targets:
                    self._notify(account)

        def failed(f: Failure) -> Failure:
            self._body.close()
            return f

        return d.addCallbacks(delivered, failed)

    def abort(self) -> None:
        self._body.close()


@implementer(IDeliveryAgent)
class LocalDeliveryAgent:
    """Opens L{LocalDelivery} transactions on one directory and one store."""

    def __init__(
        self,
        directory: IDirectory,
        store: IMailStore,
        spill_dir: Path | None,
        notify: Callable[[str], None] | None = None,
    ) -> None:
        """
        @param notify: called with each account once a message is durably in its INBOX (the
            mailbox store tells the sessions watching it).
        """
        self._directory = directory
        self._store = store
        self._spill_dir = spill_dir
        self._notify = notify

    def begin(
        self, mail_from: str, message_id: str, options: MailOptions | None = None
    ) -> IDelivery:
        return LocalDelivery(
            self._directory, self._store, mail_from, message_id, self._spill_dir, self._notify
        )
