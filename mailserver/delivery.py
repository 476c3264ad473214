# -*- test-case-name: tests.test_delivery -*-
"""
Message transactions: the L{IDeliveryAgent}s of the inbound listener (L{LocalDeliveryAgent}:
local mailboxes only) and of submission (L{SubmissionAgent}: local mailboxes, and the outbound
queue for everyone else); and L{NoticeRouter}, which sends the queue's delivery status notices
the same way.

Recipients are checked against the directory as they come (policy in L{mailserver.policy.relay});
the body is collected in a L{MessageBody}; C{commit} stores one copy per account, each with its
own C{Return-Path:} and C{Delivered-To:}, queues one entry for the remote recipients, and fires
only when all of it is durable.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable
from pathlib import Path

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from zope.interface import implementer

from mailserver import log
from mailserver.interfaces import IDelivery, IDeliveryAgent, IDirectory, IMailStore, IQueue
from mailserver.policy.relay import RcptVerdict, check_inbound_rcpt, check_submission_rcpt
from mailserver.queue import dsn
from mailserver.queue.model import MailOptions, Notify, QueuedRecipient, Submission
from mailserver.store.body import MessageBody


def _deliver_locally(
    store: IMailStore,
    mail_from: str,
    message_id: str,
    accounts: Iterable[str],
    trace: bytes,
    body: MessageBody,
) -> Deferred[list[str]]:
    """
    Store one copy of C{body} per account, each with its own C{Return-Path:} and
    C{Delivered-To:} above C{trace}; fires with the accounts once every copy is durable.
    """
    return_path = b"Return-Path: <" + mail_from.encode("utf-8") + b">\r\n"
    targets = [
        (account, return_path + b"Delivered-To: " + account.encode("utf-8") + b"\r\n" + trace)
        for account in accounts
    ]
    if not targets:
        return succeed([])

    def delivered(names: list[str]) -> list[str]:
        for (account, _), name in zip(targets, names, strict=True):
            log.delivered(message_id, account, name, body.size)
        return [account for account, _ in targets]

    return store.deliver(targets, body).addCallback(delivered)


_NOTICE_HEADER_READ = 1024 * 1024
"""A "delivered" notice returns the headers of messages up to this size (none beyond)."""


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
        d = _deliver_locally(
            self._store, self._mail_from, self._message_id, self._accounts, trace, self._body
        )

        def delivered(accounts: list[str]) -> None:
            self._body.close()
            if self._notify is not None:
                for account in accounts:
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


@implementer(IDelivery)
class SubmissionDelivery:
    """
    One message from an authenticated user: local recipients get it in their mailboxes at
    once, the others through one entry in the outbound queue; the C{250} waits for both.
    """

    def __init__(
        self,
        agent: SubmissionAgent,
        mail_from: str,
        message_id: str,
        options: MailOptions,
    ) -> None:
        self._agent = agent
        self._mail_from = mail_from
        self._message_id = message_id
        self._options = options
        self._accounts: dict[str, None] = {}  # ordered set
        self._remote: dict[str, QueuedRecipient] = {}
        self._success: dict[str, QueuedRecipient] = {}  # local, NOTIFY=SUCCESS
        self._body = MessageBody(agent.spill_dir)

    @property
    def size(self) -> int:
        return self._body.size

    def add_rcpt(
        self, address: str, notify: frozenset[Notify] | None = None, orcpt: str | None = None
    ) -> RcptVerdict:
        verdict, accounts = check_submission_rcpt(self._agent.directory, address)
        if verdict is not RcptVerdict.ACCEPT:
            return verdict
        if accounts:
            for account in accounts:
                self._accounts[account] = None
            if notify is not None and "SUCCESS" in notify and self._mail_from:
                self._success[address] = QueuedRecipient(address, notify, orcpt)
        elif address not in self._remote:
            self._remote[address] = QueuedRecipient(address, notify, orcpt)
        return verdict

    def write(self, data: bytes) -> None:
        self._body.append(data)

    def commit(self, trace: bytes) -> Deferred[None]:
        agent = self._agent
        local = _deliver_locally(
            agent.store, self._mail_from, self._message_id, self._accounts, trace, self._body
        )
        work: list[Deferred[object]] = [local]  # type: ignore[list-item]
        if self._remote:
            options = self._options
            submission = Submission(
                queue_id=self._message_id,
                sender=self._mail_from,
                recipients=tuple(self._remote.values()),
                received=agent.clock.seconds(),
                envid=options.envid,
                ret=options.ret,
                smtputf8=options.smtputf8,
                eight_bit=options.eight_bit,
            )
            work.append(agent.queue.submit(submission, trace, self._body))  # type: ignore[arg-type]
        done: Deferred[None] = Deferred()

        def finished(results: list[tuple[bool, object]]) -> None:
            self._body.close()
            failures = [r for ok, r in results if not ok]
            if failures:
                failure = failures[0]
                assert isinstance(failure, Failure)
                done.errback(failure)
                return
            if agent.notify is not None:
                for account in self._accounts:
                    agent.notify(account)
            if delivered_notice is not None:
                self._send_notice(delivered_notice)
            done.callback(None)

        # Composed now, while the body is at hand; sent once the 250 is due.
        delivered_notice = self._delivered_notice() if self._success else None
        DeferredList(work, consumeErrors=True).addCallback(finished)
        return done

    def _delivered_notice(self) -> bytes:
        """The RFC 3464 "delivered" notice for the local recipients that asked for one."""
        agent = self._agent
        head = self._body.read() if self._body.size <= _NOTICE_HEADER_READ else b""
        options = self._options
        original = dsn.Original(
            queue_id=self._message_id,
            sender=self._mail_from,
            received=agent.clock.seconds(),
            envid=options.envid,
            ret=options.ret,
            smtputf8=options.smtputf8,
        )
        reports = [
            dsn.Report(r.address, "delivered", "2.0.0", orcpt=r.orcpt)
            for r in self._success.values()
        ]
        return dsn.compose(
            "delivered",
            original,
            reports,
            dsn.header_section(head),
            None,
            hostname=agent.hostname,
            notice_id=self._notice_id(),
            now=agent.clock.seconds(),
        )

    def _notice_id(self) -> str:
        return f"{self._message_id}.d{secrets.token_hex(3)}"

    def _send_notice(self, notice: bytes) -> None:
        send = self._agent.notices
        if send is None:
            return
        notice_id = self._notice_id()
        d = send(notice_id, self._mail_from, notice)
        d.addCallbacks(
            lambda _: log.notice_sent(self._message_id, "delivered", self._mail_from, notice_id),
            lambda f: log.queue_error(f, self._message_id, "delivered notice"),
        )

    def abort(self) -> None:
        self._body.close()


@implementer(IDeliveryAgent)
class SubmissionAgent:
    """Opens L{SubmissionDelivery} transactions (the submission listeners' agent)."""

    def __init__(
        self,
        directory: IDirectory,
        store: IMailStore,
        queue: IQueue,
        clock: IReactorTime,
        spill_dir: Path | None,
        notify: Callable[[str], None] | None = None,
        notices: Callable[[str, str, bytes], Deferred[None]] | None = None,
        hostname: str = "localhost",
    ) -> None:
        """
        @param notify: told each account that got a message (IMAP IDLE).
        @param notices: sends a delivery status notice C{(notice_id, recipient, message)}
            (L{NoticeRouter.send}): the "delivered" notices of NOTIFY=SUCCESS.
        @param hostname: our name in notices.
        """
        self.directory = directory
        self.store = store
        self.queue = queue
        self.clock = clock
        self.spill_dir = spill_dir
        self.notify = notify
        self.notices = notices
        self.hostname = hostname

    def begin(
        self, mail_from: str, message_id: str, options: MailOptions | None = None
    ) -> IDelivery:
        return SubmissionDelivery(
            self, mail_from, message_id, options if options is not None else MailOptions()
        )


class NoticeRouter:
    """
    Sends the queue's delivery status notices (sender C{<>}): into the mailbox when the
    recipient is local, else through the queue like any other message (never notified on
    itself: its sender is C{<>}).
    """

    def __init__(
        self,
        directory: IDirectory,
        store: IMailStore,
        queue: Callable[[], IQueue],
        clock: IReactorTime,
        spill_dir: Path | None,
        notify: Callable[[str], None] | None = None,
    ) -> None:
        """
        @param queue: returns the queue (built after this router, which it needs).
        """
        self._directory = directory
        self._store = store
        self._queue = queue
        self._clock = clock
        self._spill_dir = spill_dir
        self._notify = notify

    def send(self, notice_id: str, recipient: str, message: bytes) -> Deferred[None]:
        """Deliver notice C{message} to C{recipient}; fires once it is durable somewhere."""
        body = MessageBody(self._spill_dir)
        body.append(message)
        domain = recipient.rpartition("@")[2].lower()
        if self._directory.is_local_domain(domain):
            accounts = self._directory.resolve(recipient)
            if not accounts:
                body.close()
                log.notice_undeliverable(notice_id, recipient)
                return succeed(None)
            d = _deliver_locally(self._store, "", notice_id, accounts, b"", body)

            def stored(accounts: list[str]) -> None:
                body.close()
                if self._notify is not None:
                    for account in accounts:
                        self._notify(account)

            def failed(f: Failure) -> Failure:
                body.close()
                return f

            return d.addCallbacks(stored, failed)
        submission = Submission(
            queue_id=notice_id,
            sender="",
            recipients=(QueuedRecipient(recipient, frozenset({"NEVER"})),),
            received=self._clock.seconds(),
        )
        d2 = self._queue().submit(submission, b"", body)

        def done(result: None) -> None:
            body.close()
            return result

        def not_queued(f: Failure) -> Failure:
            body.close()
            return f

        return d2.addCallbacks(done, not_queued)
