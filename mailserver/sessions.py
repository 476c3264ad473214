# -*- test-case-name: tests.e2e.test_process -*-
"""
The open sessions of every listener, for a graceful stop (SMTP, POP3, IMAP).
"""

from __future__ import annotations

from typing import Protocol

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IReactorTime

from mailserver import log


class TrackedSession(Protocol):
    """What a graceful stop needs of a session."""

    @property
    def in_transaction(self) -> bool:
        """Whether it is in the middle of something that must finish (a message being received
        or stored, deletions being made)."""
        ...

    def shutdown(self) -> Deferred[None]:
        """Close once idle; fires when the connection has closed."""
        ...

    def abort_now(self) -> None:
        """Close at once (the grace time is over)."""
        ...


class SessionTracker:
    """The open sessions of all listeners, for a graceful stop."""

    def __init__(self) -> None:
        self.sessions: set[TrackedSession] = set()

    def drain(self, clock: IReactorTime, grace: float) -> Deferred[None]:
        """
        Stop every session: idle ones at once with C{421}, those receiving or committing a
        message once it is done, or after C{grace} seconds at the latest. Fires when every
        session's connection is closed (so the replies have left).
        """
        sessions = list(self.sessions)
        log.stopping(sum(1 for s in sessions if s.in_transaction))
        waits = [s.shutdown() for s in sessions]
        if all(d.called for d in waits):
            return succeed(None)
        done: Deferred[None] = DeferredList(waits, consumeErrors=True).addCallback(lambda _: None)
        timer = clock.callLater(grace, done.cancel)

        def finish(result: object) -> None:
            if timer.active():
                timer.cancel()
            for s in list(self.sessions):
                s.abort_now()

        done.addBoth(finish)
        return done
