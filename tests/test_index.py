"""
Tests for L{mailserver.store.index}: the per-user SQLite index beside a Maildir++, on real files.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, cast

from twisted.internet import reactor
from twisted.internet.interfaces import IReactorFromThreads
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SynchronousTestCase

from mailserver.store.body import MessageBody
from mailserver.store.index import (
    INBOX,
    Changes,
    FolderError,
    FolderState,
    MailIndex,
    MessageInfo,
    apply_changes,
    check_folder_name,
    flags_from_info,
    folder_directory,
    rfc822_size,
)
from mailserver.store.maildir import MaildirStore

SEEN = "\\Seen"
FLAGGED = "\\Flagged"
ANSWERED = "\\Answered"
DELETED = "\\Deleted"


def writer(data: bytes) -> Callable[[BinaryIO], object]:
    return lambda f: f.write(data)


def age(directory: Path, seconds: float = 60) -> None:
    """Set C{directory}'s mtime C{seconds} into the past, as if it had not changed since."""
    then = time.time() - seconds
    os.utime(directory, (then, then))


class IndexTestCase(SynchronousTestCase):
    """A maildir in a fresh directory, real deliveries into it, and indexes on it."""

    def setUp(self) -> None:
        self.root = Path(self.mktemp())
        self.maildir = MaildirStore(
            self.root.parent, cast(IReactorFromThreads, reactor), ThreadPool()
        )
        self.clock: float | None = None

    def now(self) -> float:
        return time.time() if self.clock is None else self.clock

    def open_index(self) -> MailIndex:
        index = MailIndex(self.root, self.now)
        self.addCleanup(index.close)
        return index

    def deliver(self, text: bytes = b"Subject: hi\r\n\r\nhello\r\n") -> str:
        """Deliver C{text} into the INBOX's new/ with the real delivery code."""
        body = MessageBody()
        body.append(text)
        return self.maildir.deliver_sync(self.root, b"Return-Path: <a@example.org>\r\n", body)

    def cur(self, folder: str = INBOX) -> Path:
        return folder_directory(self.root, folder) / "cur"

    def uids(self, index: MailIndex, folder: str = INBOX) -> list[int]:
        return [m.uid for m in index.state(folder).messages]


class ArrivalTests(IndexTestCase):
    def test_new_mail_gets_consecutive_uids_in_arrival_order(self) -> None:
        """
        Mail delivered into new/ gets UIDs 1, 2, 3 in delivery order on the next sync, UIDNEXT
        follows the last one, and the files move to cur/ with an empty C{:2,} info.
        """
        index = self.open_index()
        names = [self.deliver(b"Subject: %d\r\n\r\nx\r\n" % i) for i in range(3)]
        self.assertTrue(index.sync(INBOX))
        state = index.state(INBOX)
        self.assertEqual([m.uid for m in state.messages], [1, 2, 3])
        self.assertEqual([m.filename for m in state.messages], [n + ":2," for n in names])
        self.assertEqual(state.uidnext, 4)
        self.assertEqual(os.listdir(self.root / "new"), [])
        self.assertEqual(sorted(os.listdir(self.cur())), sorted(n + ":2," for n in names))

    def test_uids_never_reused_after_expunge(self) -> None:
        """After the highest UIDs are expunged (and the index reopened), new mail gets higher."""
        index = self.open_index()
        for _ in range(3):
            self.deliver()
        index.sync(INBOX)
        self.assertEqual(index.expunge(INBOX, [2, 3]), [2, 3])
        index.close()
        index = self.open_index()
        self.deliver()
        index.sync(INBOX)
        self.assertEqual(self.uids(index), [1, 4])
        self.assertEqual(index.state(INBOX).uidnext, 5)

    def test_counters_advance(self) -> None:
        """UIDNEXT and HIGHESTMODSEQ advance with new mail; a sync that finds nothing keeps them."""
        index = self.open_index()
        _, _, uidvalidity, uidnext0, modseq0 = index.status(INBOX)
        self.deliver()
        self.assertTrue(index.sync(INBOX))
        count, _, uidvalidity1, uidnext1, modseq1 = index.status(INBOX)
        self.assertEqual((count, uidvalidity1, uidnext1), (1, uidvalidity, uidnext0 + 1))
        self.assertGreater(modseq1, modseq0)
        self.assertEqual(index.state(INBOX).messages[0].modseq, modseq1)
        self.assertFalse(index.sync(INBOX))
        self.assertEqual(index.status(INBOX)[3:], (uidnext1, modseq1))

    def test_sizes_are_crlf_sizes(self) -> None:
        """
        A delivered file's size is its length; a hand-placed file with bare LFs and no C{,W=}
        counts each LF as CRLF; a C{,W=} in the name is taken as it is.
        """
        index = self.open_index()
        delivered = self.deliver(b"Subject: a\r\n\r\nbody\r\n")
        (self.root / "new" / "1000.hand1.host").write_bytes(b"Subject: b\n\nline\r\nlast\n")
        (self.root / "new" / "1001.hand2.host,S=3,W=777").write_bytes(b"a\nb")
        index.sync(INBOX)
        sizes = {m.name: m.size for m in index.state(INBOX).messages}
        self.assertEqual(sizes[delivered], os.stat(self.cur() / (delivered + ":2,")).st_size)
        self.assertEqual(sizes["1000.hand1.host"], len(b"Subject: b\r\n\r\nline\r\nlast\r\n"))
        self.assertEqual(sizes["1001.hand2.host,S=3,W=777"], 777)
        self.assertEqual(index.status(INBOX)[1], sum(sizes.values()))

    def test_size_of_crlf_split_across_read_chunks(self) -> None:
        """A CRLF split across two 256 KiB reads counts as two octets, not three."""
        path = Path(self.mktemp())
        data = b"x" * (256 * 1024 - 1) + b"\r\n" + b"y\n"
        path.write_bytes(data)
        self.assertEqual(rfc822_size(path, "name"), len(data) + 1)

    def test_internal_date_is_the_file_mtime(self) -> None:
        """A message's internal date is its file's mtime when it was found."""
        index = self.open_index()
        hand = self.root / "new" / "1234.hand.host"
        hand.write_bytes(b"Subject: x\r\n\r\n")
        os.utime(hand, (1_000_000_000, 1_000_000_000))
        index.sync(INBOX)
        (info,) = index.state(INBOX).messages
        self.assertEqual(info.internaldate, 1_000_000_000)

    def test_info_flags_of_new_file_taken(self) -> None:
        """A file placed in new/ with an info part keeps its name and its flags are taken."""
        index = self.open_index()
        (self.root / "new" / "77.hand.host:2,FS").write_bytes(b"Subject: x\r\n\r\n")
        index.sync(INBOX)
        (info,) = index.state(INBOX).messages
        self.assertEqual(info.filename, "77.hand.host:2,FS")
        self.assertEqual(info.flags, {SEEN, FLAGGED})


