# -*- test-case-name: tests.e2e.test_smtp_e2e -*-
"""
The composition root: L{build} turns a L{Config} into the running service tree. The only module
that imports every layer and the only one that constructs listeners.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, cast

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IReactorTime
from twisted.internet.protocol import Factory
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from typing_extensions import override

from mailserver import log
from mailserver.auth import Authenticator
from mailserver.config import Config, ListenerConfig
from mailserver.delivery import LocalDeliveryAgent, NoticeRouter, SubmissionAgent
from mailserver.directory import SQLiteDirectory, open_directory
from mailserver.dns import Resolver
from mailserver.imap.server import IMAPFactory, IMAPSettings
from mailserver.iopool import IOPool
from mailserver.limits import AuthThrottle, ConnectionLimiter
from mailserver.pop3.server import MailboxLocks, OpenMailbox, POP3Factory, POP3Settings
from mailserver.queue.delivery import Outbound
from mailserver.queue.service import QueueService
from mailserver.sessions import SessionTracker
from mailserver.smtp.server import SMTPFactory, SMTPSettings
from mailserver.store.durable import atomic_write, make_dirs_durably
from mailserver.store.mailbox import MailboxStore
from mailserver.store.maildir import MaildirStore
from mailserver.tls import ServerTLS, server_tls_from_config


class ListenerService(Service):
    """
    One listening socket from an endpoint string. It binds in C{privilegedStartService} (before
    twistd drops privileges) and a failure to bind aborts start-up instead of being logged.
    """

    def __init__(self, config: ListenerConfig, factory: Factory, reactor: Any) -> None:
        self.config = config
        self.factory = factory
        self._reactor = reactor
        self.port: IListeningPort | None = None

    @override
    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._bind()

    @override
    def startService(self) -> None:
        super().startService()
        self._bind()

    def _bind(self) -> None:
        if self.port is not None:
            return
        endpoint = serverFromString(self._reactor, self.config.endpoint)
        results: list[Any] = []
        endpoint.listen(self.factory).addBoth(results.append)
        if not results:
            raise RuntimeError(f"{self.config.endpoint}: endpoint did not listen at once")
        if isinstance(results[0], Failure):
            results[0].raiseException()
        self.port = results[0]
        log.listening(self.config.kind, self.config.endpoint, self.config.tls)

    @override
    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        port, self.port = self.port, None
        if port is None:
            return None
        d: Deferred[None] = Deferred.fromCoroutine(_stop_listening(port))
        return d


async def _stop_listening(port: IListeningPort) -> None:
    await maybeDeferred(port.stopListening)


class MailService(MultiService):
    """
    The root service: the I/O thread pool, the directory, and the listeners as children.

    Stopping it stops the listeners first, then lets sessions that are receiving a message
    finish (at most C{grace} seconds), and only then stops the thread pool that their delivery
    needs.
    """

    def __init__(
        self,
        clock: IReactorTime,
        pool: ThreadPool,
        directory: SQLiteDirectory,
        tracker: SessionTracker,
        grace: float,
        tls: ServerTLS | None,
        mailboxes: MailboxStore,
        queue: QueueService,
        outbound: Outbound,
    ) -> None:
        super().__init__()
        self.queue = queue
        self.outbound = outbound
        self._clock = clock
        self.pool = pool
        self.directory = directory
        self.mailboxes = mailboxes
        self.tracker = tracker
        self._grace = grace
        self.tls = tls

    @override
    def startService(self) -> None:
        self.pool.start()
        self.queue.startService()
        super().startService()

    @override
    def stopService(self) -> Deferred[None]:
        if not self.running:
            return succeed(None)
        d: Deferred[Any] = Deferred.fromCoroutine(self._stop())
        return d

    async def _stop(self) -> None:
        try:
            await super().stopService()
            await self.tracker.drain(self._clock, self._grace)
            # After the sessions: a message they finish is still queued (and kept).
            await self.queue.stopService()
            await self.outbound.close_idle()
        finally:
            self.pool.stop()
            self.mailboxes.close()
            self.directory.close()

    def listener(self, kind: str, index: int = 0) -> ListenerService:
        """The C{index}th listener of C{kind} (tests read its C{port})."""
        found = [s for s in self if isinstance(s, ListenerService) and s.config.kind == kind]
        return found[index]

    def reload_tls(self) -> None:
        """Load the certificate files again (SIGHUP); on failure keep the old ones and log."""
        if self.tls is None:
            return
        try:
            self.tls.reload()
        except Exception:
            log.tls_reload_failed(Failure())


def build(config: Config, reactor: Any) -> MailService:
    """
    Build the whole server from C{config}.

    Blocking work done here, once, before the reactor runs: create the data directories, open
    the directory database, create the first account on a fresh install, load or make the TLS
    certificate.

    @param reactor: provides C{IReactorTCP}, C{IReactorTime}, C{IReactorFromThreads}.
    """
    server = config.server
    data_dir = server.data_dir
    for sub in ("mail", "db", "tmp"):
        make_dirs_durably(data_dir / sub)
    directory = open_directory(data_dir, server.domain)
    if server.domain:
        _bootstrap(directory, server.domain, data_dir)

    tls: ServerTLS | None = None
    if any(listener.tls != "none" for listener in config.listeners):
        tls = server_tls_from_config(config.tls, server)

    pool = IOPool(server.io_threads, "mailserver-io")
    limits = config.limits
    store = MaildirStore(data_dir / "mail", reactor, pool)
    mailboxes = MailboxStore(data_dir / "mail", reactor, pool)
    agent = LocalDeliveryAgent(directory, store, data_dir / "tmp", notify=mailboxes.delivered)
    limiter = ConnectionLimiter(limits.connections, limits.connections_per_ip)
    throttle = AuthThrottle(
        reactor,
        max_failures=limits.auth_failures,
        window=limits.auth_window,
        delay=limits.auth_failure_delay,
    )
    authenticator = Authenticator(directory, reactor, pool, throttle, server.domain)
    pop3_locks = MailboxLocks()
    tracker = SessionTracker()
    spill = data_dir / "tmp"
    resolver = Resolver(reactor, config.dns.nameservers, config.dns.timeout)
    outbound = Outbound(
        reactor, resolver, config.queue, server.hostname, config.routes, config.relay
    )
    queue: QueueService | None = None

    def the_queue() -> QueueService:
        assert queue is not None
        return queue

    notices = NoticeRouter(directory, store, the_queue, reactor, spill, notify=mailboxes.delivered)
    queue = QueueService(
        data_dir / "queue",
        config.queue,
        outbound,
        notices.send,
        server.hostname,
        reactor,
        pool,
        grace=server.shutdown_grace,
    )
    submission = SubmissionAgent(
        directory,
        store,
        queue,
        reactor,
        spill,
        notify=mailboxes.delivered,
        notices=notices.send,
        hostname=server.hostname,
    )
    root = MailService(
        reactor, pool, directory, tracker, server.shutdown_grace, tls, mailboxes, queue, outbound
    )

    for listener in config.listeners:
        starttls = tls if listener.tls == "starttls" else None
        factory: Any
        if listener.kind == "imap":
            factory = IMAPFactory(
                _imap_settings(config, listener),
                authenticator.authenticate,
                mailboxes,
                reactor,
                limiter,
                starttls,
                tracker,
            )
        elif listener.kind == "pop3":
            factory = POP3Factory(
                _pop3_settings(config, listener),
                authenticator.authenticate,
                cast("OpenMailbox", mailboxes.open_folder),  # a Folder is a MailboxView
                reactor,
                limiter,
                pop3_locks,
                starttls,
                tracker,
            )
        elif listener.kind == "submission":
            factory = SMTPFactory(
                _smtp_settings(config, listener),
                submission,
                reactor,
                limiter,
                tracker,
                starttls,
                auth=authenticator,
                may_send_as=directory.may_send_as,
            )
        else:
            settings = _smtp_settings(config, listener)
            factory = SMTPFactory(settings, agent, reactor, limiter, tracker, starttls)
        if listener.tls == "implicit":
            assert tls is not None
            factory = TLSMemoryBIOFactory(tls, False, factory)
        ListenerService(listener, factory, reactor).setServiceParent(root)
    return root


def _smtp_settings(config: Config, listener: ListenerConfig) -> SMTPSettings:
    limits = config.limits
    return SMTPSettings(
        hostname=config.server.hostname,
        tls_mode=listener.tls,
        max_line=limits.smtp_line_length,
        max_size=limits.message_size,
        max_recipients=limits.recipients,
        idle_timeout=limits.smtp_idle_timeout,
        max_errors=limits.smtp_errors,
        submission=listener.kind == "submission",
        allow_plaintext_auth=listener.allow_plaintext_auth,
    )


def _imap_settings(config: Config, listener: ListenerConfig) -> IMAPSettings:
    limits = config.limits
    return IMAPSettings(
        hostname=config.server.hostname,
        tls_mode=listener.tls,
        allow_plaintext_auth=listener.allow_plaintext_auth,
        max_line=limits.imap_line_length,
        max_literal=limits.message_size,
        idle_timeout=limits.imap_idle_timeout,
        max_errors=limits.imap_errors,
        spill_dir=config.server.data_dir / "tmp",
    )


def _pop3_settings(config: Config, listener: ListenerConfig) -> POP3Settings:
    limits = config.limits
    return POP3Settings(
        hostname=config.server.hostname,
        tls_mode=listener.tls,
        allow_plaintext_auth=listener.allow_plaintext_auth,
        max_line=limits.pop3_line_length,
        idle_timeout=limits.pop3_idle_timeout,
        max_errors=limits.pop3_errors,
    )


def _bootstrap(directory: SQLiteDirectory, domain: str, data_dir: Path) -> None:
    """On a fresh install, create the domain and its postmaster; show the password once."""
    password = directory.bootstrap(domain)
    if password is None:
        return
    path = data_dir / "initial-password"
    address = f"postmaster@{domain}"
    atomic_write(path, f"{address} {password}\n".encode(), mode=0o600)
    os.chmod(path, 0o600)
    log.initial_password(address, password, str(path))
