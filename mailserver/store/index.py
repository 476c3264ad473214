# -*- test-case-name: tests.test_index -*-
"""
The per-user mailbox index (DESIGN.md §3): SQLite in WAL mode with C{synchronous=FULL}, in
C{index.sqlite} beside the user's Maildir++.

The index holds what maildir file names cannot: the folders with their UIDVALIDITY, UIDNEXT
and HIGHESTMODSEQ, and per message its UID (assigned in arrival order), flags and keywords,
MODSEQ, internal date and size. The files stay the truth for which messages exist: a file that
appears (a delivery into C{new/}, a file copied in by hand) gets the next UID when a session
looks (L{MailIndex.sync}); a file removed by hand disappears from the index; a lost or corrupt
index is rebuilt from the files with new UIDVALIDITYs.

Everything here blocks (SQLite, fsync, directory reads): call it from the I/O thread pool, one
thread at a time per user (L{mailserver.store.mailbox} holds a lock per user).

Crash safety of the mutations:
  - expunge: one transaction removes the messages from the index and records their files in
    C{unlink_pending}; the files are unlinked after the commit; C{sync} finishes pending
    unlinks first. A crash leaves all of the messages or none of them.
  - append: the file is written in C{tmp/} and fsynced, renamed into C{cur/}, C{cur/} fsynced,
    then indexed; a crash before the index commit leaves a file the next sync picks up.
  - move: rename into the target folder, fsync both directories, one transaction for both
    folders; after a crash the next sync of each folder sees where the file is.
  - flags: a transaction; flags live in the index (not in file names, so that a flag change
    costs no rename); a rebuilt index takes them from the file name's C{:2,} info part.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import os
import re
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from pathlib import Path
from typing import BinaryIO, Literal, NamedTuple

from mailserver.store.durable import atomic_write, fsync_dir, make_dirs_durably, write_new_file
from mailserver.store.maildir import unique_name

INBOX = "INBOX"
SEPARATOR = "/"
"""The hierarchy separator of folder names as this API and IMAP see them."""

SYSTEM_FLAGS = ("\\Answered", "\\Deleted", "\\Draft", "\\Flagged", "\\Seen")

# Maildir info letters (https://cr.yp.to/proto/maildir.html) and the IMAP flags they stand for.
_INFO_FLAGS = {
    "D": "\\Draft",
    "F": "\\Flagged",
    "P": "$Forwarded",
    "R": "\\Answered",
    "S": "\\Seen",
    "T": "\\Deleted",
}
_FLAG_INFO = {v: k for k, v in _INFO_FLAGS.items()}

_SCHEMA_VERSION = 4
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS folders (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    uidvalidity INTEGER NOT NULL,
    uidnext INTEGER NOT NULL,
    highestmodseq INTEGER NOT NULL,
    subscribed INTEGER NOT NULL DEFAULT 1,
    special_use TEXT NOT NULL DEFAULT '',
    cur_mtime INTEGER NOT NULL DEFAULT -1,
    recent_uid INTEGER NOT NULL DEFAULT 1
);
CREATE TABLE IF NOT EXISTS messages (
    folder INTEGER NOT NULL,
    uid INTEGER NOT NULL,
    base TEXT NOT NULL,
    filename TEXT NOT NULL,
    size INTEGER NOT NULL,
    internaldate INTEGER NOT NULL,
    flags TEXT NOT NULL,
    modseq INTEGER NOT NULL,
    PRIMARY KEY (folder, uid)
) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS messages_base ON messages (folder, base);
CREATE INDEX IF NOT EXISTS messages_modseq ON messages (folder, modseq);
CREATE TABLE IF NOT EXISTS expunged (
    folder INTEGER NOT NULL,
    uid INTEGER NOT NULL,
    modseq INTEGER NOT NULL,
    PRIMARY KEY (folder, uid)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS expunged_modseq ON expunged (folder, modseq);
CREATE TABLE IF NOT EXISTS subscriptions (name TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS parsed (
    folder INTEGER NOT NULL,
    uid INTEGER NOT NULL,
    envelope BLOB NOT NULL,
    body BLOB NOT NULL,
    bodystructure BLOB NOT NULL,
    PRIMARY KEY (folder, uid)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS unlink_pending (
    folder INTEGER NOT NULL,
    filename TEXT NOT NULL,
    PRIMARY KEY (folder, filename)
) WITHOUT ROWID;
"""

_MIGRATIONS = {
    # 1 -> 2: subscriptions by name, apart from the folders (RFC 3501 §6.3.6: a subscription
    # outlives its folder and may name one that does not exist); the \Recent marker.
    1: """
    CREATE TABLE IF NOT EXISTS subscriptions (name TEXT PRIMARY KEY) WITHOUT ROWID;
    INSERT OR IGNORE INTO subscriptions SELECT name FROM folders WHERE subscribed = 1;
    ALTER TABLE folders ADD COLUMN recent_uid INTEGER NOT NULL DEFAULT 1;
    """,
    # 2 -> 3: ENVELOPE, BODY and BODYSTRUCTURE of messages, computed once (IMAP FETCH).
    2: """
    CREATE TABLE IF NOT EXISTS parsed (
        folder INTEGER NOT NULL,
        uid INTEGER NOT NULL,
        envelope BLOB NOT NULL,
        body BLOB NOT NULL,
        bodystructure BLOB NOT NULL,
        PRIMARY KEY (folder, uid)
    ) WITHOUT ROWID;
    """,
    # 3 -> 4: what changed after a MODSEQ, found without reading the whole folder (the
    # incremental refresh of a selected IMAP session).
    3: """
    CREATE INDEX IF NOT EXISTS messages_modseq ON messages (folder, modseq);
    CREATE INDEX IF NOT EXISTS expunged_modseq ON expunged (folder, modseq);
    """,
}

