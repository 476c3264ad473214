"""
Tests for L{mailserver.store.mailbox}: index operations in a real thread pool, serialized per
account, and change notifications between sessions.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, cast

from twisted.internet import reactor as _reactor
from twisted.internet.defer import gatherResults
from twisted.internet.interfaces import IReactorFromThreads
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import TestCase

from mailserver.store.body import MessageBody
from mailserver.store.index import INBOX, FolderError, MailIndex
from mailserver.store.mailbox import MailboxStore
from mailserver.store.maildir import MaildirStore, mailbox_path

ALICE = "alice@example.org"
BOB = "bob@example.org"
SEEN = "\\Seen"
reactor = cast(IReactorFromThreads, _reactor)


def writer(data: bytes) -> Callable[[BinaryIO], object]:
    return lambda f: f.write(data)


class Recorder:
    """A listener that counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1


class MailboxStoreTestCase(TestCase):
    max_open = 256

    def setUp(self) -> None:
        self.root = Path(self.mktemp())
        self.pool = ThreadPool(minthreads=1, maxthreads=4, name="test-io")
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.store = MailboxStore(self.root, reactor, self.pool, max_open=self.max_open)
        self.addCleanup(self.store.close)
        self.maildir = MaildirStore(self.root, reactor, self.pool)

    async def deliver(self, account: str, text: bytes = b"Subject: hi\r\n\r\nhello\r\n") -> str:
        """Deliver with the real delivery code, then tell the store (as delivery.py does)."""
        body = MessageBody()
        body.append(text)
        (name,) = await self.maildir.deliver([(account, b"Delivered-To: x\r\n")], body)
        self.store.delivered(account)
        return name

    async def open_two_sessions(self) -> None:
        for _ in range(3):
            await self.deliver(ALICE)
        self.mine = Recorder()
        self.other = Recorder()
        self.f1 = await self.store.open_folder(ALICE, INBOX, self.mine)
        self.f2 = await self.store.open_folder(ALICE, INBOX, self.other)
        self.addCleanup(self.f1.close)
        self.addCleanup(self.f2.close)


class SerializationTests(MailboxStoreTestCase):
    async def test_concurrent_appends_get_consecutive_uids(self) -> None:
        """Many appends asked for at once get distinct, consecutive UIDs, in the order asked."""
        ds = [
            self.store.append(ALICE, INBOX, writer(b"Subject: %d\r\n\r\n" % i)) for i in range(20)
        ]
        results = await gatherResults(ds)
        self.assertEqual([info.uid for _, info in results], list(range(1, 21)))
        self.assertEqual(len({uidvalidity for uidvalidity, _ in results}), 1)
        count, _, _, uidnext, _ = await self.store.status(ALICE, INBOX)
        self.assertEqual((count, uidnext), (20, 21))
        self.assertEqual(self.store._locks, {})

    async def test_one_account_one_operation_at_a_time_in_order(self) -> None:
        """
        Operations on one account run one at a time, in the order they were asked for, although
        the pool has several threads.
        """
        lock = threading.Lock()
        active = 0
        overlaps: list[int] = []
        order: list[int] = []

        def operation(i: int) -> Callable[[MailIndex], int]:
            def run(index: MailIndex) -> int:
                nonlocal active
                with lock:
                    active += 1
                    overlaps.append(active)
                    order.append(i)
                time.sleep(0.005)
                with lock:
                    active -= 1
                return i

            return run

        results = await gatherResults([self.store.run(ALICE, operation(i)) for i in range(12)])
        self.assertEqual(results, list(range(12)))
        self.assertEqual(order, list(range(12)))
        self.assertEqual(set(overlaps), {1})

    async def test_accounts_do_not_wait_for_each_other(self) -> None:
        """An operation on one account runs while another account's is still running."""
        bob_ran = threading.Event()

        def wait_for_bob(index: MailIndex) -> bool:
            return bob_ran.wait(5)

        def bob(index: MailIndex) -> bool:
            bob_ran.set()
            return True

        results = await gatherResults(
            [self.store.run(ALICE, wait_for_bob), self.store.run(BOB, bob)]
        )
        self.assertEqual(results, [True, True])

    async def test_failure_reaches_caller_and_releases_account(self) -> None:
        """A failing operation fails its Deferred; later operations on the account still run."""
        with self.assertRaises(FolderError):
            await self.store.open_folder(ALICE, "Nope")
        await self.store.create_folder(ALICE, "Nope")
        folder = await self.store.open_folder(ALICE, "Nope")
        self.assertEqual(folder.name, "Nope")
        self.assertEqual(self.store._locks, {})


