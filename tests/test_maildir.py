"""Tests for L{mailserver.store}: durable maildir delivery, the body buffer, the memory twin."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from mailserver.interfaces import IMailStore
from mailserver.store import durable, maildir
from mailserver.store.body import MessageBody
from mailserver.store.maildir import MaildirStore, UnsafeMailboxName, mailbox_path
from mailserver.store.memory import MemoryStore


def body_of(*chunks: bytes, spill_dir: Path | None = None, threshold: int = 1024) -> MessageBody:
    b = MessageBody(spill_dir, threshold)
    for chunk in chunks:
        b.append(chunk)
    return b


class MailboxPathTests(SynchronousTestCase):
    def test_layout(self) -> None:
        """An account's maildir is <root>/<domain>/<local>."""
        self.assertEqual(
            mailbox_path(Path("/m"), "alice@example.org"), Path("/m/example.org/alice")
        )

    def test_traversal_refused(self) -> None:
        """Names that could leave the root, or hide, are refused."""
        for bad in (
            "../x@example.org",
            "a/b@example.org",
            ".hidden@example.org",
            "a@../etc",
            "a@ex/ample",
            "a@..",
            "noat",
            "a\x00@example.org",
        ):
            with self.assertRaises(UnsafeMailboxName, msg=bad):
                mailbox_path(Path("/m"), bad)


class MessageBodyTests(SynchronousTestCase):
    def test_small_body_in_memory(self) -> None:
        """A small body is read back whole."""
        b = body_of(b"abc", b"def")
        self.assertEqual(b.read(), b"abcdef")
        self.assertEqual(b.size, 6)

    def test_large_body_spills_to_unlinked_file(self) -> None:
        """Past the threshold the body goes to a temporary file that has no name on disk."""
        d = Path(self.mktemp())
        d.mkdir()
        chunks = [bytes([i]) * 700 for i in range(10)]
        b = body_of(*chunks, spill_dir=d, threshold=1000)
        self.assertEqual(os.listdir(d), [])
        self.assertEqual(b.read(), b"".join(chunks))
        out = Path(self.mktemp())
        with open(out, "wb") as f:
            b.write_to(f)
        self.assertEqual(out.read_bytes(), b"".join(chunks))
        b.close()


class DurabilityOrderTests(SynchronousTestCase):
    def _record_calls(self) -> list[tuple[str, Any]]:
        calls: list[tuple[str, Any]] = []
        real_fsync, real_rename = os.fsync, os.rename

        def fsync(fd: int) -> None:
            calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
            real_fsync(fd)

        def rename(a: Any, b: Any) -> None:
            calls.append(("rename", str(b)))
            real_rename(a, b)

        self.patch(os, "fsync", fsync)
        self.patch(os, "rename", rename)
        return calls

    def test_fsync_file_then_rename_then_fsync_dir(self) -> None:
        """
        A delivery fsyncs tmp/<name>, renames it into new/, then fsyncs new/:
        in that order, and all before it returns (so before the 250).
        """
        root = Path(self.mktemp())
        store = MaildirStore(root, reactor, ThreadPool())
        target = root / "example.org" / "alice"
        store._ensure_maildir(target)
        calls = self._record_calls()
        name = store.deliver_sync(target, b"Return-Path: <>\r\n", body_of(b"hello\r\n"))
        new = str((target / "new").absolute())
        self.assertEqual(len(calls), 3)
        self.assertEqual(calls[0][0], "fsync")
        self.assertIn("/alice/tmp/", calls[0][1])
        self.assertEqual(calls[1], ("rename", str(target / "new" / name)))
        self.assertEqual(calls[2], ("fsync", new))
        self.assertEqual((target / "new" / name).read_bytes(), b"Return-Path: <>\r\nhello\r\n")

    def test_failed_write_leaves_nothing(self) -> None:
        """If writing fails, no file is left in tmp/ or new/."""
        root = Path(self.mktemp())
        store = MaildirStore(root, reactor, ThreadPool())
        target = root / "example.org" / "alice"

        class Broken(MessageBody):
            def write_to(self, out: Any) -> None:
                out.write(b"partial")
                raise OSError("disk full")

        with self.assertRaises(OSError):
            store.deliver_sync(target, b"", Broken())
        self.assertEqual(os.listdir(target / "tmp"), [])
        self.assertEqual(os.listdir(target / "new"), [])

    def test_file_name_carries_size_and_is_unique(self) -> None:
        """Names are unique and carry the file size (S= and W=)."""
        root = Path(self.mktemp())
        store = MaildirStore(root, reactor, ThreadPool())
        target = root / "d.example" / "u"
        names = {store.deliver_sync(target, b"H: v\r\n", body_of(b"x\r\n")) for _ in range(50)}
        self.assertEqual(len(names), 50)
        for name in names:
            self.assertTrue(name.endswith(",S=9,W=9"), name)
            self.assertEqual(os.stat(target / "new" / name).st_mode & 0o777, 0o600)

    def test_atomic_write_replaces_whole(self) -> None:
        """atomic_write leaves the new content and no temporary file."""
        d = Path(self.mktemp())
        d.mkdir()
        durable.atomic_write(d / "f", b"one")
        durable.atomic_write(d / "f", b"two", mode=0o644)
        self.assertEqual((d / "f").read_bytes(), b"two")
        self.assertEqual(os.listdir(d), ["f"])


