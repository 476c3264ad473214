"""Tests for L{mailserver.queue.spool}: the queue on disk."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from mailserver.queue.model import QueuedRecipient, Submission
from mailserver.queue.spool import (
    FORMAT_VERSION,
    CorruptEntry,
    QueueEntry,
    Spool,
    UnknownEntry,
    decode_entry,
    encode_entry,
    mark_due,
    parse_request,
    read_header_block,
    read_trailing_envelope,
    release_lock,
    try_lock,
    valid_queue_id,
)
from mailserver.store.body import MessageBody

PREFIX = b"Received: from client by mail.example.org; Tue, 24 Nov 2026 18:14:42 +0000\r\n"
BODY = b"From: alice@example.org\r\nSubject: hi\r\n\r\nhello\r\n"


def submission(queue_id: str = "q1", **kwargs: Any) -> Submission:
    recipients = kwargs.pop(
        "recipients",
        (
            QueuedRecipient("bob@example.net"),
            QueuedRecipient("carol@example.com", frozenset({"SUCCESS", "FAILURE"}), "rfc822;c@x"),
        ),
    )
    return Submission(
        queue_id=queue_id,
        sender=kwargs.pop("sender", "alice@example.org"),
        recipients=recipients,
        received=kwargs.pop("received", 1000.0),
        **kwargs,
    )


def body_of(data: bytes = BODY) -> MessageBody:
    body = MessageBody()
    body.append(data)
    return body


class SpoolTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.root = Path(self.mktemp())
        self.spool = Spool(self.root)
        self.spool.prepare()

    def store(self, queue_id: str = "q1", **kwargs: Any) -> QueueEntry:
        entry = QueueEntry.from_submission(submission(queue_id, **kwargs), now=1000.0)
        self.spool.store(entry, PREFIX, body_of())
        return entry

    def record(self) -> list[tuple[str, str]]:
        """Record fsync, rename and unlink calls (with the path they concern)."""
        calls: list[tuple[str, str]] = []
        real_fsync, real_rename, real_unlink = os.fsync, os.rename, os.unlink

        def fsync(fd: int) -> None:
            calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
            real_fsync(fd)

        def rename(a: Any, b: Any) -> None:
            calls.append(("rename", os.path.basename(b)))
            real_rename(a, b)

        def unlink(a: Any) -> None:
            calls.append(("unlink", os.path.basename(a)))
            real_unlink(a)

        self.patch(os, "fsync", fsync)
        self.patch(os, "rename", rename)
        self.patch(os, "unlink", unlink)
        return calls


class StoreTests(SpoolTestCase):
    def test_round_trip(self) -> None:
        """An entry written by C{store} loads with every envelope field it had."""
        entry = QueueEntry.from_submission(
            submission(envid="env-1", ret="HDRS", smtputf8=True, eight_bit=True), now=1000.0
        )
        size = self.spool.store(entry, PREFIX, body_of())
        self.assertEqual(size, len(PREFIX) + len(BODY))
        written = self.spool.message_path("q1").read_bytes()
        self.assertEqual(written[:size], PREFIX + BODY)
        self.assertEqual(read_trailing_envelope(self.spool.message_path("q1")), encode_entry(entry))
        loaded = self.spool.load()
        self.assertEqual((loaded.corrupt, loaded.cleaned), ([], []))
        [got] = loaded.entries
        self.assertEqual(encode_entry(got), encode_entry(entry))
        self.assertEqual(got.envid, "env-1")
        self.assertEqual(got.ret, "HDRS")
        self.assertTrue(got.smtputf8 and got.eight_bit)
        self.assertEqual(got.size, size)
        self.assertEqual(got.recipients[1].rcpt.notify, frozenset({"SUCCESS", "FAILURE"}))
        self.assertEqual(got.recipients[1].rcpt.orcpt, "rfc822;c@x")
        self.assertEqual(set(got.domains), {"example.net", "example.com"})
        self.assertEqual(got.domains["example.net"].next_try, 1000.0)

    def test_write_order(self) -> None:
        """
        A new entry is one file, fsynced (message, envelope and trailer in it), then the
        directory is fsynced: both before C{store} returns; no rename, no second file.
        """
        calls = self.record()
        self.store()
        root = str(self.root.absolute())
        self.assertEqual(
            calls, [("fsync", str((self.root / "q1.msg").absolute())), ("fsync", root)]
        )
        self.assertEqual(sorted(os.listdir(self.root)), ["control", "corrupt", "q1.msg"])

    def test_torn_write_is_never_an_entry(self) -> None:
        """
        A C{.msg} cut short at any octet (a crash before its fsync finished: never
        acknowledged) is cleaned at load, never loaded and never taken for corrupt; only the
        whole file is an entry.
        """
        self.store("q1")
        whole = self.spool.message_path("q1").read_bytes()
        for cut in [*range(0, len(whole), 7), len(whole) - 1]:
            self.spool.message_path("q1").write_bytes(whole[:cut])
            loaded = self.spool.load()
            self.assertEqual((loaded.entries, loaded.corrupt), ([], []), cut)
            self.assertEqual(loaded.cleaned, ["q1.msg"], cut)
        self.spool.message_path("q1").write_bytes(whole)
        self.assertEqual([e.queue_id for e in self.spool.load().entries], ["q1"])

    def test_missing_pages_before_the_trailer(self) -> None:
        """
        A file whose trailer reached the disk but not every page before it (written back out
        of order before a power cut; or a changed octet) fails its checksum: it is moved to
        corrupt/, not loaded and not deleted.
        """
        self.store("hole")
        self.store("flip")
        whole = self.spool.message_path("hole").read_bytes()
        self.spool.message_path("hole").write_bytes(b"\0" * 40 + whole[40:])
        flipped = bytearray(self.spool.message_path("flip").read_bytes())
        flipped[len(PREFIX) + 3] ^= 0x20
        self.spool.message_path("flip").write_bytes(bytes(flipped))
        loaded = self.spool.load()
        self.assertEqual(loaded.entries, [])
        self.assertEqual(sorted(q for q, _ in loaded.corrupt), ["flip", "hole"])
        self.assertTrue(all("checksum" in why for _, why in loaded.corrupt))
        self.assertEqual(sorted(os.listdir(self.root / "corrupt")), ["flip.msg", "hole.msg"])

    def test_existing_id_refused(self) -> None:
        """A second entry with the same id is refused; the first is untouched."""
        self.store()
        with self.assertRaises(FileExistsError):
            self.store()
        self.assertEqual(len(self.spool.load().entries), 1)

    def test_bad_id_refused(self) -> None:
        """An id that is not a safe file name is refused."""
        for bad in ("../x", ".hidden", "", "a/b"):
            self.assertFalse(valid_queue_id(bad))
            entry = QueueEntry.from_submission(submission(bad), now=0.0)
            with self.assertRaises(ValueError):
                self.spool.store(entry, b"", body_of())
        self.assertEqual(sorted(os.listdir(self.root)), ["control", "corrupt"])

    def test_failed_write_leaves_nothing(self) -> None:
        """If the body cannot be written, no file of the entry is left."""

        class Broken(MessageBody):
            def write_to(self, out: Any) -> None:
                out.write(b"partial")
                raise OSError("disk full")

        entry = QueueEntry.from_submission(submission(), now=0.0)
        with self.assertRaises(OSError):
            self.spool.store(entry, PREFIX, Broken())
        self.assertEqual(sorted(os.listdir(self.root)), ["control", "corrupt"])


class UpdateTests(SpoolTestCase):
    def test_save_state(self) -> None:
        """A saved state (sent, failed, attempts, next try, owed notice) is what loads, and
        what C{read} gives, not the envelope the message file was first written with."""
        entry = self.store()
        bob, carol = entry.recipients
        bob.state, bob.code, bob.text, bob.host = "sent", 250, "2.0.0 ok", "mx[192.0.2.1]"
        carol.code, carol.text = 451, "4.3.0 later"
        carol.notice = "relayed"
        entry.domains["example.com"].attempts = 2
        entry.domains["example.com"].next_try = 5000.0
        entry.sync_domains(1000.0)
        entry.delay_notified = True
        self.spool.save(entry)
        [got] = self.spool.load().entries
        self.assertEqual(got.recipients[0].state, "sent")
        self.assertEqual(got.recipients[0].host, "mx[192.0.2.1]")
        self.assertEqual(got.recipients[1].state, "pending")
        self.assertEqual(got.recipients[1].notice, "relayed")
        self.assertEqual(list(got.domains), ["example.com"])
        self.assertEqual(got.domains["example.com"].attempts, 2)
        self.assertEqual(got.domains["example.com"].next_try, 5000.0)
        self.assertTrue(got.delay_notified)
        self.assertEqual(encode_entry(self.spool.read("q1")), encode_entry(entry))

    def test_save_order(self) -> None:
        """An update fsyncs the new envelope, renames it over the old, then fsyncs the dir."""
        entry = self.store()
        calls = self.record()
        self.spool.save(entry)
        self.assertEqual([c[0] for c in calls], ["fsync", "rename", "fsync"])
        self.assertEqual(calls[1], ("rename", "q1.env"))
        self.assertEqual(calls[2], ("fsync", str(self.root.absolute())))

    def test_remove_order(self) -> None:
        """Removal unlinks the message first (the entry is gone), then the envelope, then
        fsyncs the directory."""
        entry = self.store()
        self.spool.save(entry)
        calls = self.record()
        self.assertTrue(self.spool.remove("q1"))
        self.assertEqual(
            calls,
            [("unlink", "q1.msg"), ("unlink", "q1.env"), ("fsync", str(self.root.absolute()))],
        )
        self.assertEqual(self.spool.load().entries, [])
        self.assertFalse(self.spool.remove("q1"))

    def test_mark_due(self) -> None:
        """C{mark_due} makes every pending domain due at the given time."""
        entry = self.store()
        for state in entry.domains.values():
            state.next_try = 9999.0
        mark_due([entry], 1234.0)
        self.assertEqual({s.next_try for s in entry.domains.values()}, {1234.0})


class LoadTests(SpoolTestCase):
    def test_crash_leftovers_cleaned(self) -> None:
        """
        Temporary files, a message without a complete trailer or an envelope (a submission
        that never committed) and an envelope without its message (a removal half done) are
        removed at load; the complete entry loads.
        """
        self.store("good")
        (self.root / "orphan.msg").write_bytes(b"half a message")
        (self.root / "removed.env").write_bytes(encode_entry(self.spool.read("good")))
        (self.root / ".good.env.0a1b2c.tmp").write_bytes(b"{")
        loaded = self.spool.load()
        self.assertEqual([e.queue_id for e in loaded.entries], ["good"])
        self.assertEqual(
            sorted(loaded.cleaned), [".good.env.0a1b2c.tmp", "orphan.msg", "removed.env"]
        )
        self.assertEqual(sorted(os.listdir(self.root)), ["control", "corrupt", "good.msg"])

    def test_entry_of_the_two_file_format_loads(self) -> None:
        """
        An entry written before the trailer existed (a C{.msg} that is the message alone and
        a C{.env}) loads and reads as before: nothing queued is lost on an upgrade.
        """
        entry = self.store("old")
        self.spool.message_path("old").write_bytes(PREFIX + BODY)
        self.spool.envelope_path("old").write_bytes(encode_entry(entry))
        [got] = self.spool.load().entries
        self.assertEqual(encode_entry(got), encode_entry(entry))
        self.assertEqual(
            self.spool.header_block(got), PREFIX + b"From: alice@example.org\r\nSubject: hi\r\n"
        )

    def test_corrupt_moved_aside(self) -> None:
        """
        Unreadable envelopes (truncated, not JSON, unknown version, wrong id, bad field), in
        a C{.env} or in the trailer of a C{.msg}, and an envelope whose message is shorter than
        it says go to corrupt/ with their message; the start goes on with the good entries.
        """
        self.store("good")
        good = encode_entry(self.spool.read("good"))
        bad = {
            "truncated": good[: len(good) // 2],
            "garbage": b"\xff\xfe not json",
            "future": json.dumps({"version": FORMAT_VERSION + 1}).encode(),
            "otherid": good,
            "badstate": good.replace(b'"pending"', b'"lost"'),
        }
        for name, data in bad.items():
            (self.root / f"{name}.env").write_bytes(data)
            (self.root / f"{name}.msg").write_bytes(b"x")
        (self.root / "short.env").write_bytes(good.replace(b'"good"', b'"short"'))
        (self.root / "short.msg").write_bytes(b"x")
        self.store("trailing")
        whole = self.spool.message_path("trailing").read_bytes()
        self.spool.message_path("trailing").write_bytes(
            whole.replace(b'"version":1', b'"version":7')
        )
        loaded = self.spool.load()
        self.assertEqual([e.queue_id for e in loaded.entries], ["good"])
        reasons = dict(loaded.corrupt)
        self.assertEqual(set(reasons), {*bad, "short", "trailing"})
        self.assertIn("version", reasons["future"])
        self.assertIn("checksum", reasons["trailing"])
        self.assertIn("file name", reasons["otherid"])
        self.assertIn("shorter", reasons["short"])
        moved = sorted(os.listdir(self.root / "corrupt"))
        self.assertIn("truncated.env", moved)
        self.assertIn("truncated.msg", moved)
        self.assertIn("trailing.msg", moved)
        self.assertEqual(sorted(os.listdir(self.root)), ["control", "corrupt", "good.msg"])
        # A second corrupt entry of the same name does not overwrite the first.
        (self.root / "garbage.env").write_bytes(b"again")
        (self.root / "garbage.msg").write_bytes(b"x")
        self.spool.load()
        self.assertEqual(
            len([n for n in os.listdir(self.root / "corrupt") if n.startswith("garbage")]), 4
        )

    def test_decode_errors(self) -> None:
        """L{decode_entry} raises L{CorruptEntry} for anything but a whole valid envelope."""
        entry = QueueEntry.from_submission(submission(), now=0.0)
        data = encode_entry(entry)
        self.assertEqual(encode_entry(decode_entry(data, "q1")), data)
        for bad in (b"", b"[]", data[:-3], data.replace(b'"code":0', b'"code":"0"')):
            with self.assertRaises(CorruptEntry):
                decode_entry(bad)

    def test_scan_is_read_only(self) -> None:
        """C{scan} (for the CLI) reads entries and reports bad ones, changing nothing."""
        self.store("b", received=2000.0)
        self.store("a", received=3000.0)
        (self.root / "bad.env").write_bytes(b"{")
        (self.root / "bad.msg").write_bytes(b"x")
        (self.root / "orphan.msg").write_bytes(b"x")  # being written (or torn): not an entry
        before = sorted(os.listdir(self.root))
        entries, bad = self.spool.scan()
        self.assertEqual([e.queue_id for e in entries], ["b", "a"])
        self.assertEqual([q for q, _ in bad], ["bad"])
        self.assertEqual(sorted(os.listdir(self.root)), before)

    def test_read(self) -> None:
        """C{read} finds one entry; an unknown or unsafe id is L{UnknownEntry}."""
        self.store()
        self.assertEqual(self.spool.read("q1").sender, "alice@example.org")
        for missing in ("q2", "../q1"):
            with self.assertRaises(UnknownEntry):
                self.spool.read(missing)

    def test_missing_root(self) -> None:
        """Scanning a queue directory that does not exist finds nothing."""
        self.assertEqual(Spool(Path(self.mktemp())).scan(), ([], []))


class HeaderBlockTests(SynchronousTestCase):
    def path(self, data: bytes) -> Path:
        p = Path(self.mktemp())
        p.write_bytes(data + b"{trailing envelope}\r\n\r\n")
        return p

    def test_header_block(self) -> None:
        """The header section ends with its last CRLF, before the empty line."""
        data = PREFIX + BODY
        self.assertEqual(
            read_header_block(self.path(data), len(data)),
            PREFIX + b"From: alice@example.org\r\nSubject: hi\r\n",
        )

    def test_no_body(self) -> None:
        """
        A message without an empty line is all header, and stops at the message's end (not at
        what the file holds after it); one starting with it has none.
        """
        self.assertEqual(read_header_block(self.path(b"A: b\r\n"), 6), b"A: b\r\n")
        self.assertEqual(read_header_block(self.path(b"\r\nbody\r\n"), 8), b"")

    def test_long_header_is_cut_at_a_line(self) -> None:
        """A huge header section is cut to 256 KiB, after a whole line."""
        line = b"X-Long: " + b"a" * 90 + b"\r\n"
        data = line * 5000 + b"\r\nbody"
        head = read_header_block(self.path(data), len(data))
        self.assertLessEqual(len(head), 256 * 1024)
        self.assertTrue(head.endswith(b"\r\n"))
        self.assertEqual(len(head) % len(line), 0)


class ControlTests(SpoolTestCase):
    def test_requests(self) -> None:
        """Requests written by the CLI are listed (temporary names never) and finished."""
        p1 = self.spool.write_request("retry", "ALL")
        p2 = self.spool.write_request("delete", "a.b-c")
        (self.spool.control / ".retry.x.123.tmp").write_bytes(b"")
        (self.spool.control / "junk").write_bytes(b"")
        found = self.spool.requests()
        self.assertEqual(
            sorted((a, t) for _, a, t in found), [("delete", "a.b-c"), ("retry", "ALL")]
        )
        self.spool.finish_request(p1.name)
        self.spool.finish_request(p2.name)
        self.assertEqual(self.spool.requests(), [])

    def test_parse_request(self) -> None:
        """Only C{retry.<id|ALL>.<token>} and C{delete.<id>.<token>} are requests."""
        self.assertEqual(parse_request("retry.ALL.abc"), ("retry", "ALL"))
        self.assertEqual(parse_request("delete.q.1.abc"), ("delete", "q.1"))
        for bad in ("retry.ALL", "drop.q1.abc", ".retry.q1.abc", "delete..abc", "retry.q1."):
            self.assertIsNone(parse_request(bad), bad)

    def test_bad_request_refused(self) -> None:
        """A request for an unsafe id is refused before anything is written."""
        with self.assertRaises(ValueError):
            self.spool.write_request("delete", "../x")
        with self.assertRaises(ValueError):
            self.spool.write_request("explode", "q1")


class LockTests(SynchronousTestCase):
    def test_exclusive(self) -> None:
        """While one holder has the lock, another cannot take it; after release it can."""
        path = Path(self.mktemp())
        fd = try_lock(path)
        self.assertIsNotNone(fd)
        assert fd is not None
        self.assertIsNone(try_lock(path))
        release_lock(fd)
        again = try_lock(path)
        self.assertIsNotNone(again)
        assert again is not None
        release_lock(again)