class FolderTests(MailboxStoreTestCase):
    async def test_open_folder_picks_up_delivered_mail(self) -> None:
        """Opening a folder takes in mail delivered to new/, and Folder.path reads it."""
        await self.deliver(ALICE, b"Subject: one\r\n\r\n1\r\n")
        await self.deliver(ALICE, b"Subject: two\r\n\r\n2\r\n")
        folder = await self.store.open_folder(ALICE, "inbox")
        self.assertEqual(folder.name, INBOX)
        self.assertEqual([m.uid for m in folder.messages], [1, 2])
        self.assertEqual(
            Path(folder.path(2)).read_bytes(), b"Delivered-To: x\r\nSubject: two\r\n\r\n2\r\n"
        )
        self.assertEqual(folder.messages[0].size, Path(folder.path(1)).stat().st_size)
        await self.deliver(ALICE)
        self.assertEqual(len(folder.messages), 2)  # a view, until refreshed
        state = await folder.refresh()
        self.assertEqual([m.uid for m in state.messages], [1, 2, 3])
        self.assertTrue(Path(folder.path(3)).is_file())

    async def test_folders_and_status(self) -> None:
        """Folders created through the store are listed; status picks up new mail."""
        await self.store.create_folder(ALICE, "Archive")
        await self.deliver(ALICE)
        self.assertEqual([f.name for f in await self.store.folders(ALICE)], [INBOX, "Archive"])
        count, octets, _, uidnext, _ = await self.store.status(ALICE, INBOX)
        self.assertEqual((count, uidnext), (1, 2))
        self.assertGreater(octets, 0)

    async def test_copy_and_move(self) -> None:
        """COPY and MOVE fire with the target's UIDVALIDITY and the UID pairs."""
        await self.store.create_folder(ALICE, "Target")
        for _ in range(3):
            await self.deliver(ALICE)
        folder = await self.store.open_folder(ALICE)
        uidvalidity = (await self.store.status(ALICE, "Target"))[2]
        self.assertEqual(await folder.copy([1], "Target"), (uidvalidity, [(1, 1)]))
        self.assertEqual(await folder.move([2, 3], "Target"), (uidvalidity, [(2, 2), (3, 3)]))
        state = await folder.refresh()
        self.assertEqual([m.uid for m in state.messages], [1])
        target = await self.store.open_folder(ALICE, "Target")
        self.assertEqual([m.uid for m in target.messages], [1, 2, 3])
        for uid in (1, 2, 3):
            self.assertTrue(Path(target.path(uid)).is_file())


class NotificationTests(MailboxStoreTestCase):
    async def test_store_flags_tells_the_others_only(self) -> None:
        """A flag change is told to the other session's listener, not to the session's own."""
        await self.open_two_sessions()
        changes, _ = await self.f1.store_flags([1], [SEEN], "add")
        self.assertEqual([c.uid for c in changes], [1])
        self.assertEqual((self.mine.calls, self.other.calls), (0, 1))
        changes_seen = await self.f2.changes_since(self.f2.state.highestmodseq)
        self.assertEqual([m.uid for m in changes_seen.changed], [1])
        state = await self.f2.refresh()
        self.assertEqual(state.messages[0].flags, {SEEN})

    async def test_expunge_tells_the_others_only(self) -> None:
        """An expunge is told to the other session's listener, not to the session's own."""
        await self.open_two_sessions()
        self.assertEqual(await self.f1.expunge([2]), [2])
        self.assertEqual((self.mine.calls, self.other.calls), (0, 1))
        state = await self.f2.refresh()
        self.assertEqual([m.uid for m in state.messages], [1, 3])

    async def test_append_tells_the_listeners(self) -> None:
        """An APPEND into the folder is told to the sessions watching it."""
        await self.open_two_sessions()
        await self.store.append(ALICE, "INBOX", writer(b"Subject: a\r\n\r\n"))
        self.assertEqual(self.other.calls, 1)
        self.assertEqual([m.uid for m in (await self.f2.refresh()).messages], [1, 2, 3, 4])

    async def test_move_tells_both_folders(self) -> None:
        """A MOVE is told to the source's other sessions and to the target's sessions."""
        await self.open_two_sessions()
        await self.store.create_folder(ALICE, "Target")
        watcher = Recorder()
        target = await self.store.open_folder(ALICE, "Target", watcher)
        self.addCleanup(target.close)
        await self.f1.copy([1], "Target")
        self.assertEqual((self.mine.calls, self.other.calls, watcher.calls), (0, 0, 1))
        await self.f1.move([2], "Target")
        self.assertEqual((self.mine.calls, self.other.calls, watcher.calls), (0, 1, 2))

    async def test_delivered_wakes_inbox_subscriber(self) -> None:
        """A delivery wakes the INBOX listeners of that account, and no one else."""
        await self.open_two_sessions()
        bob = Recorder()
        archive = Recorder()
        self.addCleanup(self.store.subscribe(BOB, INBOX, bob))
        self.addCleanup(self.store.subscribe(ALICE, "Archive", archive))
        await self.deliver(ALICE)
        self.assertEqual((self.mine.calls, self.other.calls), (1, 1))
        self.assertEqual((bob.calls, archive.calls), (0, 0))
        state = await self.f1.refresh()
        self.assertEqual(len(state.messages), 4)

    async def test_unsubscribe(self) -> None:
        """After unsubscribing (or closing the Folder), a listener is no longer called."""
        await self.open_two_sessions()
        extra = Recorder()
        unsubscribe = self.store.subscribe(ALICE, "inbox", extra)
        self.store.delivered(ALICE)
        unsubscribe()
        unsubscribe()  # twice is harmless
        self.f2.close()
        self.store.delivered(ALICE)
        self.assertEqual((extra.calls, self.mine.calls, self.other.calls), (1, 2, 1))
        self.f1.close()
        self.assertEqual(self.store._listeners, {})

    async def test_failing_listener_does_not_stop_the_others(self) -> None:
        """A listener that raises is logged; the other listeners are still called."""
        await self.open_two_sessions()

        def broken() -> None:
            raise ZeroDivisionError

        unsubscribe = self.store.subscribe(ALICE, INBOX, broken)
        self.addCleanup(unsubscribe)
        self.store.changed(ALICE, INBOX)
        self.assertEqual((self.mine.calls, self.other.calls), (1, 1))
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)


