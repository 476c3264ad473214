# -*- test-case-name: tests.test_mailbox -*-
"""
The mailbox store as sessions (POP3, IMAP) see it, on the reactor thread.

L{MailboxStore} opens each user's L{MailIndex} on demand, runs every index operation in the
I/O thread pool, one at a time per user (so SQLite and the maildir see one writer per user,
and no pool thread ever waits on another's lock), and tells subscribed sessions when a folder
changes: a delivery, another session's flag change, expunge, append, copy or move. IMAP IDLE
listens to this; a session refreshes its view with L{Folder.look} (or L{Folder.refresh}).

The sessions that have the same folder open share one immutable L{FolderState} (the store keeps
the newest per (account, folder), weakly: it lives as long as a session holds it). A look
builds the next one from the previous one and what changed after its HIGHESTMODSEQ (an index
lookup by MODSEQ), so its cost follows the changes, not the size of the folder.
"""

from __future__ import annotations

import bisect
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import BinaryIO, TypeVar

from twisted.internet.defer import Deferred, DeferredLock, fail
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from mailserver import log
from mailserver.store.index import (
    INBOX,
    Changes,
    FlagChange,
    FolderError,
    FolderInfo,
    FolderState,
    MailIndex,
    MessageInfo,
    StoreMode,
    check_folder_name,
    folder_directory,
)
from mailserver.store.maildir import mailbox_path

_T = TypeVar("_T")

Listener = Callable[[], None]

Look = tuple[FolderState, Changes | None, int]
"""What a look at a folder gives: the shared state now, the changes from the looker's previous
state (None: not comparable, as after a new UIDVALIDITY), the first UID claimed as recent."""