class DirectorySyncTests(SynchronousTestCase):
    def test_each_change_covered_by_a_sync_that_began_after_it(self) -> None:
        """
        Under concurrency every caller returns only after an fsync that started after its own
        change, and callers share fsyncs (fewer fsyncs than changes).
        """
        lock = threading.Lock()
        changes = 0
        syncs: list[tuple[int, float]] = []  # (changes seen at start, end time)

        def slow_sync(path: Path) -> None:
            with lock:
                seen = changes
            time.sleep(0.01)
            with lock:
                syncs.append((seen, time.monotonic()))

        ds = durable.DirectorySync(slow_sync)
        problems: list[str] = []

        def worker() -> None:
            nonlocal changes
            for _ in range(20):
                with lock:
                    changes += 1
                    mine = changes
                ds.changed(Path("/d"))
                now = time.monotonic()
                with lock:
                    if not any(seen >= mine and end <= now for seen, end in syncs):
                        problems.append(f"change {mine} returned before a covering sync")

        threads = [threading.Thread(target=worker) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        self.assertEqual(problems, [])
        self.assertLess(len(syncs), 160)

    def test_failed_sync_raises_and_next_caller_retries(self) -> None:
        """A failing fsync raises to its caller; the next caller syncs again."""
        calls: list[Path] = []

        def flaky(path: Path) -> None:
            calls.append(path)
            if len(calls) == 1:
                raise OSError("EIO")

        ds = durable.DirectorySync(flaky)
        with self.assertRaises(OSError):
            ds.changed(Path("/d"))
        ds.changed(Path("/d"))
        self.assertEqual(len(calls), 2)


class StoreContractMixin:
    """The L{IMailStore} contract, run against every implementation."""

    def make_store(self) -> IMailStore:
        raise NotImplementedError

    def stored(self, store: IMailStore, account: str) -> list[bytes]:
        raise NotImplementedError

    async def test_provides_interface(self) -> None:
        """The store provides IMailStore."""
        self.assertTrue(verifyObject(IMailStore, self.make_store()))  # type: ignore[attr-defined]

    async def test_one_copy_per_account_with_own_prefix(self) -> None:
        """Each account gets one copy with its own prefix, and the body exactly."""
        store = self.make_store()
        names = await store.deliver(
            [("a@example.org", b"P: a\r\n"), ("b@example.org", b"P: b\r\n")],
            body_of(b"Subject: x\r\n\r\n", b"body\r\n"),
        )
        self.assertEqual(len(names), 2)  # type: ignore[attr-defined]
        self.assertEqual(  # type: ignore[attr-defined]
            self.stored(store, "a@example.org"), [b"P: a\r\nSubject: x\r\n\r\nbody\r\n"]
        )
        self.assertEqual(  # type: ignore[attr-defined]
            self.stored(store, "b@example.org"), [b"P: b\r\nSubject: x\r\n\r\nbody\r\n"]
        )


class MaildirStoreContractTests(StoreContractMixin, TestCase):
    def make_store(self) -> IMailStore:
        self.root = Path(self.mktemp())
        pool = ThreadPool(1, 2)
        pool.start()
        self.addCleanup(pool.stop)
        return MaildirStore(self.root, reactor, pool)

    def stored(self, store: IMailStore, account: str) -> list[bytes]:
        new = maildir.mailbox_path(self.root, account) / "new"
        return [(new / n).read_bytes() for n in sorted(os.listdir(new))]

    async def test_unsafe_account_fails_without_writing(self) -> None:
        """An unsafe account name fails the delivery; nothing is written outside the root."""
        store = self.make_store()
        with self.assertRaises(UnsafeMailboxName):
            await store.deliver([("../evil@example.org", b"")], body_of(b"x\r\n"))
        self.assertFalse(self.root.exists())


class MemoryStoreContractTests(StoreContractMixin, TestCase):
    def make_store(self) -> IMailStore:
        return MemoryStore()

    def stored(self, store: IMailStore, account: str) -> list[bytes]:
        assert isinstance(store, MemoryStore)
        return store.messages.get(account, [])