class SharedStateTests(MailboxStoreTestCase):
    async def test_sessions_share_one_state(self) -> None:
        """
        Two views of the same folder hold the same state object; after a change, the first
        to look builds the next state from the shared one and the other gets that same object;
        the records of unchanged messages are the same objects throughout.
        """
        await self.open_two_sessions()
        self.assertIs(self.f1.state, self.f2.state)
        before = self.f1.state
        await self.f1.store_flags([2], [SEEN], "add")
        state1, changes1 = await self.f1.look()
        state2, changes2 = await self.f2.look()
        self.assertIs(state1, state2)
        self.assertIsNot(state1, before)
        self.assertIs(state1.messages[0], before.messages[0])
        assert changes1 is not None and changes2 is not None
        self.assertEqual([m.uid for m in changes2.changed], [2])
        self.assertEqual(changes2.changed[0].flags, {SEEN})
        self.assertEqual(changes1, changes2)
        third = await self.store.open_folder(ALICE, INBOX)
        self.assertIs(third.state, state1)

    async def test_look_reads_only_the_changes(self) -> None:
        """A look after a change asks the index for the changes, never for the whole folder."""
        await self.open_two_sessions()
        await self.f1.expunge([1])
        await self.deliver(ALICE)

        def refuse(*args: object) -> None:
            raise AssertionError("the whole folder was read")

        self.patch(MailIndex, "state", refuse)
        state, changes = await self.f2.look()
        assert changes is not None
        self.assertEqual(state.uids, (2, 3, 4))
        self.assertEqual(([m.uid for m in changes.changed], changes.expunged), ([4], (1,)))
        # A view that fell behind the shared state gets the changes since its own look.
        await self.f2.store_flags([2], [SEEN], "add")
        await self.f2.look()
        state, changes = await self.f1.look()
        assert changes is not None
        self.assertEqual([m.uid for m in changes.changed], [2, 4])
        self.assertEqual(changes.expunged, (1,))

    async def test_look_after_index_rebuilt(self) -> None:
        """After the index was lost and rebuilt (a new UIDVALIDITY), a look gives no changes:
        the view's UIDs cannot be compared with the new ones."""
        await self.open_two_sessions()
        old = self.f1.state.uidvalidity
        self.store.close()
        index = mailbox_path(self.root, ALICE) / "index.sqlite"
        for suffix in ("", "-wal", "-shm"):
            Path(str(index) + suffix).unlink(missing_ok=True)
        state, changes = await self.f1.look()
        self.assertIsNone(changes)
        self.assertNotEqual(state.uidvalidity, old)
        self.assertEqual(state.uids, (1, 2, 3))


class EvictionTests(MailboxStoreTestCase):
    max_open = 1

    async def test_two_accounts_with_one_open_index(self) -> None:
        """
        With room for one open index, operations alternating between two accounts (also at
        the same time) all work, and their changes persist through each eviction.
        """
        await self.deliver(ALICE)
        await self.deliver(BOB)
        a = await self.store.open_folder(ALICE)
        b = await self.store.open_folder(BOB)
        self.assertEqual(list(self.store._open), [BOB])
        await a.store_flags([1], [SEEN], "add")
        self.assertEqual(list(self.store._open), [ALICE])
        await gatherResults(
            [
                self.store.append(account, INBOX, writer(b"Subject: x\r\n\r\n"))
                for _ in range(5)
                for account in (ALICE, BOB)
            ]
        )
        self.assertEqual(len(self.store._open), 1)
        a_state = await a.refresh()
        b_state = await b.refresh()
        self.assertEqual([m.uid for m in a_state.messages], [1, 2, 3, 4, 5, 6])
        self.assertEqual([m.uid for m in b_state.messages], [1, 2, 3, 4, 5, 6])
        self.assertEqual(a_state.messages[0].flags, {SEEN})
        self.assertEqual(b_state.messages[0].flags, frozenset())
        self.assertTrue(Path(a.path(1)).is_file() and Path(b.path(6)).is_file())