_W_SIZE = re.compile(r",W=(\d+)")
_FOLDER_CHARS = re.compile(r"[\x00-\x1f\x7f]")
_MTIME_SLACK_NS = 2_000_000_000
"""A directory changed less than this long before we looked may change again within the same
mtime tick, so its mtime is not trusted as "unchanged since the last scan"."""


class FolderError(Exception):
    """A folder operation that cannot be done (no such folder, exists already, bad name)."""


class MessageInfo(NamedTuple):
    """One message of a folder, as the index knows it."""

    uid: int
    name: str
    """The maildir base name (before C{:2,}): unique in its folder and stable for ever."""
    filename: str
    """The file's name in C{cur/}."""
    size: int
    """Octets in the CRLF form that POP3 RETR and IMAP RFC822.SIZE report."""
    internaldate: int
    """Seconds since the epoch."""
    flags: frozenset[str]
    modseq: int


@dataclass(frozen=True, slots=True, weakref_slot=True)
class FolderState:
    """
    A folder's counters and its messages in UID order, at one instant. Immutable, so that the
    sessions that have the folder open share one (L{mailserver.store.mailbox.MailboxStore}
    keeps the newest per folder); a change makes a new one (L{apply_changes}).
    """

    name: str
    uidvalidity: int
    uidnext: int
    highestmodseq: int
    messages: tuple[MessageInfo, ...]
    uids: tuple[int, ...] = field(default=(), compare=False, repr=False)
    """The UIDs of C{messages}, in the same order (to find a message by bisection)."""

    def __post_init__(self) -> None:
        if len(self.uids) != len(self.messages):
            object.__setattr__(self, "uids", tuple(map(itemgetter(0), self.messages)))

    def find(self, uid: int) -> MessageInfo | None:
        """Message C{uid}, or None."""
        i = bisect.bisect_left(self.uids, uid)
        if i < len(self.uids) and self.uids[i] == uid:
            return self.messages[i]
        return None


@dataclass(frozen=True, slots=True)
class FolderInfo:
    name: str
    subscribed: bool
    special_use: str


@dataclass(frozen=True, slots=True)
class FlagChange:
    uid: int
    flags: frozenset[str]
    modseq: int


@dataclass(frozen=True, slots=True)
class Changes:
    """What changed in a folder after some MODSEQ (for CONDSTORE/QRESYNC and notifications)."""

    highestmodseq: int
    changed: tuple[MessageInfo, ...]
    """Messages added or with flags changed, in UID order."""
    expunged: tuple[int, ...]
    """UIDs removed, ascending."""


StoreMode = Literal["set", "add", "remove"]

_MANY_EXPUNGES = 64
"""Beyond this many expunges in one delta, filter the list once rather than delete each."""


def apply_changes(state: FolderState, changes: Changes, uidnext: int) -> FolderState:
    """
    The folder C{state} after C{changes} (what changed after C{state.highestmodseq}): a new
    L{FolderState} sharing the unchanged message records with C{state}. Costs a copy of the
    list of references plus a bisection per change; no message record is built.
    """
    uids = list(state.uids)
    messages = list(state.messages)
    if len(changes.expunged) > _MANY_EXPUNGES:
        gone = set(changes.expunged)
        keep = [i for i, uid in enumerate(uids) if uid not in gone]
        uids = [uids[i] for i in keep]
        messages = [messages[i] for i in keep]
    else:
        for uid in changes.expunged:
            i = bisect.bisect_left(uids, uid)
            if i < len(uids) and uids[i] == uid:
                del uids[i]
                del messages[i]
    for m in changes.changed:
        i = bisect.bisect_left(uids, m.uid)
        if i < len(uids) and uids[i] == m.uid:
            messages[i] = m
        else:  # a new message (at the end, but any place works)
            uids.insert(i, m.uid)
            messages.insert(i, m)
    return FolderState(
        state.name,
        state.uidvalidity,
        uidnext,
        changes.highestmodseq,
        tuple(messages),
        tuple(uids),
    )


_flag_cache: dict[str, frozenset[str]] = {"": frozenset()}


def _flags_from_text(text: str) -> frozenset[str]:
    flags = _flag_cache.get(text)
    if flags is None:
        flags = frozenset(text.split(" "))
        if len(_flag_cache) < 4096:
            _flag_cache[text] = flags
    return flags


def _flags_to_text(flags: Iterable[str]) -> str:
    return " ".join(sorted(set(flags)))


def flags_from_info(filename: str) -> frozenset[str]:
    """The flags a maildir file name's C{:2,} info part stands for."""
    _, sep, info = filename.partition(":2,")
    if not sep:
        return frozenset()
    return frozenset(_INFO_FLAGS[c] for c in info if c in _INFO_FLAGS)


def info_for_flags(flags: Iterable[str]) -> str:
    """The maildir C{:2,} info letters for C{flags} (keywords have none)."""
    return "".join(sorted(_FLAG_INFO[f] for f in flags if f in _FLAG_INFO))


def base_name(filename: str) -> str:
    """The unique part of a maildir file name (before the C{:} of the info)."""
    return filename.split(":", 1)[0]


def check_folder_name(name: str) -> str:
    """
    Validate a folder name (C{/}-separated, UTF-8) and return its canonical form (INBOX in any
    case is C{INBOX}).

    @raise FolderError: empty components, C{.} or C{..}, control characters, too long.
    """
    if name.upper() == INBOX:
        return INBOX
    parts = name.split(SEPARATOR)
    if (
        not name
        or len(name.encode("utf-8", "surrogatepass")) > 512
        or len(parts) > 16
        or any(p in ("", ".", "..") for p in parts)
        or _FOLDER_CHARS.search(name)
    ):
        raise FolderError(f"Invalid folder name: {name!r}")
    if parts[0].upper() == INBOX:
        parts[0] = INBOX
    return SEPARATOR.join(parts)


