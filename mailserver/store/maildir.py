# -*- test-case-name: tests.test_maildir -*-
"""
Durable delivery into maildirs (DESIGN.md §3).

Layout: C{<data_dir>/mail/<domain>/<local>/} is a Maildir++ whose root (C{cur/ new/ tmp/}) is
the INBOX. A delivery writes C{tmp/<unique>}, fsyncs it, renames it into C{new/} and fsyncs
C{new/}; only then does its Deferred fire, so the SMTP C{250} never precedes durability.
Concurrent deliveries to one maildir share the fsync of C{new/} (L{DirectorySync}). The
file names are unique (time, microseconds, pid, a per-process counter and random bits, as
Dovecot's) and carry the size (C{,S=}) so that readers need no C{stat}.
"""

from __future__ import annotations

import itertools
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from mailserver.interfaces import IMailStore
from mailserver.store.body import MessageBody
from mailserver.store.durable import (
    DirectorySync,
    make_dirs_durably,
    write_new_file,
)

_SAFE_DOMAIN = re.compile(r"[a-z0-9]([a-z0-9.-]*[a-z0-9])?")
_UNSAFE_LOCAL = re.compile(r"[/\x00-\x1f\x7f]")


class UnsafeMailboxName(ValueError):
    """An account name that cannot be a directory name (path traversal, control characters)."""


def mailbox_path(root: Path, account: str) -> Path:
    """
    The maildir of C{account} (C{local@domain}) under C{root}.

    @raise UnsafeMailboxName: the name could escape C{root} or is not a plain name.
    """
    local, at, domain = account.rpartition("@")
    if not at or not _SAFE_DOMAIN.fullmatch(domain) or ".." in domain:
        raise UnsafeMailboxName(account)
    if not local or local.startswith(".") or _UNSAFE_LOCAL.search(local):
        raise UnsafeMailboxName(account)
    return root / domain / local


class NameGenerator:
    """Unique maildir base names: C{<sec>.M<usec>P<pid>Q<n>R<rand>.<host>}."""

    def __init__(self) -> None:
        self._counter = itertools.count(1)
        self._host = socket.gethostname().replace("/", "\\057").replace(":", "\\072")
        self._pid = os.getpid()

    def __call__(self) -> str:
        now = time.time()
        sec = int(now)
        usec = int((now - sec) * 1_000_000)
        return (
            f"{sec}.M{usec}P{self._pid}Q{next(self._counter)}R{secrets.token_hex(4)}.{self._host}"
        )


unique_name = NameGenerator()
"""Unique maildir base names for this process (deliveries, APPEND, copies)."""


@implementer(IMailStore)
class MaildirStore:
    """
    Maildirs under C{root}, written by the threads of C{pool}.

    @param reactor: to return results to the reactor thread.
    @param pool: the bounded I/O thread pool; the reactor thread never fsyncs.
    """

    def __init__(self, root: Path, reactor: IReactorFromThreads, pool: ThreadPool) -> None:
        self.root = root
        self._reactor = reactor
        self._pool = pool
        self._names = unique_name
        self._ready: set[Path] = set()
        self._ready_lock = threading.Lock()
        self._dir_sync = DirectorySync()
        self._paths: dict[str, Path] = {}  # account -> maildir, checked once

    def deliver(
        self, targets: Sequence[tuple[str, bytes]], body: MessageBody
    ) -> Deferred[list[str]]:
        try:
            paths = [(self._path(account), prefix) for account, prefix in targets]
        except UnsafeMailboxName as e:
            return fail(e)
        result: Deferred[list[str]] = deferToThreadPool(
            self._reactor, self._pool, self._deliver_all, paths, body
        )
        return result

    def _path(self, account: str) -> Path:
        path = self._paths.get(account)
        if path is None:
            path = mailbox_path(self.root, account)
            if len(self._paths) >= 10_000:
                self._paths.clear()
            self._paths[account] = path
        return path

    def _deliver_all(self, paths: list[tuple[Path, bytes]], body: MessageBody) -> list[str]:
        names: list[str] = []
        for maildir, prefix in paths:
            names.append(self.deliver_sync(maildir, prefix, body))
        return names

    def deliver_sync(self, maildir: Path, prefix: bytes, body: MessageBody) -> str:
        """
        Store one message into the INBOX of C{maildir}, durably; blocking.

        @return: the name of the file in C{new/}.
        """
        self._ensure_maildir(maildir)
        base = self._names()
        new_dir = maildir / "new"

        def write(f: BinaryIO) -> None:
            f.write(prefix)
            body.write_to(f)

        tmp = maildir / "tmp" / base
        size = write_new_file(tmp, write)
        name = f"{base},S={size},W={size}"
        try:
            os.rename(tmp, new_dir / name)
        except BaseException:
            os.unlink(tmp)
            raise
        self._dir_sync.changed(new_dir)
        return name

    def _ensure_maildir(self, maildir: Path) -> None:
        if maildir in self._ready:
            return
        for sub in ("cur", "new", "tmp"):
            make_dirs_durably(maildir / sub)
        with self._ready_lock:
            self._ready.add(maildir)
