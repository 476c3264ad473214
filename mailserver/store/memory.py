# -*- test-case-name: tests.test_maildir -*-
"""L{MemoryStore}: the in-memory twin of L{MaildirStore}, for tests."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from mailserver.interfaces import IMailStore
from mailserver.store.body import MessageBody


@implementer(IMailStore)
class MemoryStore:
    """
    Messages kept in a dict: C{messages[account]} is the list of stored messages (bytes).

    @ivar fail_with: when set, every delivery fails with this exception (to test error paths).
    """

    def __init__(self) -> None:
        self.messages: dict[str, list[bytes]] = {}
        self.fail_with: Exception | None = None
        self._counter = itertools.count(1)

    def deliver(
        self, targets: Sequence[tuple[str, bytes]], body: MessageBody
    ) -> Deferred[list[str]]:
        if self.fail_with is not None:
            return fail(self.fail_with)
        content = body.read()
        names = []
        for account, prefix in targets:
            self.messages.setdefault(account, []).append(prefix + content)
            names.append(f"m{next(self._counter)}")
        return succeed(names)