def folder_directory(root: Path, name: str) -> Path:
    """
    Where folder C{name} lives: the maildir root for INBOX, else the Maildir++ directory
    C{.A.B} for C{A/B}, with C{.}, C{%} and C{/}-free components escaped as C{%2E} and C{%25}.
    """
    if name == INBOX:
        return root
    parts = [p.replace("%", "%25").replace(".", "%2E") for p in name.split(SEPARATOR)]
    return root / ("." + ".".join(parts))


def _folder_name_of(dirname: str) -> str | None:
    """The folder name of Maildir++ directory C{dirname} (C{.A.B}), or None if it is not one."""
    if not dirname.startswith(".") or dirname in (".", ".."):
        return None
    parts = dirname[1:].split(".")
    if any(not p for p in parts):
        return None
    name = SEPARATOR.join(p.replace("%2E", ".").replace("%25", "%") for p in parts)
    try:
        return check_folder_name(name)
    except FolderError:
        return None


def rfc822_size(path: Path, filename: str) -> int:
    """
    The message's size in CRLF form: from the C{,W=} field of its name when present (as
    Dovecot writes it), else counted from the file (a bare LF counts as two octets).
    """
    m = _W_SIZE.search(filename)
    if m:
        return int(m.group(1))
    size = 0
    with open(path, "rb") as f:
        at_cr = False
        while chunk := f.read(256 * 1024):
            size += len(chunk) + chunk.count(b"\n") - chunk.count(b"\r\n")
            if at_cr and chunk.startswith(b"\n"):
                size -= 1
            at_cr = chunk.endswith(b"\r")
    return size