class MailboxStore:
    """
    Every user's mailboxes under C{root} (C{<root>/<domain>/<local>/}).

    @param max_open: indexes kept open (least recently used ones beyond it are closed).
    """

    def __init__(
        self,
        root: Path,
        reactor: IReactorFromThreads,
        pool: ThreadPool,
        max_open: int = 256,
    ) -> None:
        self.root = root
        self._reactor = reactor
        self._pool = pool
        self._max_open = max_open
        self._locks: dict[str, DeferredLock] = {}
        self._open: OrderedDict[str, MailIndex] = OrderedDict()
        self._open_lock = threading.Lock()
        self._busy: set[str] = set()
        self._listeners: dict[tuple[str, str], list[Listener]] = {}
        self._snapshots: weakref.WeakValueDictionary[tuple[str, str], FolderState] = (
            weakref.WeakValueDictionary()
        )
        """The newest state of each open folder, shared by the views on it (reactor thread)."""

    # -- running index operations ----------------------------------------------------------

    def run(self, account: str, operation: Callable[[MailIndex], _T]) -> Deferred[_T]:
        """
        Run C{operation(index)} on C{account}'s index in the I/O pool, after every operation
        on that account asked for before it.
        """
        return self._serially(account, lambda: self._in_pool(account, operation))

    def _in_pool(self, account: str, operation: Callable[[MailIndex], _T]) -> Deferred[_T]:
        result: Deferred[_T] = deferToThreadPool(
            self._reactor, self._pool, self._call, account, operation
        )
        return result

    def _serially(self, account: str, start: Callable[[], Deferred[_T]]) -> Deferred[_T]:
        """Call C{start()} (on the reactor thread) once C{account}'s earlier operations are done,
        and hold the account until its Deferred fires."""
        lock = self._locks.get(account)
        if lock is None:
            lock = self._locks[account] = DeferredLock()
        d: Deferred[_T] = lock.run(start)

        def forget_lock(result: object) -> object:
            if not lock.locked and not lock.waiting and self._locks.get(account) is lock:
                del self._locks[account]
            return result

        d.addBoth(forget_lock)
        return d

    def _call(self, account: str, operation: Callable[[MailIndex], _T]) -> _T:
        with self._open_lock:
            index = self._open.pop(account, None)
            self._busy.add(account)
        try:
            if index is None:
                index = MailIndex(mailbox_path(self.root, account))
            return operation(index)
        finally:
            evict: list[MailIndex] = []
            with self._open_lock:
                self._busy.discard(account)
                if index is not None:
                    self._open[account] = index
                while len(self._open) > self._max_open:
                    oldest = next(iter(self._open))
                    if oldest in self._busy:
                        break
                    evict.append(self._open.pop(oldest))
            for idle in evict:
                idle.close()

    def close(self) -> None:
        """Close every open index (at shutdown, after the sessions are gone)."""
        with self._open_lock:
            indexes = list(self._open.values())
            self._open.clear()
        for index in indexes:
            index.close()

    # -- change notification ---------------------------------------------------------------

    def subscribe(self, account: str, folder: str, listener: Listener) -> Callable[[], None]:
        """
        Call C{listener()} (on the reactor thread) whenever folder C{folder} of C{account}
        changes by someone else's hand. Returns the function that unsubscribes.
        """
        key = (account, check_folder_name(folder))
        self._listeners.setdefault(key, []).append(listener)

        def unsubscribe() -> None:
            listeners = self._listeners.get(key)
            if listeners is not None and listener in listeners:
                listeners.remove(listener)
                if not listeners:
                    del self._listeners[key]

        return unsubscribe

    def changed(self, account: str, folder: str, origin: Listener | None = None) -> None:
        """Folder C{folder} of C{account} changed: tell every listener but C{origin}."""
        for listener in list(self._listeners.get((account, folder), ())):
            if listener is origin:
                continue
            try:
                listener()
            except Exception:
                log.internal_error("-", "-", "mailbox listener", Failure())

    def delivered(self, account: str) -> None:
        """A message was delivered into the INBOX of C{account}."""
        if (account, INBOX) in self._listeners:
            self.changed(account, INBOX)

    # -- the API sessions use --------------------------------------------------------------

    def folders(self, account: str) -> Deferred[list[FolderInfo]]:
        return self.run(account, lambda index: index.folders())

    def open_folder(
        self,
        account: str,
        name: str = INBOX,
        listener: Listener | None = None,
        claim_recent: bool = False,
    ) -> Deferred[Folder]:
        """
        Look at folder C{name} of C{account} (new mail picked up, UIDs assigned) and return a
        L{Folder} view of it; with C{listener}, also subscribe it to changes. With
        C{claim_recent} (an IMAP read-write SELECT), the new messages become recent for this
        view (L{Folder.recent_from}).
        """
        name = check_folder_name(name)
        # Subscribe before looking, so that no change between the look and the subscription
        # goes unannounced.
        unsubscribe = self.subscribe(account, name, listener) if listener is not None else None

        def opened(result: Look) -> Folder:
            folder = Folder(self, account, result[0], listener, unsubscribe)
            folder.recent_from = result[2]
            return folder

        def failed(f: Failure) -> Failure:
            if unsubscribe is not None:
                unsubscribe()
            return f

        return self.look(account, name, claim_recent, None).addCallbacks(opened, failed)

    def look(
        self, account: str, name: str, claim_recent: bool, seen: FolderState | None
    ) -> Deferred[Look]:
        """
        Pick up new mail in folder C{name} and return its state, the one shared by every view
        on it, with the changes from C{seen} (what the caller saw last) to it. With
        C{claim_recent}, claim the new messages as recent (L{MailIndex.claim_recent}).
        """
        key = (account, check_folder_name(name))

        def start() -> Deferred[Look]:
            base = self._snapshots.get(key, seen)
            d = self._in_pool(account, lambda index: _look(index, key[1], claim_recent, base, seen))
            return d.addCallback(remember)

        def remember(result: Look) -> Look:
            # Before the account's next operation starts (L{_serially}): it builds on this one.
            self._snapshots[key] = result[0]
            return result

        return self._serially(account, start)

    def create_folder(self, account: str, name: str, special_use: str = "") -> Deferred[None]:
        return self.run(account, lambda index: index.create_folder(name, special_use))

    def delete_folder(self, account: str, name: str) -> Deferred[None]:
        return self.run(account, lambda index: index.delete_folder(name))

    def rename_folder(self, account: str, old: str, new: str) -> Deferred[None]:
        return self.run(account, lambda index: index.rename_folder(old, new))

    def set_subscribed(self, account: str, name: str, subscribed: bool) -> Deferred[None]:
        return self.run(account, lambda index: index.set_subscribed(name, subscribed))

    def status(self, account: str, name: str) -> Deferred[tuple[int, int, int, int, int]]:
        """(messages, octets, uidvalidity, uidnext, highestmodseq) after picking up new mail."""

        def look(index: MailIndex) -> tuple[int, int, int, int, int]:
            index.sync(name)
            return index.status(name)

        return self.run(account, look)

    def append(
        self,
        account: str,
        name: str,
        write: Callable[[BinaryIO], object],
        flags: Iterable[str] = (),
        internaldate: float | None = None,
    ) -> Deferred[tuple[int, MessageInfo]]:
        """Add a message durably; fires with (UIDVALIDITY, the message) once it is on disk."""

        try:
            folder = check_folder_name(name)
        except FolderError as e:
            return fail(e)

        def add(index: MailIndex) -> tuple[int, MessageInfo]:
            info = index.append(folder, write, flags, internaldate)
            return index.uidvalidity(folder), info

        d = self.run(account, add)
        return d.addCallback(self._notify_then(account, folder, None))

    def _notify_then(
        self, account: str, folder: str, origin: Listener | None
    ) -> Callable[[_T], _T]:
        def notify(result: _T) -> _T:
            self.changed(account, folder, origin)
            return result

        return notify