class FlagTests(IndexTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.index = self.open_index()
        for _ in range(3):
            self.deliver()
        self.index.sync(INBOX)

    def flags(self, index: MailIndex | None = None) -> dict[int, frozenset[str]]:
        return {m.uid: m.flags for m in (index or self.index).state(INBOX).messages}

    def test_set_add_remove_bump_modseq(self) -> None:
        """
        Each mode does what it says, keywords included; each STORE that changes something gives
        the changed messages one new MODSEQ (the folder's new HIGHESTMODSEQ); a message left as
        it was is not reported and keeps its MODSEQ.
        """
        index = self.index
        m0 = index.status(INBOX)[4]
        changes, refused = index.store_flags(INBOX, [1, 2], [SEEN, "$Work"], "set")
        self.assertEqual(refused, [])
        self.assertEqual(
            [(c.uid, c.flags, c.modseq) for c in changes],
            [
                (1, {SEEN, "$Work"}, m0 + 1),
                (2, {SEEN, "$Work"}, m0 + 1),
            ],
        )
        changes, _ = index.store_flags(INBOX, [1, 2, 3], [FLAGGED], "add")
        self.assertEqual({c.uid for c in changes}, {1, 2, 3})
        self.assertEqual({c.modseq for c in changes}, {m0 + 2})
        changes, _ = index.store_flags(INBOX, [2, 3], ["$Work"], "remove")
        self.assertEqual([c.uid for c in changes], [2])  # 3 never had it
        self.assertEqual(
            self.flags(), {1: {SEEN, "$Work", FLAGGED}, 2: {SEEN, FLAGGED}, 3: {FLAGGED}}
        )
        modseqs = {m.uid: m.modseq for m in index.state(INBOX).messages}
        self.assertEqual(modseqs, {1: m0 + 2, 2: m0 + 3, 3: m0 + 2})
        self.assertEqual(index.status(INBOX)[4], m0 + 3)

    def test_store_without_change_keeps_highestmodseq(self) -> None:
        """A STORE that changes nothing (or names unknown UIDs) does not bump HIGHESTMODSEQ."""
        index = self.index
        index.store_flags(INBOX, [1], [SEEN], "add")
        m = index.status(INBOX)[4]
        self.assertEqual(index.store_flags(INBOX, [1, 99], [SEEN], "add"), ([], []))
        self.assertEqual(index.status(INBOX)[4], m)

    def test_flags_persist_after_reopen(self) -> None:
        """Flags and MODSEQs survive closing the index and opening it again."""
        self.index.store_flags(INBOX, [2], [ANSWERED, "$Label1"], "add")
        before = self.index.state(INBOX)
        self.index.close()
        index = self.open_index()
        index.sync(INBOX)
        self.assertEqual(index.state(INBOX), before)
        self.assertEqual(self.flags(index)[2], {ANSWERED, "$Label1"})

    def test_unchanged_since_refuses_messages_changed_later(self) -> None:
        """With UNCHANGEDSINCE, a message whose MODSEQ is higher is refused and left alone."""
        index = self.index
        (c,) = index.store_flags(INBOX, [1], [SEEN], "add")[0]
        changes, refused = index.store_flags(
            INBOX, [1, 2], [FLAGGED], "add", unchanged_since=c.modseq - 1
        )
        self.assertEqual(refused, [1])
        self.assertEqual([x.uid for x in changes], [2])
        self.assertEqual(self.flags()[1], {SEEN})
        changes, refused = index.store_flags(INBOX, [1], [FLAGGED], "add", unchanged_since=c.modseq)
        self.assertEqual((refused, [x.uid for x in changes]), ([], [1]))

    def test_changes_since(self) -> None:
        """changes_since reports flag changes, new messages and expunged UIDs after a MODSEQ."""
        index = self.index
        mark = index.status(INBOX)[4]
        self.assertEqual(index.changes_since(INBOX, mark).changed, ())
        index.store_flags(INBOX, [2], [SEEN], "add")
        index.expunge(INBOX, [3])
        self.deliver()
        index.sync(INBOX)
        changes = index.changes_since(INBOX, mark)
        self.assertEqual([m.uid for m in changes.changed], [2, 4])
        self.assertEqual(changes.expunged, (3,))
        self.assertEqual(changes.highestmodseq, index.status(INBOX)[4])
        later = index.changes_since(INBOX, changes.changed[0].modseq)
        self.assertEqual(([m.uid for m in later.changed], later.expunged), ([4], (3,)))

    def test_state_since_reads_only_the_changes(self) -> None:
        """
        state_since builds the new state from an earlier one and the changes after its MODSEQ
        (a flag change, an expunge and a new message at once): the statements it runs read no
        message row but the changed ones, and the unchanged records are the same objects.
        """
        index = self.index
        base = index.state(INBOX)
        self.assertEqual(
            index.state_since(INBOX, base), (base, Changes(base.highestmodseq, (), ()))
        )
        self.assertIs(index.state_since(INBOX, base)[0], base)
        index.store_flags(INBOX, [2], [SEEN], "add")
        index.expunge(INBOX, [1])
        self.deliver()
        index.sync(INBOX)
        statements: list[str] = []
        index._db.set_trace_callback(statements.append)
        state, changes = index.state_since(INBOX, base)
        index._db.set_trace_callback(None)
        self.assertEqual(state, index.state(INBOX))
        self.assertEqual(state.uids, (2, 3, 4))
        assert changes is not None
        self.assertEqual(([m.uid for m in changes.changed], changes.expunged), ([2, 4], (1,)))
        self.assertIs(state.messages[1], base.messages[2])  # message 3, unchanged: shared
        reads = [q for q in statements if "FROM messages" in q]
        self.assertTrue(reads and all("modseq >" in q for q in reads), statements)

    def test_state_since_another_uidvalidity_reads_everything(self) -> None:
        """A base state of a folder since recreated (another UIDVALIDITY) is not built upon."""
        base = self.index.state(INBOX)
        stale = FolderState(INBOX, base.uidvalidity - 1, base.uidnext, 1, base.messages)
        state, changes = self.index.state_since(INBOX, stale)
        self.assertIsNone(changes)
        self.assertEqual(state, base)

    def test_apply_changes_many_expunges(self) -> None:
        """Beyond a few expunges, apply_changes filters once; the result is the same."""
        messages = tuple(
            MessageInfo(u, f"b{u}", f"b{u}:2,", 10, 0, frozenset(), 1) for u in range(1, 201)
        )
        state = FolderState(INBOX, 7, 201, 1, messages)
        new = MessageInfo(201, "b201", "b201:2,", 10, 0, frozenset(), 2)
        flagged = messages[0]._replace(flags=frozenset({SEEN}), modseq=2)
        changes = Changes(2, (flagged, new), tuple(range(2, 200, 2)))
        after = apply_changes(state, changes, 202)
        self.assertEqual(after.uids, (1, *range(3, 201, 2), 200, 201))
        self.assertEqual((after.uidnext, after.highestmodseq), (202, 2))
        self.assertIs(after.messages[0], flagged)
        self.assertEqual(after.uids, tuple(m.uid for m in after.messages))

    def test_unknown_folder_refused(self) -> None:
        """Flags on a folder that does not exist raise FolderError."""
        with self.assertRaises(FolderError):
            self.index.store_flags("Nope", [1], [SEEN], "add")


class ExpungeTests(IndexTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.index = self.open_index()
        for _ in range(3):
            self.deliver()
        self.index.sync(INBOX)
        self.files = {m.uid: m.filename for m in self.index.state(INBOX).messages}

    def pending(self) -> list[tuple[int, str]]:
        with sqlite3.connect(self.root / "index.sqlite") as db:
            return db.execute("SELECT folder, filename FROM unlink_pending").fetchall()

    def test_expunge_removes_files_and_rows(self) -> None:
        """Expunged messages leave the index and their files are unlinked; unknown UIDs skipped."""
        self.assertEqual(self.index.expunge(INBOX, [3, 1, 99]), [1, 3])
        self.assertEqual(self.uids(self.index), [2])
        self.assertEqual(os.listdir(self.cur()), [self.files[2]])
        self.assertEqual(self.pending(), [])
        self.assertEqual(self.index.expunge(INBOX, [1]), [])

    def test_expunge_all_or_none(self) -> None:
        """When the transaction fails part way, no message is removed and no file unlinked."""
        with sqlite3.connect(self.root / "index.sqlite") as db:
            db.execute(
                "CREATE TRIGGER fail BEFORE DELETE ON messages WHEN old.uid = 2"
                " BEGIN SELECT RAISE(ABORT, 'simulated failure'); END"
            )
        with self.assertRaises(sqlite3.DatabaseError):
            self.index.expunge(INBOX, [1, 2, 3])
        self.assertEqual(self.uids(self.index), [1, 2, 3])
        self.assertEqual(sorted(os.listdir(self.cur())), sorted(self.files.values()))
        self.assertEqual(self.pending(), [])
        self.assertEqual(self.index.changes_since(INBOX, 0).expunged, ())

    def test_crash_after_commit_before_unlinks(self) -> None:
        """
        A crash after the expunge committed but before its files were unlinked: the next index
        finishes the unlinks on sync and does not take the files for new messages.
        """
        self.index.close()
        with sqlite3.connect(self.root / "index.sqlite", isolation_level=None) as db:
            db.execute("BEGIN")
            (folder,) = db.execute("SELECT id FROM folders WHERE name = 'INBOX'").fetchone()
            db.execute("DELETE FROM messages WHERE folder = ? AND uid IN (1, 3)", (folder,))
            db.execute(
                "UPDATE folders SET highestmodseq = highestmodseq + 1 WHERE id = ?", (folder,)
            )
            db.executemany(
                "INSERT INTO expunged (folder, uid, modseq)"
                " SELECT ?, ?, highestmodseq FROM folders WHERE id = ?",
                [(folder, 1, folder), (folder, 3, folder)],
            )
            db.executemany(
                "INSERT INTO unlink_pending (folder, filename) VALUES (?, ?)",
                [(folder, self.files[1]), (folder, self.files[3])],
            )
            db.execute("COMMIT")
        db.close()
        self.assertEqual(len(os.listdir(self.cur())), 3)
        index = self.open_index()
        index.sync(INBOX)
        self.assertEqual(self.uids(index), [2])
        self.assertEqual(index.state(INBOX).uidnext, 4)
        self.assertEqual(os.listdir(self.cur()), [self.files[2]])
        self.assertEqual(self.pending(), [])

    def test_failed_unlink_step_finished_by_next_sync(self) -> None:
        """
        If the unlink step after the commit fails (the process dies there), the expunge has
        happened all the same, and the next index's sync removes the files.
        """

        def die(folder_id: int, path: Path) -> None:
            raise OSError("simulated crash before the unlinks")

        self.patch(self.index, "_finish_unlinks", die)
        with self.assertRaises(OSError):
            self.index.expunge(INBOX, [1, 2])
        self.index.close()
        self.assertEqual(len(os.listdir(self.cur())), 3)
        index = self.open_index()
        self.assertEqual(self.uids(index), [3])
        index.sync(INBOX)
        self.assertEqual(self.uids(index), [3])
        self.assertEqual(os.listdir(self.cur()), [self.files[3]])
        self.assertEqual(index.changes_since(INBOX, 0).expunged, (1, 2))


class HandChangeTests(IndexTestCase):
    """Other programs changing the maildir behind the index's back."""

    def setUp(self) -> None:
        super().setUp()
        self.index = self.open_index()
        for _ in range(2):
            self.deliver()
        self.index.sync(INBOX)
        # cur/ has not changed for a while: the next sync records its mtime as trusted.
        age(self.cur())
        self.index.sync(INBOX)
        self.files = {m.uid: m.filename for m in self.index.state(INBOX).messages}

    def test_file_removed_by_hand_is_forgotten(self) -> None:
        """A file deleted by another program disappears on the next sync, as an expunge."""
        mark = self.index.status(INBOX)[4]
        os.unlink(self.cur() / self.files[1])
        self.assertTrue(self.index.sync(INBOX))
        self.assertEqual(self.uids(self.index), [2])
        self.assertEqual(self.index.changes_since(INBOX, mark).expunged, (1,))

    def test_file_added_by_hand_to_cur_appears(self) -> None:
        """A file copied into cur/ by hand gets the next UID, flags from its info part."""
        (self.cur() / "1500.byhand.host:2,RS").write_bytes(b"Subject: x\n\n")
        self.assertTrue(self.index.sync(INBOX))
        info = self.index.state(INBOX).messages[-1]
        self.assertEqual((info.uid, info.name), (3, "1500.byhand.host"))
        self.assertEqual(info.flags, {ANSWERED, SEEN})
        self.assertEqual(info.size, 14)

    def test_renamed_file_keeps_uid_and_takes_new_flags(self) -> None:
        """
        A file whose info part another program changed (C{:2,S} to C{:2,FS}) keeps its UID and
        takes the new flags; flags the info part cannot carry (keywords) stay.
        """
        self.index.store_flags(INBOX, [1], ["$Label"], "add")
        old = self.files[1]
        os.rename(self.cur() / old, self.cur() / (old + "FS"))
        mark = self.index.status(INBOX)[4]
        self.assertTrue(self.index.sync(INBOX))
        state = self.index.state(INBOX)
        self.assertEqual([m.uid for m in state.messages], [1, 2])
        first = state.messages[0]
        self.assertEqual(first.filename, old + "FS")
        self.assertEqual(first.flags, {FLAGGED, SEEN, "$Label"})
        self.assertGreater(first.modseq, mark)
        # And what the rename removes goes too.
        os.rename(self.cur() / (old + "FS"), self.cur() / (old + "S"))
        self.index.sync(INBOX)
        self.assertEqual(self.index.state(INBOX).messages[0].flags, {SEEN, "$Label"})
        self.assertEqual(self.index.state(INBOX).messages[0].filename, old + "S")

    def test_unchanged_cur_is_not_listed(self) -> None:
        """
        Once cur/'s mtime is old enough to trust, a sync with an unchanged mtime does not list
        cur/: a file slipped in with the mtime put back is not seen (the documented cost).
        """
        st = os.stat(self.cur())
        (self.cur() / "1600.sneaky.host:2,").write_bytes(b"x\r\n")
        os.utime(self.cur(), ns=(st.st_atime_ns, st.st_mtime_ns))
        self.assertFalse(self.index.sync(INBOX))
        self.assertEqual(self.uids(self.index), [1, 2])

    def test_recent_cur_mtime_not_trusted(self) -> None:
        """
        A cur/ mtime from less than 2 s ago may hide a later change within the same tick, so it
        is not trusted: a file slipped in with the mtime put back is still found.
        """
        os.unlink(self.cur() / self.files[2])  # cur/ changes now
        self.index.sync(INBOX)
        st = os.stat(self.cur())
        (self.cur() / "1600.sametick.host:2,").write_bytes(b"x\r\n")
        os.utime(self.cur(), ns=(st.st_atime_ns, st.st_mtime_ns))
        self.assertTrue(self.index.sync(INBOX))
        self.assertEqual(
            [m.name for m in self.index.state(INBOX).messages][-1], "1600.sametick.host"
        )

    def test_own_change_does_not_hide_a_hand_change(self) -> None:
        """
        A file added by hand before one of our own changes to cur/ (an APPEND) is still found
        by the next sync, even when the clock says cur/'s new mtime is old enough to trust.
        """
        self.clock = time.time() + 30
        (self.cur() / "1700.byhand.host:2,").write_bytes(b"x\r\n")
        self.index.append(INBOX, writer(b"Subject: appended\r\n\r\n"))
        self.index.sync(INBOX)
        names = [m.name for m in self.index.state(INBOX).messages]
        self.assertIn("1700.byhand.host", names)
        self.assertEqual(len(names), 4)

    def test_crash_between_take_and_commit_gives_one_uid(self) -> None:
        """
        A crash after new mail was moved into cur/ but before the index committed: the next
        sync gives each such file a UID exactly once.
        """
        names = [self.deliver() for _ in range(2)]

        def crash() -> object:
            raise OSError("simulated crash before commit")

        self.patch(self.index, "_transaction", crash)
        with self.assertRaises(OSError):
            self.index.sync(INBOX)
        self.index.close()
        self.assertEqual(os.listdir(self.root / "new"), [])
        index = self.open_index()
        self.assertEqual(self.uids(index), [1, 2])
        index.sync(INBOX)
        age(self.cur())
        index.sync(INBOX)
        state = index.state(INBOX)
        self.assertEqual(
            [(m.uid, m.name) for m in state.messages][2:], [(3, names[0]), (4, names[1])]
        )
        self.assertEqual(state.uidnext, 5)


class RebuildTests(IndexTestCase):
    def test_lost_index_rebuilt_with_new_uidvalidity_in_the_same_second(self) -> None:
        """
        With index.sqlite deleted, the same messages come back (names, sizes, dates, in the
        same order) with flags from their info parts and a new UIDVALIDITY, although the clock
        has not moved.
        """
        self.clock = 1_700_000_000.0
        index = self.open_index()
        for _ in range(3):
            self.deliver()
        index.sync(INBOX)
        first = index.state(INBOX).messages[0]
        os.rename(self.cur() / first.filename, self.cur() / (first.filename + "S"))
        index.sync(INBOX)
        index.store_flags(INBOX, [2], ["$OnlyInIndex"], "add")
        before = index.state(INBOX)
        index.close()
        os.unlink(self.root / "index.sqlite")
        index = self.open_index()
        index.sync(INBOX)
        after = index.state(INBOX)
        self.assertNotEqual(after.uidvalidity, before.uidvalidity)
        self.assertGreater(after.uidvalidity, before.uidvalidity)
        self.assertEqual(
            [(m.name, m.filename, m.size, m.internaldate) for m in after.messages],
            [(m.name, m.filename, m.size, m.internaldate) for m in before.messages],
        )
        self.assertEqual([m.uid for m in after.messages], [1, 2, 3])
        self.assertEqual([m.flags for m in after.messages], [{SEEN}, set(), set()])

    def test_corrupt_index_set_aside_and_rebuilt(self) -> None:
        """Garbage in index.sqlite: it is kept aside for inspection and the index is rebuilt."""
        index = self.open_index()
        for _ in range(2):
            self.deliver()
        index.sync(INBOX)
        old = index.state(INBOX)
        index.close()
        garbage = b"this is not a database" * 100
        (self.root / "index.sqlite").write_bytes(garbage)
        index = self.open_index()
        index.sync(INBOX)
        new = index.state(INBOX)
        self.assertEqual([m.name for m in new.messages], [m.name for m in old.messages])
        self.assertNotEqual(new.uidvalidity, old.uidvalidity)
        aside = [n for n in os.listdir(self.root) if n.startswith("index.sqlite.corrupt-")]
        self.assertEqual(len(aside), 1)
        self.assertEqual((self.root / aside[0]).read_bytes(), garbage)

    def test_folders_found_on_disk_when_rebuilt(self) -> None:
        """A rebuilt index lists the Maildir++ folders on disk, with their messages."""
        index = self.open_index()
        for name in ("Archive", "Archive/2024", "Sent"):
            index.create_folder(name)
        index.append("Archive/2024", writer(b"Subject: old\r\n\r\n"), [SEEN])
        index.close()
        os.unlink(self.root / "index.sqlite")
        (self.root / ".NotAFolder").write_bytes(b"")  # a file, not a folder
        (self.root / ".Half").mkdir()  # no cur/: not a folder
        index = self.open_index()
        self.assertEqual(
            [f.name for f in index.folders()], [INBOX, "Archive", "Archive/2024", "Sent"]
        )
        index.sync("Archive/2024")
        (info,) = index.state("Archive/2024").messages
        self.assertEqual(info.flags, {SEEN})


class AppendCopyMoveTests(IndexTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.index = self.open_index()
        self.index.create_folder("Target")

    def test_append(self) -> None:
        """
        APPEND writes a file into cur/ whose name carries the sizes and the flags' info letters,
        whose mtime is the internal date, and gives it the next UID with its flags and keywords.
        """
        data = b"Subject: appended\r\n\r\nbody\r\n"
        info = self.index.append(
            "Target", writer(data), [SEEN, DELETED, "$Kw"], internaldate=1_234_567_890
        )
        self.assertEqual((info.uid, info.size, info.internaldate), (1, len(data), 1_234_567_890))
        self.assertEqual(info.flags, {SEEN, DELETED, "$Kw"})
        self.assertTrue(info.name.endswith(f",S={len(data)},W={len(data)}"), info.name)
        self.assertEqual(info.filename, f"{info.name}:2,ST")
        path = self.cur("Target") / info.filename
        self.assertEqual(path.read_bytes(), data)
        self.assertEqual(os.stat(path).st_mtime, 1_234_567_890)
        self.assertEqual(os.listdir(self.root / ".Target" / "tmp"), [])
        self.assertEqual(self.index.state("Target").messages, (info,))
        self.assertEqual(self.index.status("Target")[3], 2)
        # A sync afterwards does not take the appended file for a new one.
        self.index.sync("Target")
        age(self.cur("Target"))
        self.index.sync("Target")
        self.assertEqual(self.index.state("Target").messages, (info,))

    def record_calls(self) -> list[tuple[str, str]]:
        """Record (not replace) fsync and rename calls, with the paths they apply to."""
        calls: list[tuple[str, str]] = []
        real_fsync, real_rename = os.fsync, os.rename

        def fsync(fd: int) -> None:
            calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
            real_fsync(fd)

        def rename(a: str | Path, b: str | Path) -> None:
            calls.append(("rename", str(Path(b).absolute())))
            real_rename(a, b)

        self.patch(os, "fsync", fsync)
        self.patch(os, "rename", rename)
        return calls

    def test_append_is_durable_before_indexed(self) -> None:
        """APPEND fsyncs the file, renames it into cur/, then fsyncs cur/, before it returns."""
        calls = self.record_calls()
        info = self.index.append("Target", writer(b"Subject: x\r\n\r\n"))
        cur = self.cur("Target").absolute()
        in_cur = str(cur / info.filename)
        self.assertEqual(calls[-2:], [("rename", in_cur), ("fsync", str(cur))])
        self.assertEqual(calls[-3][0], "fsync")
        self.assertTrue(calls[-3][1].endswith("/.Target/tmp/" + info.name.split(",")[0]))

    def test_move_syncs_both_directories(self) -> None:
        """MOVE renames into the target's cur/ and fsyncs both cur/ directories."""
        self.deliver()
        self.index.sync(INBOX)
        calls = self.record_calls()
        self.index.copy(INBOX, [1], "Target", move=True)
        (info,) = self.index.state("Target").messages
        target, source = self.cur("Target").absolute(), self.cur().absolute()
        self.assertEqual(
            calls,
            [
                ("rename", str(target / info.filename)),
                ("fsync", str(target)),
                ("fsync", str(source)),
            ],
        )

    def test_expunge_syncs_cur(self) -> None:
        """The unlinks of an expunge are made durable (cur/ fsynced)."""
        self.deliver()
        self.index.sync(INBOX)
        calls = self.record_calls()
        self.index.expunge(INBOX, [1])
        self.assertIn(("fsync", str(self.cur().absolute())), calls)

    def test_append_failure_leaves_nothing(self) -> None:
        """A write that fails leaves no file and no UID used."""

        def broken(f: BinaryIO) -> None:
            f.write(b"partial")
            raise OSError("client went away")

        with self.assertRaises(OSError):
            self.index.append("Target", broken)
        self.assertEqual(os.listdir(self.root / ".Target" / "tmp"), [])
        self.assertEqual(os.listdir(self.cur("Target")), [])
        self.assertEqual(self.index.status("Target")[3], 1)

    def test_copy_hard_links_with_new_uids(self) -> None:
        """
        COPY hard-links the files into the target, gives them the target's next UIDs (the
        COPYUID pairs), and keeps flags and internal dates; the source is unchanged.
        """
        self.index.append("Target", writer(b"Subject: pad\r\n\r\n"))
        for _ in range(3):
            self.deliver()
        self.index.sync(INBOX)
        self.index.store_flags(INBOX, [3], [FLAGGED, "$Kw"], "add")
        pairs = self.index.copy(INBOX, [3, 1, 42], "Target")
        self.assertEqual(pairs, [(1, 2), (3, 3)])
        source = {m.uid: m for m in self.index.state(INBOX).messages}
        self.assertEqual(sorted(source), [1, 2, 3])
        target = {m.uid: m for m in self.index.state("Target").messages}
        for old, new in pairs:
            a, b = source[old], target[new]
            self.assertEqual((a.flags, a.internaldate, a.size), (b.flags, b.internaldate, b.size))
            st_a = os.stat(self.cur() / a.filename)
            st_b = os.stat(self.cur("Target") / b.filename)
            self.assertEqual((st_a.st_ino, st_a.st_nlink), (st_b.st_ino, 2))
        self.assertEqual(self.index.status("Target")[3], 4)

    def test_copy_twice_gives_distinct_files(self) -> None:
        """Copying the same message twice (and into its own folder) gives distinct files."""
        self.deliver()
        self.index.sync(INBOX)
        self.index.copy(INBOX, [1], "Target")
        self.index.copy(INBOX, [1], "Target")
        self.assertEqual(self.index.copy(INBOX, [1], INBOX), [(1, 2)])
        self.assertEqual(len(set(os.listdir(self.cur("Target")))), 2)
        self.assertEqual(len(set(os.listdir(self.cur()))), 2)
        self.index.sync("Target")
        self.index.sync(INBOX)
        self.assertEqual(self.uids(self.index, "Target"), [1, 2])
        self.assertEqual(self.uids(self.index), [1, 2])

    def test_move(self) -> None:
        """MOVE renames the file into the target: gone from the source with an expunged record."""
        for _ in range(2):
            self.deliver()
        self.index.sync(INBOX)
        self.index.store_flags(INBOX, [2], [SEEN], "add")
        moved = self.index.state(INBOX).messages[1]
        mark = self.index.status(INBOX)[4]
        self.assertEqual(self.index.copy(INBOX, [2], "Target", move=True), [(2, 1)])
        self.assertEqual(self.uids(self.index), [1])
        self.assertEqual(self.index.changes_since(INBOX, mark).expunged, (2,))
        self.assertFalse((self.cur() / moved.filename).exists())
        (info,) = self.index.state("Target").messages
        self.assertEqual((info.uid, info.name, info.flags), (1, moved.name, {SEEN}))
        self.assertTrue((self.cur("Target") / info.filename).exists())
        # Nothing comes back or doubles on the next look at either folder.
        for folder in (INBOX, "Target"):
            self.index.sync(folder)
        self.assertEqual(self.uids(self.index), [1])
        self.assertEqual(self.uids(self.index, "Target"), [1])

    def crash_before_commit(self) -> None:
        def crash() -> object:
            raise OSError("simulated crash before commit")

        self.patch(self.index, "_transaction", crash)

    def test_crash_before_append_commit(self) -> None:
        """
        A crash after an appended file reached cur/ but before the index commit: the next sync
        gives it one UID, with the flags of its info part and its internal date.
        """
        self.crash_before_commit()
        with self.assertRaises(OSError):
            self.index.append("Target", writer(b"Subject: x\r\n\r\n"), [SEEN], 1_000_000_000)
        self.index.close()
        index = self.open_index()
        self.assertEqual(index.status("Target")[0], 0)
        index.sync("Target")
        (info,) = index.state("Target").messages
        self.assertEqual((info.uid, info.flags, info.internaldate), (1, {SEEN}, 1_000_000_000))
        self.assertEqual(info.size, len(b"Subject: x\r\n\r\n"))

    def test_crash_before_move_commit(self) -> None:
        """
        A crash after MOVE renamed the files but before the index commit: the next sync of the
        source forgets them, the next sync of the target gives each one UID.
        """
        for _ in range(2):
            self.deliver()
        self.index.sync(INBOX)
        names = [m.name for m in self.index.state(INBOX).messages]
        self.crash_before_commit()
        with self.assertRaises(OSError):
            self.index.copy(INBOX, [1, 2], "Target", move=True)
        self.index.close()
        index = self.open_index()
        for folder in (INBOX, "Target"):
            index.sync(folder)
        self.assertEqual(index.state(INBOX).messages, ())
        self.assertEqual(index.changes_since(INBOX, 0).expunged, (1, 2))
        self.assertEqual(
            [(m.uid, m.name) for m in index.state("Target").messages],
            [
                (1, names[0]),
                (2, names[1]),
            ],
        )


class FolderTests(IndexTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.index = self.open_index()

    def test_create_is_maildirplusplus(self) -> None:
        """A folder A/B is the directory .A.B with cur/ new/ tmp/ and a maildirfolder file."""
        self.index.create_folder("A/B")
        path = self.root / ".A.B"
        self.assertEqual(sorted(os.listdir(path)), ["cur", "maildirfolder", "new", "tmp"])
        self.assertEqual(folder_directory(self.root, "A/B"), path)
        self.assertEqual(self.index.status("A/B")[0], 0)
        with self.assertRaises(FolderError):
            self.index.create_folder("A/B")
        with self.assertRaises(FolderError):
            self.index.create_folder("inbox")

    def test_list_inbox_first(self) -> None:
        """
        folders() lists INBOX first, then by name, with subscription and special use. INBOX
        and special-use folders start subscribed; a plain CREATE does not subscribe.
        """
        for name in ("Zeta", "Alpha", "Alpha/Sub"):
            self.index.create_folder(name)
        self.index.create_folder("Sent", special_use="\\Sent")
        self.index.set_subscribed("Zeta", True)
        self.index.set_subscribed("Alpha", True)
        self.index.set_subscribed("Alpha", False)
        listed = [(f.name, f.subscribed, f.special_use) for f in self.index.folders()]
        self.assertEqual(
            listed,
            [
                (INBOX, True, ""),
                ("Alpha", False, ""),
                ("Alpha/Sub", False, ""),
                ("Sent", True, "\\Sent"),
                ("Zeta", True, ""),
            ],
        )

    def test_rename_with_subfolders(self) -> None:
        """Renaming A renames A/B too, on disk and in the index; UIDVALIDITY and UIDs stay."""
        for name in ("A", "A/B", "AB"):
            self.index.create_folder(name)
        self.index.append("A/B", writer(b"Subject: x\r\n\r\n"))
        before = self.index.state("A/B")
        self.index.rename_folder("A", "C")
        self.assertEqual([f.name for f in self.index.folders()], [INBOX, "AB", "C", "C/B"])
        self.assertTrue((self.root / ".C.B" / "cur").is_dir())
        self.assertFalse((self.root / ".A").exists())
        self.assertFalse((self.root / ".A.B").exists())
        self.assertTrue((self.root / ".AB").is_dir())
        self.index.sync("C/B")
        after = self.index.state("C/B")
        self.assertEqual((after.uidvalidity, after.messages), (before.uidvalidity, before.messages))
        with self.assertRaises(FolderError):
            self.index.rename_folder("C", "AB")
        with self.assertRaises(FolderError):
            self.index.rename_folder("Nope", "Other")
        with self.assertRaises(FolderError):
            self.index.rename_folder(INBOX, "Other")

    def test_rename_interrupted_by_a_crash_is_rolled_forward(self) -> None:
        """
        A crash after the index took the new names but before every directory was renamed:
        the next open finishes the renames, and the messages are still there with their UIDs.
        """
        for name in ("A", "A/B"):
            self.index.create_folder(name)
        self.index.append("A/B", writer(b"Subject: x\r\n\r\n"))
        before = self.index.state("A/B")
        self.index._finish_renames = lambda: None  # type: ignore[method-assign]  # the crash
        self.index.rename_folder("A", "C")
        self.assertTrue((self.root / ".A.B").is_dir())
        self.index.close()
        index = self.open_index()
        self.assertFalse((self.root / ".A.B").exists())
        self.assertTrue((self.root / ".C.B" / "cur").is_dir())
        index.sync("C/B")
        after = index.state("C/B")
        self.assertEqual((after.uidvalidity, after.messages), (before.uidvalidity, before.messages))
        self.assertEqual([f.name for f in index.folders()], [INBOX, "C", "C/B"])

    def test_subscriptions_outlive_folders(self) -> None:
        """
        A name may be subscribed without a folder, stays subscribed when its folder is deleted
        (RFC 3501 §6.3.6), and follows a rename.
        """
        self.index.set_subscribed("Nowhere", True)
        self.index.create_folder("Old")
        self.index.set_subscribed("Old", True)
        self.index.create_folder("Gone")
        self.index.set_subscribed("Gone", True)
        self.index.delete_folder("Gone")
        self.index.rename_folder("Old", "New")
        self.assertEqual(self.index.subscriptions(), ["Gone", INBOX, "New", "Nowhere"])

    def test_claim_recent(self) -> None:
        """The first read-write look claims the new messages as recent; the next claims none."""
        self.deliver()
        self.deliver()
        self.index.sync(INBOX)
        self.assertEqual(self.index.recent_count(INBOX), 2)
        self.assertEqual(self.index.claim_recent(INBOX), 1)
        self.assertEqual(self.index.recent_count(INBOX), 0)
        self.deliver()
        self.index.sync(INBOX)
        self.assertEqual(self.index.claim_recent(INBOX), 3)
        self.assertEqual(self.index.claim_recent(INBOX), 4)

    def test_move_within_a_folder_gives_a_new_uid(self) -> None:
        """MOVE into the folder it is in (RFC 6851): the message gets a new UID."""
        self.deliver()
        self.index.sync(INBOX)
        pairs = self.index.copy(INBOX, [1], INBOX, move=True)
        self.assertEqual(pairs, [(1, 2)])
        self.assertEqual([m.uid for m in self.index.state(INBOX).messages], [2])
        self.assertEqual(len(os.listdir(self.root / "cur")), 1)

    def test_parsed_cache(self) -> None:
        """ENVELOPE/BODY/BODYSTRUCTURE are kept per message and go with it on expunge."""
        self.deliver()
        self.deliver()
        self.index.sync(INBOX)
        self.assertEqual(self.index.parsed(INBOX, [1, 2]), {})
        self.index.remember_parsed(INBOX, {1: (b"(env)", b"(body)", b"(bs)"), 9: (b"", b"", b"")})
        self.assertEqual(self.index.parsed(INBOX, [1, 2, 9]), {1: (b"(env)", b"(body)", b"(bs)")})
        self.index.expunge(INBOX, [1])
        self.assertEqual(self.index.parsed(INBOX, [1]), {})

    def test_migration_from_version_1(self) -> None:
        """An index written by the first version keeps its folders and subscriptions."""
        self.index.create_folder("Kept")
        self.index.close()
        db = sqlite3.connect(self.root / "index.sqlite")
        db.execute("DROP TABLE subscriptions")
        db.execute("DROP TABLE parsed")
        db.execute(
            "CREATE TABLE f2 AS SELECT id, name, uidvalidity, uidnext, highestmodseq,"
            " subscribed, special_use, cur_mtime FROM folders"
        )
        db.execute("DROP TABLE folders")
        db.execute("ALTER TABLE f2 RENAME TO folders")
        db.execute("PRAGMA user_version=1")
        db.commit()
        db.close()
        index = self.open_index()
        self.assertEqual(index.subscriptions(), [INBOX, "Kept"])
        self.assertEqual(index.claim_recent("Kept"), 1)

    def test_delete_and_recreate(self) -> None:
        """A deleted folder is gone from disk and index; recreated, it has a new UIDVALIDITY."""
        self.clock = 1_700_000_000.0
        self.index.create_folder("Trash")
        self.index.append("Trash", writer(b"Subject: x\r\n\r\n"))
        uidvalidity = self.index.status("Trash")[2]
        self.index.delete_folder("Trash")
        self.assertFalse((self.root / ".Trash").exists())
        self.assertEqual(os.listdir(self.root / "tmp"), [])
        self.assertEqual([f.name for f in self.index.folders()], [INBOX])
        with self.assertRaises(FolderError):
            self.index.state("Trash")
        self.index.create_folder("Trash")
        self.assertEqual(self.index.status("Trash")[:2], (0, 0))
        self.assertGreater(self.index.status("Trash")[2], uidvalidity)
        with self.assertRaises(FolderError):
            self.index.delete_folder(INBOX)

    def test_awkward_names_round_trip(self) -> None:
        """
        Names with C{.}, C{%} and non-ASCII characters map to directories (no stray C{.}
        separators) and back, when a lost index is rebuilt from the directories.
        """
        names = ["a.b", "100%", "x%2Ey", "%25", "Über/Ärger", "日本語.txt/.hidden", "a.b/c.d"]
        for name in names:
            self.index.create_folder(name)
        for name in names:
            d = folder_directory(self.root, name)
            self.assertEqual(d.parent, self.root)
            self.assertEqual(d.name.count("."), name.count("/") + 1, d.name)
        self.index.close()
        os.unlink(self.root / "index.sqlite")
        index = self.open_index()
        self.assertEqual(sorted(f.name for f in index.folders()), sorted([INBOX, *names]))

    def test_bad_names_refused(self) -> None:
        """Empty components, . and .., control characters and absurd lengths are refused."""
        for bad in (
            "",
            "..",
            ".",
            "a/../b",
            "a//b",
            "/a",
            "a/",
            "a\x00b",
            "tab\there",
            "\x7f",
            "x" * 600,
            "/".join("a" * 17),
        ):
            with self.assertRaises(FolderError, msg=repr(bad)):
                check_folder_name(bad)
            with self.assertRaises(FolderError, msg=repr(bad)):
                self.index.create_folder(bad)
        self.assertEqual([n for n in os.listdir(self.root) if n.startswith(".")], [])
        self.assertEqual([f.name for f in self.index.folders()], [INBOX])

    def test_inbox_names_canonical(self) -> None:
        """INBOX in any case is INBOX, also as the top of a hierarchy."""
        self.assertEqual(check_folder_name("iNbOx"), INBOX)
        self.assertEqual(check_folder_name("inbox/Sub"), "INBOX/Sub")
        self.assertEqual(
            flags_from_info("x:2,DFPRST"),
            {
                "\\Draft",
                FLAGGED,
                "$Forwarded",
                ANSWERED,
                SEEN,
                DELETED,
            },
        )


class LargeFolderTests(IndexTestCase):
    def test_status_of_100k_folder_on_warm_index_does_not_list(self) -> None:
        """
        A 100,000-message folder: after the first sync, with cur/ unchanged, a sync and a STAT
        read only the index (a file slipped into cur/ with its mtime put back is not seen,
        which it would be if cur/ were listed again).
        """
        cur = self.root / "cur"
        index = self.open_index()
        base = 1_600_000_000
        # Hard links to a few empty files: far cheaper than 100,000 new inodes (and within
        # the file systems' link count limits).
        sources = [self.root / "tmp" / f"src{n}" for n in range(4)]
        for source in sources:
            source.write_bytes(b"")
        for i in range(100_000):
            os.link(sources[i % 4], cur / f"{base + i}.M0P1Q{i}.host,S=10,W=10:2,S")
        self.clock = time.time() + 10  # cur/ last changed long enough ago to be trusted
        self.assertTrue(index.sync(INBOX))
        count, octets, _, uidnext, _ = index.status(INBOX)
        self.assertEqual((count, octets, uidnext), (100_000, 1_000_000, 100_001))
        st = os.stat(cur)
        (cur / "1700000000.M0P1Qx.host,S=10,W=10:2,").write_bytes(b"")
        os.utime(cur, ns=(st.st_atime_ns, st.st_mtime_ns))
        self.assertFalse(index.sync(INBOX))
        self.assertEqual(index.status(INBOX)[:2], (100_000, 1_000_000))
        self.assertEqual(index.unseen(INBOX), 0)