class MailIndex:
    """
    The index of one user's Maildir++ at C{root}. Blocking; not thread-safe: one thread at a
    time (the caller serializes per user).
    """

    def __init__(self, root: Path, now: Callable[[], float] = time.time) -> None:
        self.root = root
        self._now = now
        make_dirs_durably(root)
        for sub in ("cur", "new", "tmp"):
            make_dirs_durably(root / sub)
        for leftover in (root / "tmp").glob("deleted-*"):
            _remove_tree(leftover)  # a folder deletion a crash interrupted
        self.path = root / "index.sqlite"
        try:
            self._db = self._connect()
        except sqlite3.OperationalError:
            raise  # locked, unreadable: not a reason to throw the index away
        except sqlite3.DatabaseError:
            # A corrupt index: keep it aside for inspection, rebuild from the files.
            aside = self.path.with_name(f"index.sqlite.corrupt-{int(self._now())}")
            os.replace(self.path, aside)
            for suffix in ("-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(str(self.path) + suffix)
            self._db = self._connect()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=OFF")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                db.executescript(_SCHEMA)
                db.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
                version = _SCHEMA_VERSION
            while version in _MIGRATIONS:
                db.execute("BEGIN IMMEDIATE")
                try:
                    for statement in _MIGRATIONS[version].split(";"):
                        if statement.strip():
                            db.execute(statement)
                    version += 1
                    db.execute(f"PRAGMA user_version={version}")
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                db.execute("COMMIT")
            if version != _SCHEMA_VERSION:
                raise sqlite3.OperationalError(f"unknown index schema version {version}")
            db.execute("SELECT count(*) FROM folders").fetchone()
        except BaseException:
            db.close()
            raise
        self._db = db
        if self._folder_row(INBOX) is None:
            self._rebuild_folders()
        self._finish_renames()
        return db

    def close(self) -> None:
        self._db.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    # -- folders ---------------------------------------------------------------------------

    def _new_uidvalidity(self) -> int:
        """
        A UIDVALIDITY never used before in this maildir: the time in seconds, or one more than
        the last one handed out (kept in a small file that survives the loss of the index).
        """
        hint = self.root / "uidvalidity"
        last = 0
        with contextlib.suppress(FileNotFoundError, ValueError):
            last = int(hint.read_text().strip())
        value = max(int(self._now()), last + 1) & 0xFFFFFFFF or 1
        atomic_write(hint, f"{value}\n".encode())
        return value

    def _folder_row(self, name: str) -> tuple[int, int, int, int, int] | None:
        """(id, uidvalidity, uidnext, highestmodseq, cur_mtime) of folder C{name}."""
        row: tuple[int, int, int, int, int] | None = self._db.execute(
            "SELECT id, uidvalidity, uidnext, highestmodseq, cur_mtime FROM folders WHERE name = ?",
            (name,),
        ).fetchone()
        return row

    def _require_folder(self, name: str) -> tuple[int, int, int, int, int]:
        row = self._folder_row(check_folder_name(name))
        if row is None:
            raise FolderError(f"No such folder: {name}")
        return row

    def _insert_folder(self, db: sqlite3.Connection, name: str, special_use: str = "") -> None:
        db.execute(
            "INSERT INTO folders (name, uidvalidity, uidnext, highestmodseq, special_use)"
            " VALUES (?, ?, 1, 1, ?)",
            (name, self._new_uidvalidity(), special_use),
        )

    def _rebuild_folders(self) -> None:
        """A new index: INBOX and every Maildir++ folder directory found under the root."""
        names = [INBOX]
        with os.scandir(self.root) as entries:
            for entry in entries:
                name = _folder_name_of(entry.name)
                if name is not None and entry.is_dir() and (Path(entry.path) / "cur").is_dir():
                    names.append(name)
        with self._transaction() as db:
            for name in sorted(names):
                self._insert_folder(db, name)
                db.execute("INSERT OR IGNORE INTO subscriptions (name) VALUES (?)", (name,))

    def folders(self) -> list[FolderInfo]:
        """Every folder, INBOX first, then by name."""
        rows = self._db.execute(
            "SELECT f.name, s.name IS NOT NULL, f.special_use FROM folders f"
            " LEFT JOIN subscriptions s ON s.name = f.name ORDER BY f.name != 'INBOX', f.name"
        ).fetchall()
        return [FolderInfo(n, bool(s), u) for n, s, u in rows]

    def subscriptions(self) -> list[str]:
        """Every subscribed name, whether or not a folder of that name exists (LSUB)."""
        return [n for (n,) in self._db.execute("SELECT name FROM subscriptions ORDER BY name")]

    def create_folder(self, name: str, special_use: str = "") -> None:
        """
        Create folder C{name} (its maildir directories durably, then its index row).

        @raise FolderError: bad name, or it exists.
        """
        name = check_folder_name(name)
        if self._folder_row(name) is not None:
            raise FolderError(f"Folder exists: {name}")
        path = folder_directory(self.root, name)
        for sub in ("cur", "new", "tmp"):
            make_dirs_durably(path / sub)
        (path / "maildirfolder").touch()
        with self._transaction() as db:
            self._insert_folder(db, name, special_use)
            if special_use:
                # The folders every account starts with are shown by clients that list only
                # subscribed folders; a client's CREATE is followed by its own SUBSCRIBE.
                db.execute("INSERT OR IGNORE INTO subscriptions (name) VALUES (?)", (name,))

    def delete_folder(self, name: str) -> None:
        """
        Delete folder C{name} and its messages: its directory is first renamed out of the way
        (atomically, so a crash cannot leave half a folder that a rebuild would resurrect),
        then removed.
        """
        name = check_folder_name(name)
        if name == INBOX:
            raise FolderError("INBOX cannot be deleted")
        folder_id = self._require_folder(name)[0]
        path = folder_directory(self.root, name)
        trash = self.root / f"tmp/deleted-{folder_id}-{int(self._now() * 1000)}"
        if path.exists():
            os.rename(path, trash)
            fsync_dir(self.root)
        with self._transaction() as db:
            for table in ("messages", "expunged", "unlink_pending", "parsed"):
                db.execute(f"DELETE FROM {table} WHERE folder = ?", (folder_id,))  # noqa: S608
            db.execute("DELETE FROM folders WHERE id = ?", (folder_id,))
        _remove_tree(trash)

    def rename_folder(self, old: str, new: str) -> None:
        """
        Rename folder C{old} (and its subfolders) to C{new}; UIDVALIDITY and UIDs stay. (INBOX,
        whose rename in IMAP moves its messages, is the protocol layer's business.)
        """
        old = check_folder_name(old)
        new = check_folder_name(new)
        if INBOX in (old, new):
            raise FolderError("INBOX cannot be renamed here")
        self._require_folder(old)
        if self._folder_row(new) is not None:
            raise FolderError(f"Folder exists: {new}")
        prefix = old + SEPARATOR
        moving = [
            n
            for (n,) in self._db.execute("SELECT name FROM folders").fetchall()
            if n == old or n.startswith(prefix)
        ]
        pairs = [(name, new + name[len(old) :]) for name in moving]
        # The index first, with the directory renames it implies as a pending intent; then
        # the renames; a crash in between is rolled forward by the next open.
        with self._transaction() as db:
            for name, target in pairs:
                db.execute("UPDATE folders SET name = ? WHERE name = ?", (target, name))
                db.execute(
                    "UPDATE OR IGNORE subscriptions SET name = ? WHERE name = ?", (target, name)
                )
            db.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('rename_pending', ?)",
                (json.dumps(pairs),),
            )
        self._finish_renames()

    def _finish_renames(self) -> None:
        row = self._db.execute("SELECT value FROM meta WHERE key = 'rename_pending'").fetchone()
        if row is None:
            return
        for name, target in json.loads(row[0]):
            src = folder_directory(self.root, name)
            dst = folder_directory(self.root, target)
            if src.exists() and not dst.exists():
                os.rename(src, dst)
        fsync_dir(self.root)
        with self._transaction() as db:
            db.execute("DELETE FROM meta WHERE key = 'rename_pending'")

    def set_subscribed(self, name: str, subscribed: bool) -> None:
        """Subscribe to C{name} or not; the folder need not exist (RFC 3501 §6.3.6)."""
        name = check_folder_name(name)
        with self._transaction() as db:
            if subscribed:
                db.execute("INSERT OR IGNORE INTO subscriptions (name) VALUES (?)", (name,))
            else:
                db.execute("DELETE FROM subscriptions WHERE name = ?", (name,))

    def claim_recent(self, name: str) -> int:
        """
        A read-write SELECT claims the folder's new messages as recent for its session
        (RFC 3501 §2.3.2: one session sees a message as recent): returns the lowest UID that
        is recent for the caller (every UID at or above it), and moves the marker past
        UIDNEXT so that no other session sees them so.
        """
        folder_id = self._require_folder(name)[0]
        first, uidnext = self._db.execute(
            "SELECT recent_uid, uidnext FROM folders WHERE id = ?", (folder_id,)
        ).fetchone()
        if first >= uidnext:
            return int(first)  # nothing to claim: no transaction (each IMAP refresh asks)
        with self._transaction() as db:
            first, uidnext = db.execute(
                "SELECT recent_uid, uidnext FROM folders WHERE id = ?", (folder_id,)
            ).fetchone()
            db.execute("UPDATE folders SET recent_uid = ? WHERE id = ?", (uidnext, folder_id))
        return int(first)

    def unclaimed_from(self, name: str) -> int:
        """
        The lowest UID of folder C{name} that no session has claimed as recent (every UID at
        or above it is unclaimed); 0 if the folder is gone. Claims nothing (IMAP EXAMINE).
        """
        row = self._folder_row(check_folder_name(name))
        if row is None:
            return 0
        (first,) = self._db.execute(
            "SELECT recent_uid FROM folders WHERE id = ?", (row[0],)
        ).fetchone()
        return int(first)

    def ensure_folders_once(self, key: str, folders: Iterable[tuple[str, str]]) -> None:
        """
        Create the missing ones of C{folders} (name, special use), once per C{key} for this
        mailbox: a user who deletes one later does not get it back.
        """
        done = self._db.execute("SELECT 1 FROM meta WHERE key = ?", (key,)).fetchone()
        if done is not None:
            return
        existing = {f.name for f in self.folders()}
        for name, use in folders:
            if name not in existing:
                self.create_folder(name, use)
        with self._transaction() as db:
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, '1')", (key,))

    def recent_count(self, name: str) -> int:
        """Messages not yet claimed as recent by any session (STATUS RECENT)."""
        folder_id = self._require_folder(name)[0]
        (n,) = self._db.execute(
            "SELECT count(*) FROM messages m JOIN folders f ON f.id = m.folder"
            " WHERE m.folder = ? AND m.uid >= f.recent_uid",
            (folder_id,),
        ).fetchone()
        return int(n)

    # -- reading ---------------------------------------------------------------------------

    def state(self, name: str) -> FolderState:
        """The folder's counters and every message, in UID order (no file is read)."""
        folder_id, uidvalidity, uidnext, highestmodseq, _ = self._require_folder(name)
        rows = self._db.execute(
            "SELECT uid, base, filename, size, internaldate, flags, modseq FROM messages"
            " WHERE folder = ? ORDER BY uid",
            (folder_id,),
        ).fetchall()
        make = MessageInfo
        ff = _flags_from_text
        messages = tuple(make(u, b, fn, s, d, ff(fl), m) for u, b, fn, s, d, fl, m in rows)
        uids = tuple(map(itemgetter(0), rows))
        return FolderState(
            check_folder_name(name), uidvalidity, uidnext, highestmodseq, messages, uids
        )

    def status(self, name: str) -> tuple[int, int, int, int, int]:
        """(messages, octets, uidvalidity, uidnext, highestmodseq), without loading messages."""
        folder_id, uidvalidity, uidnext, highestmodseq, _ = self._require_folder(name)
        count, octets = self._db.execute(
            "SELECT count(*), coalesce(sum(size), 0) FROM messages WHERE folder = ?",
            (folder_id,),
        ).fetchone()
        return count, octets, uidvalidity, uidnext, highestmodseq

    def parsed(self, name: str, uids: Sequence[int]) -> dict[int, tuple[bytes, bytes, bytes]]:
        """
        The cached (ENVELOPE, BODY, BODYSTRUCTURE) of those of C{uids} that have them: a
        message file never changes, so what was computed from it once stays true.
        """
        folder_id = self._require_folder(name)[0]
        out: dict[int, tuple[bytes, bytes, bytes]] = {}
        for i in range(0, len(uids), 500):
            chunk = list(uids[i : i + 500])
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(
                "SELECT uid, envelope, body, bodystructure FROM parsed"  # noqa: S608
                f" WHERE folder = ? AND uid IN ({marks})",
                (folder_id, *chunk),
            )
            for uid, envelope, body, structure in rows:
                out[uid] = (bytes(envelope), bytes(body), bytes(structure))
        return out

    def remember_parsed(self, name: str, entries: dict[int, tuple[bytes, bytes, bytes]]) -> None:
        """Cache what L{parsed} returns (not durable on its own: it can be computed again)."""
        if not entries:
            return
        folder_id = self._require_folder(name)[0]
        with self._transaction() as db:
            db.executemany(
                "INSERT OR REPLACE INTO parsed (folder, uid, envelope, body, bodystructure)"
                " SELECT ?, ?, ?, ?, ? WHERE EXISTS"
                " (SELECT 1 FROM messages WHERE folder = ? AND uid = ?)",
                [(folder_id, uid, e, b, bs, folder_id, uid) for uid, (e, b, bs) in entries.items()],
            )

    def uidvalidity(self, name: str) -> int:
        return self._require_folder(name)[1]

    def unseen(self, name: str) -> int:
        folder_id = self._require_folder(name)[0]
        (n,) = self._db.execute(
            "SELECT count(*) FROM messages WHERE folder = ? AND flags NOT LIKE '%\\Seen%'",
            (folder_id,),
        ).fetchone()
        return int(n)

    def state_since(
        self, name: str, base: FolderState | None
    ) -> tuple[FolderState, Changes | None]:
        """
        The folder's state now, built from C{base} (an earlier state of it) and what changed
        since (C{base} itself when nothing did): reads only the changes. Without a usable
        C{base} (None, another UIDVALIDITY: the folder was recreated or the index rebuilt; a
        MODSEQ from the future), reads every message.

        @return: (the state, the changes from C{base} to it, or None when every message was
            read).
        """
        name = check_folder_name(name)
        folder_id, uidvalidity, uidnext, highestmodseq, _ = self._require_folder(name)
        if (
            base is None
            or base.name != name
            or base.uidvalidity != uidvalidity
            or base.highestmodseq > highestmodseq
        ):
            return self.state(name), None
        if base.highestmodseq == highestmodseq and base.uidnext == uidnext:
            return base, Changes(highestmodseq, (), ())
        changes = self._changes(folder_id, base.highestmodseq, highestmodseq)
        return apply_changes(base, changes, uidnext), changes

    def changes_since(self, name: str, modseq: int) -> Changes:
        """Messages added or changed, and UIDs expunged, after C{modseq} (index lookups)."""
        folder_id, _, _, highestmodseq, _ = self._require_folder(name)
        return self._changes(folder_id, modseq, highestmodseq)

    def _changes(self, folder_id: int, modseq: int, highestmodseq: int) -> Changes:
        """
        What changed in folder C{folder_id} after C{modseq}, read through the MODSEQ indexes
        (sorted here: an ORDER BY uid could make SQLite walk the whole folder in UID order).
        """
        rows = self._db.execute(
            "SELECT uid, base, filename, size, internaldate, flags, modseq"
            " FROM messages INDEXED BY messages_modseq WHERE folder = ? AND modseq > ?",
            (folder_id, modseq),
        ).fetchall()
        gone = self._db.execute(
            "SELECT uid FROM expunged INDEXED BY expunged_modseq WHERE folder = ? AND modseq > ?",
            (folder_id, modseq),
        ).fetchall()
        rows.sort()
        return Changes(
            highestmodseq,
            tuple(
                MessageInfo(u, b, fn, s, d, _flags_from_text(fl), m)
                for u, b, fn, s, d, fl, m in rows
            ),
            tuple(sorted(u for (u,) in gone)),
        )

    def message_path(self, name: str, info: MessageInfo) -> Path:
        return folder_directory(self.root, check_folder_name(name)) / "cur" / info.filename

    # -- synchronizing with the files ------------------------------------------------------

    def sync(self, name: str) -> bool:
        """
        Bring folder C{name} up to date with its files: finish pending unlinks, move new files
        from C{new/} to C{cur/} giving them UIDs in arrival order, and when C{cur/} has changed
        since the last look, index files that appeared and forget files that were removed.

        @return: whether anything changed.
        """
        name = check_folder_name(name)
        folder_id, _, _, _, cur_mtime = self._require_folder(name)
        path = folder_directory(self.root, name)
        self._finish_unlinks(folder_id, path)
        cur = path / "cur"
        arrived = self._take_new(folder_id, path)
        try:
            st = os.stat(cur)
        except FileNotFoundError:
            make_dirs_durably(cur)
            st = os.stat(cur)
        changed = bool(arrived)
        found: list[tuple[str, str]] = []
        vanished: list[int] = []
        renamed: list[tuple[str, str, str]] = []
        scanned = st.st_mtime_ns != cur_mtime
        if scanned:
            found, vanished, renamed = self._scan_cur(folder_id, cur)
            # The files just taken from new/ are in cur/ now: do not count them twice.
            taken = {entry[0] for entry in arrived}
            found = [(fn, base) for fn, base in found if base not in taken]
            changed = changed or bool(found or vanished or renamed)
        if not changed and not scanned:
            return False
        trusted = self._trusted_mtime(cur)
        with self._transaction() as db:
            row = self._folder_row(name)
            assert row is not None
            _, _, uidnext, modseq, _ = row
            modseq += 1
            entries = list(arrived)
            for fn, base in found:
                with contextlib.suppress(FileNotFoundError):
                    entries.append(_entry_for(cur, fn, base))
            entries.sort(key=_arrival_key)
            for base, fn, size, date, flags in entries:
                db.execute(
                    "INSERT OR IGNORE INTO messages"
                    " (folder, uid, base, filename, size, internaldate, flags, modseq)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (folder_id, uidnext, base, fn, size, date, flags, modseq),
                )
                uidnext += 1
            self._forget(db, folder_id, vanished, modseq)
            for base, fn, flags in renamed:
                db.execute(
                    "UPDATE messages SET filename = ?, flags = ?, modseq = ?"
                    " WHERE folder = ? AND base = ?",
                    (fn, flags, modseq, folder_id, base),
                )
            db.execute(
                "UPDATE folders SET uidnext = ?, highestmodseq = ?, cur_mtime = ? WHERE id = ?",
                (uidnext, modseq if changed else modseq - 1, trusted, folder_id),
            )
        return changed

    def _trusted_mtime(self, cur: Path) -> int:
        """C{cur/}'s mtime, or -1 (rescan next time) if it changed too recently to trust."""
        mtime = os.stat(cur).st_mtime_ns
        if self._now() * 1e9 - mtime < _MTIME_SLACK_NS:
            return -1
        return mtime

    def _take_new(self, folder_id: int, path: Path) -> list[tuple[str, str, int, int, str]]:
        """
        Move the files of C{new/} into C{cur/} (adding C{:2,}); return the entries (base,
        filename, size, internal date, flags) of those the index does not know yet.
        """
        new = path / "new"
        try:
            names = [n for n in os.listdir(new) if not n.startswith(".")]
        except FileNotFoundError:
            return []
        if not names:
            return []
        cur = path / "cur"
        out: list[tuple[str, str, int, int, str]] = []
        for n in names:
            base = base_name(n)
            fn = n if ":2," in n else base + ":2,"
            src = new / n
            try:
                st = os.stat(src)
                size = rfc822_size(src, n)
                os.rename(src, cur / fn)
            except FileNotFoundError:
                continue
            known = self._db.execute(
                "SELECT filename FROM messages WHERE folder = ? AND base = ?", (folder_id, base)
            ).fetchone()
            if known is not None:
                if known[0] != fn:
                    with contextlib.suppress(FileNotFoundError):
                        os.rename(cur / fn, cur / known[0])
                continue
            flags = _flags_to_text(flags_from_info(fn))
            out.append((base, fn, size, int(st.st_mtime), flags))
        return out

    def _scan_cur(
        self, folder_id: int, cur: Path
    ) -> tuple[list[tuple[str, str]], list[int], list[tuple[str, str, str]]]:
        """
        Compare C{cur/} with the index: (files not indexed, UIDs whose file is gone, files
        renamed by another program as (base, filename, flags)).
        """
        on_disk: dict[str, str] = {}
        with os.scandir(cur) as entries:
            for entry in entries:
                if not entry.name.startswith("."):
                    on_disk[base_name(entry.name)] = entry.name
        vanished: list[int] = []
        renamed: list[tuple[str, str, str]] = []
        rows = self._db.execute(
            "SELECT uid, base, filename, flags FROM messages WHERE folder = ?", (folder_id,)
        )
        for uid, base, filename, flags in rows:
            fn = on_disk.pop(base, None)
            if fn is None:
                vanished.append(uid)
            elif fn != filename:
                # Another program changed the file's info part: take its flags from it.
                old = flags_from_info(filename)
                now = flags_from_info(fn)
                merged = (_flags_from_text(flags) - old) | now
                renamed.append((base, fn, _flags_to_text(merged)))
        return [(fn, base) for base, fn in on_disk.items()], vanished, renamed

    def _forget(
        self, db: sqlite3.Connection, folder_id: int, uids: Sequence[int], modseq: int
    ) -> None:
        for uid in uids:
            db.execute("DELETE FROM messages WHERE folder = ? AND uid = ?", (folder_id, uid))
            db.execute("DELETE FROM parsed WHERE folder = ? AND uid = ?", (folder_id, uid))
            db.execute(
                "INSERT OR REPLACE INTO expunged (folder, uid, modseq) VALUES (?, ?, ?)",
                (folder_id, uid, modseq),
            )

    def _finish_unlinks(self, folder_id: int, path: Path) -> None:
        pending = self._db.execute(
            "SELECT filename FROM unlink_pending WHERE folder = ?", (folder_id,)
        ).fetchall()
        if not pending:
            return
        for (fn,) in pending:
            for sub in ("cur", "new"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path / sub / fn)
        fsync_dir(path / "cur")
        with self._transaction() as db:
            db.execute("DELETE FROM unlink_pending WHERE folder = ?", (folder_id,))

    # -- mutations -------------------------------------------------------------------------

    def store_flags(
        self,
        name: str,
        uids: Iterable[int],
        flags: Iterable[str],
        mode: StoreMode,
        unchanged_since: int | None = None,
    ) -> tuple[list[FlagChange], list[int]]:
        """
        Set, add or remove C{flags} on the messages C{uids} (unknown UIDs are skipped), in one
        transaction. With C{unchanged_since} (CONDSTORE), a message whose MODSEQ is greater is
        left alone and reported.

        @return: (the changes made, with their new MODSEQ; the UIDs refused by
            C{unchanged_since}).
        """
        folder_id = self._require_folder(name)[0]
        given = frozenset(flags)
        changes: list[FlagChange] = []
        refused: list[int] = []
        with self._transaction() as db:
            (modseq,) = db.execute(
                "SELECT highestmodseq FROM folders WHERE id = ?", (folder_id,)
            ).fetchone()
            modseq += 1
            for uid in uids:
                row = db.execute(
                    "SELECT flags, modseq FROM messages WHERE folder = ? AND uid = ?",
                    (folder_id, uid),
                ).fetchone()
                if row is None:
                    continue
                current = _flags_from_text(row[0])
                if unchanged_since is not None and row[1] > unchanged_since:
                    refused.append(uid)
                    continue
                if mode == "set":
                    updated = given
                elif mode == "add":
                    updated = current | given
                else:
                    updated = current - given
                if updated == current:
                    continue
                db.execute(
                    "UPDATE messages SET flags = ?, modseq = ? WHERE folder = ? AND uid = ?",
                    (_flags_to_text(updated), modseq, folder_id, uid),
                )
                changes.append(FlagChange(uid, updated, modseq))
            if changes:
                db.execute("UPDATE folders SET highestmodseq = ? WHERE id = ?", (modseq, folder_id))
        return changes, refused

    def expunge(self, name: str, uids: Iterable[int]) -> list[int]:
        """
        Remove the messages C{uids} (unknown ones are skipped): all of them or none. One
        transaction takes them out of the index and records their files as pending unlink;
        the files are unlinked after it.

        @return: the UIDs removed, ascending.
        """
        name = check_folder_name(name)
        folder_id = self._require_folder(name)[0]
        path = folder_directory(self.root, name)
        wanted = sorted(set(uids))
        removed: list[tuple[int, str]] = []
        with self._transaction() as db:
            for uid in wanted:
                row = db.execute(
                    "SELECT filename FROM messages WHERE folder = ? AND uid = ?",
                    (folder_id, uid),
                ).fetchone()
                if row is not None:
                    removed.append((uid, row[0]))
            if not removed:
                return []
            (modseq,) = db.execute(
                "SELECT highestmodseq FROM folders WHERE id = ?", (folder_id,)
            ).fetchone()
            modseq += 1
            self._forget(db, folder_id, [u for u, _ in removed], modseq)
            db.executemany(
                "INSERT OR IGNORE INTO unlink_pending (folder, filename) VALUES (?, ?)",
                [(folder_id, fn) for _, fn in removed],
            )
            db.execute("UPDATE folders SET highestmodseq = ? WHERE id = ?", (modseq, folder_id))
        before = os.stat(path / "cur").st_mtime_ns
        self._finish_unlinks(folder_id, path)
        self._note_own_change(folder_id, path / "cur", before)
        return [u for u, _ in removed]

    def _note_own_change(self, folder_id: int, cur: Path, before: int) -> None:
        """
        After our own change to C{cur/}, record its mtime so the next sync need not scan, if
        C{before} (its mtime just before our change) shows that no one else changed it since
        the last scan.
        """
        (old,) = self._db.execute(
            "SELECT cur_mtime FROM folders WHERE id = ?", (folder_id,)
        ).fetchone()
        if old == -1 or old != before:
            return  # a scan is due anyway (a change we have not seen may be pending)
        with self._transaction() as db:
            db.execute(
                "UPDATE folders SET cur_mtime = ? WHERE id = ?",
                (self._trusted_mtime(cur), folder_id),
            )

    def append(
        self,
        name: str,
        write: Callable[[BinaryIO], object],
        flags: Iterable[str] = (),
        internaldate: float | None = None,
        unique: Callable[[], str] | None = None,
    ) -> MessageInfo:
        """
        Add a message to folder C{name}, durably: C{write} fills a new file in C{tmp/} (in CRLF
        form), which is fsynced, given C{internaldate} as its mtime, renamed into C{cur/} (then
        fsynced), and indexed with the next UID.
        """
        name = check_folder_name(name)
        folder_id = self._require_folder(name)[0]
        path = folder_directory(self.root, name)
        stem = (unique or unique_name)()
        flag_set = frozenset(flags)
        tmp = path / "tmp" / stem
        size = write_new_file(tmp, write)
        if internaldate is not None:
            os.utime(tmp, (internaldate, internaldate))
        date = int(internaldate if internaldate is not None else os.stat(tmp).st_mtime)
        # The base name is everything before the info part (as base_name() and a sync see it).
        base = f"{stem},S={size},W={size}"
        filename = f"{base}:2,{info_for_flags(flag_set)}"
        before = os.stat(path / "cur").st_mtime_ns
        try:
            os.rename(tmp, path / "cur" / filename)
        except BaseException:
            os.unlink(tmp)
            raise
        fsync_dir(path / "cur")
        with self._transaction() as db:
            _, _, uidnext, modseq, _ = self._require_folder(name)
            modseq += 1
            db.execute(
                "INSERT INTO messages"
                " (folder, uid, base, filename, size, internaldate, flags, modseq)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (folder_id, uidnext, base, filename, size, date, _flags_to_text(flag_set), modseq),
            )
            db.execute(
                "UPDATE folders SET uidnext = ?, highestmodseq = ? WHERE id = ?",
                (uidnext + 1, modseq, folder_id),
            )
        self._note_own_change(folder_id, path / "cur", before)
        return MessageInfo(uidnext, base, filename, size, date, flag_set, modseq)

    def copy(
        self, name: str, uids: Iterable[int], target: str, move: bool = False
    ) -> list[tuple[int, int]]:
        """
        Copy (hard link) or move (rename) the messages C{uids} of folder C{name} into folder
        C{target}, keeping flags and internal dates; durably (both directories fsynced, one
        transaction for both folders).

        @return: (source UID, new UID in C{target}) pairs, in source UID order.
        """
        name = check_folder_name(name)
        target = check_folder_name(target)
        src_id = self._require_folder(name)[0]
        dst_id = self._require_folder(target)[0]
        src_cur = folder_directory(self.root, name) / "cur"
        dst_cur = folder_directory(self.root, target) / "cur"
        rows = []
        for uid in sorted(set(uids)):
            row = self._db.execute(
                "SELECT uid, base, filename, size, internaldate, flags FROM messages"
                " WHERE folder = ? AND uid = ?",
                (src_id, uid),
            ).fetchone()
            if row is not None:
                rows.append(row)
        if not rows:
            return []
        dst_before = os.stat(dst_cur).st_mtime_ns
        src_before = os.stat(src_cur).st_mtime_ns
        placed = []
        for uid, base, filename, size, date, flags in rows:
            new_base = base
            if (
                src_id == dst_id
                or self._db.execute(
                    "SELECT 1 FROM messages WHERE folder = ? AND base = ?", (dst_id, base)
                ).fetchone()
            ):
                new_base = unique_name()
            new_fn = new_base + filename[len(base) :]
            try:
                if move:
                    os.rename(src_cur / filename, dst_cur / new_fn)
                else:
                    _link_or_copy(src_cur / filename, dst_cur / new_fn)
            except FileNotFoundError:
                continue  # removed meanwhile; the next sync forgets it
            placed.append((uid, new_base, new_fn, size, date, flags))
        fsync_dir(dst_cur)
        if move:
            fsync_dir(src_cur)
        pairs: list[tuple[int, int]] = []
        with self._transaction() as db:
            _, _, uidnext, modseq, _ = self._require_folder(target)
            modseq += 1
            for uid, new_base, new_fn, size, date, flags in placed:
                db.execute(
                    "INSERT INTO messages"
                    " (folder, uid, base, filename, size, internaldate, flags, modseq)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (dst_id, uidnext, new_base, new_fn, size, date, flags, modseq),
                )
                pairs.append((uid, uidnext))
                uidnext += 1
            db.execute(
                "UPDATE folders SET uidnext = ?, highestmodseq = ? WHERE id = ?",
                (uidnext, modseq, dst_id),
            )
            if move and pairs:
                (src_modseq,) = db.execute(
                    "SELECT highestmodseq FROM folders WHERE id = ?", (src_id,)
                ).fetchone()
                self._forget(db, src_id, [u for u, _ in pairs], src_modseq + 1)
                db.execute(
                    "UPDATE folders SET highestmodseq = ? WHERE id = ?", (src_modseq + 1, src_id)
                )
        self._note_own_change(dst_id, dst_cur, dst_before)
        if move:
            self._note_own_change(src_id, src_cur, src_before)
        return pairs