class Folder:
    """
    One session's view of one folder: the state as of its last look (C{state}), and the
    operations that change the folder. Every change is durable when its Deferred fires, and
    other sessions on the folder are told of it.
    """

    def __init__(
        self,
        store: MailboxStore,
        account: str,
        state: FolderState,
        listener: Listener | None = None,
        unsubscribe: Callable[[], None] | None = None,
    ) -> None:
        self.store = store
        self.account = account
        self.name = state.name
        self.state = state
        """The folder's state as of the last look: shared with the other views on it."""
        self._cur: str | None = None
        self.recent_from = 0
        """After a look that claimed recent messages: the lowest UID claimed (0: none)."""
        self._listener = listener
        self._unsubscribe = unsubscribe
        if listener is not None and unsubscribe is None:
            self._unsubscribe = store.subscribe(account, self.name, listener)

    @property
    def messages(self) -> Sequence[MessageInfo]:
        return self.state.messages

    def path(self, uid: int) -> str:
        """
        The file of message C{uid} as of the last look (a string: cheaper than a Path).

        @raise KeyError: the last look did not see C{uid}.
        """
        state = self.state
        i = bisect.bisect_left(state.uids, uid)
        if i == len(state.uids) or state.uids[i] != uid:
            raise KeyError(uid)
        if self._cur is None:
            root = mailbox_path(self.store.root, self.account)
            self._cur = os.fspath(folder_directory(root, self.name) / "cur") + os.sep
        return self._cur + state.messages[i].filename

    def close(self) -> None:
        """Stop listening to changes."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

    def _run(self, operation: Callable[[MailIndex], _T], notify: bool = True) -> Deferred[_T]:
        d = self.store.run(self.account, operation)
        if notify:
            d.addCallback(self.store._notify_then(self.account, self.name, self._listener))
        return d

    def look(self, claim_recent: bool = False) -> Deferred[tuple[FolderState, Changes | None]]:
        """
        Look again (pick up new mail, see others' changes); C{state} is the new state. With
        C{claim_recent}, messages no session has seen yet become recent for this view: those
        with a UID at or above L{recent_from}.

        @return: (the new state, the changes from the previous one to it, or None when they
            cannot be compared: the folder has another UIDVALIDITY now).
        """

        def update(result: Look) -> tuple[FolderState, Changes | None]:
            state, changes, first = result
            self.state = state
            self.recent_from = first
            return state, changes

        d = self.store.look(self.account, self.name, claim_recent, self.state)
        return d.addCallback(update)

    def refresh(self, claim_recent: bool = False) -> Deferred[FolderState]:
        """L{look}, for callers that need only the new state."""
        return self.look(claim_recent).addCallback(lambda result: result[0])

    def changes_since(self, modseq: int) -> Deferred[Changes]:
        name = self.name
        return self.store.run(self.account, lambda index: index.changes_since(name, modseq))

    def store_flags(
        self,
        uids: Iterable[int],
        flags: Iterable[str],
        mode: StoreMode,
        unchanged_since: int | None = None,
    ) -> Deferred[tuple[list[FlagChange], list[int]]]:
        name = self.name
        uid_list = list(uids)
        flag_list = list(flags)
        return self._run(
            lambda index: index.store_flags(name, uid_list, flag_list, mode, unchanged_since)
        )

    def expunge(self, uids: Iterable[int]) -> Deferred[list[int]]:
        """Remove messages C{uids}: all of them or none, durably."""
        name = self.name
        uid_list = list(uids)
        return self._run(lambda index: index.expunge(name, uid_list))

    def copy(self, uids: Iterable[int], target: str) -> Deferred[tuple[int, list[tuple[int, int]]]]:
        """Copy into C{target}; fires with (target's UIDVALIDITY, (old UID, new UID) pairs)."""
        return self._transfer(uids, target, move=False)

    def move(self, uids: Iterable[int], target: str) -> Deferred[tuple[int, list[tuple[int, int]]]]:
        return self._transfer(uids, target, move=True)

    def _transfer(
        self, uids: Iterable[int], target: str, move: bool
    ) -> Deferred[tuple[int, list[tuple[int, int]]]]:
        name = self.name
        uid_list = list(uids)
        target = check_folder_name(target)

        def transfer(index: MailIndex) -> tuple[int, list[tuple[int, int]]]:
            pairs = index.copy(name, uid_list, target, move=move)
            return index.uidvalidity(target), pairs

        d = self._run(transfer, notify=move)
        return d.addCallback(self.store._notify_then(self.account, target, None))


def _look(
    index: MailIndex,
    name: str,
    claim_recent: bool,
    base: FolderState | None,
    seen: FolderState | None,
) -> Look:
    """
    In the pool: pick up new mail, claim recent messages if asked, and build the folder's
    state from C{base} (the newest shared one); the changes are those from C{seen}.
    """
    index.sync(name)
    first = index.claim_recent(name) if claim_recent else 0
    state, changes = index.state_since(name, base)
    if seen is None or seen is base:
        return state, changes if seen is not None else None, first
    if seen is state:
        return state, Changes(state.highestmodseq, (), ()), first
    if seen.uidvalidity != state.uidvalidity or seen.highestmodseq > state.highestmodseq:
        return state, None, first
    return state, index.changes_since(name, seen.highestmodseq), first