def _entry_for(cur: Path, filename: str, base: str) -> tuple[str, str, int, int, str]:
    """(base, filename, size, internal date, flags) of a file found in C{cur/}."""
    path = cur / filename
    st = os.stat(path)
    return (
        base,
        filename,
        rfc822_size(path, filename),
        int(st.st_mtime),
        _flags_to_text(flags_from_info(filename)),
    )


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError as e:
        if isinstance(e, FileNotFoundError):
            raise
        tmp = dst.parent.parent / "tmp" / (dst.name.split(":", 1)[0] + ".copy")
        with open(src, "rb") as f:
            write_new_file(tmp, lambda out: _copy_stream(f, out))
        os.rename(tmp, dst)


def _copy_stream(src: BinaryIO, dst: BinaryIO) -> None:
    while chunk := src.read(256 * 1024):
        dst.write(chunk)


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


_ARRIVAL = re.compile(r"(\d+)\.M(\d+)")


def _arrival_key(entry: tuple[str, str, int, int, str]) -> tuple[int, int, str]:
    """Order of arrival: the delivery time in the name (seconds, microseconds) or the mtime."""
    m = _ARRIVAL.match(entry[0])
    if m:
        return int(m.group(1)), int(m.group(2)), entry[0]
    return entry[3], 0, entry[0]
