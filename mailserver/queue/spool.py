# -*- test-case-name: tests.test_spool -*-
"""
The outbound queue on disk (DESIGN.md §3). Blocking: call it from the I/O thread pool (the CLI
calls it directly).

Layout under C{<data_dir>/queue/}::

    <id>.msg      the message: our header block (C{prefix}) then the body, canonical CRLF;
                  as first written, followed by its envelope (L{TRAILER})
    <id>.env      its envelope and delivery state once they changed, JSON (L{encode_entry})
    .lock         flock()ed by the running server (the CLI asks it to find a live server)
    control/      requests of the CLI to the running server (L{write_request})
    corrupt/      envelopes that could not be read, moved aside for inspection

Writing a new entry is one file: the C{.msg} is created under its final name, filled with the
message, the envelope and a fixed-size trailer that gives both lengths, fsynced, and then the
directory is fsynced (shared between concurrent writers, L{DirectorySync}). The trailer is the
commit point: a C{.msg} without a C{.env} whose trailer is not complete and consistent is a
write that never finished (never acknowledged), and L{Spool.load} removes it; one whose trailer
is there but whose CRC does not match goes to C{corrupt/}. One file and one
fsync (on ext4 that fsync also commits the new directory entry, so the directory fsync that
follows finds nothing left to do) instead of two files, two renames and two journal commits:
the submission's reply waits for one commit, not two (docs/design.md, "Relay speed").

A later change of the state writes the C{.env} (temporary name, fsync, rename, directory
fsync); from then on it, not the trailer, is the entry's envelope. C{entry.size} always gives
the message's length: readers of the C{.msg} stop there. (Entries written before the trailer
existed have a C{.msg} that is the message alone and always a C{.env}: they read the same way.)
Removal unlinks the C{.msg} first (the entry is gone), then the C{.env}, then fsyncs the
directory; a C{.env} left without its C{.msg} is a removal half done, and is cleaned.

Crash window: a recipient that the next hop accepted, but whose "sent" record did not reach the
disk before a crash, is still pending after the restart and is sent again. A message is thus
delivered at worst twice, never lost. Notices owed to the sender are recorded with the result
that causes them and forgotten only once handed over, so they too are at worst sent twice.

Leftovers of a crash are cleaned by L{Spool.load}: temporary files, a C{.msg} with neither a
complete trailer nor a C{.env} (a submission that never committed), a C{.env} without its
C{.msg} (a removal half done). An envelope that cannot be read is moved with its message to
C{corrupt/} and reported; it never stops the start.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import struct
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal, cast

from mailserver.queue.dsn import read_original
from mailserver.queue.model import Notify, QueuedRecipient, Ret, Submission
from mailserver.store.body import MessageBody
from mailserver.store.durable import DirectorySync, fsync_dir, make_dirs_durably, write_new_file

FORMAT_VERSION = 1
"""The C{version} of the envelope files this code writes and reads."""

QUEUE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
"""What a queue id may look like: it names files, so no C{/}, no leading dot."""

ALL = "ALL"
"""The target of a control request that concerns every entry."""

State = Literal["pending", "sent", "failed"]
NoticeOwed = Literal["failure", "relayed"]

_STATES: tuple[str, ...] = ("pending", "sent", "failed")
_NOTICES: tuple[str, ...] = ("failure", "relayed")
_NOTIFY: tuple[str, ...] = ("SUCCESS", "FAILURE", "DELAY", "NEVER")
_ACTIONS: tuple[str, ...] = ("retry", "delete")

TRAILER = struct.Struct("<8sQII4s")
"""The end of a C{.msg} as first written: magic, the message's length, the envelope's length,
the CRC-32 of both, and an end mark. Fixed size, so that it is found by reading the last octets
of the file. The CRC is checked at load: before its fsync has returned, the kernel may write a
file's pages back in any order, so after a power cut a file never acknowledged could end with
its trailer and still miss pages before it."""
_MAGIC = b"MSQUEUE1"
_END = b"END\n"


class CorruptEntry(ValueError):
    """An envelope file that is not a complete, valid envelope of a known version."""


class UnknownEntry(KeyError):
    """No queue entry has this id."""


def valid_queue_id(queue_id: str) -> bool:
    """Whether C{queue_id} can name an entry (safe as a file name)."""
    return QUEUE_ID.fullmatch(queue_id) is not None


@dataclass(eq=False, slots=True)
class RecipientState:
    """One recipient of an entry and what has become of it."""

    rcpt: QueuedRecipient
    state: State = "pending"
    code: int = 0
    """The last reply code (0: no reply, see L{text})."""
    text: str = ""
    """The last reply text, or what went wrong locally."""
    host: str = ""
    """The host that gave the last reply."""
    expired: bool = False
    """Failed because the message stayed queued too long (the reply above is the last one)."""
    notice: NoticeOwed | None = None
    """A notice about this recipient owed to the sender and not yet handed over."""

    @property
    def address(self) -> str:
        return self.rcpt.address

    @property
    def domain(self) -> str:
        return self.rcpt.domain


@dataclass(slots=True)
class DomainState:
    """The retry state of one destination domain of one entry."""

    attempts: int = 0
    """Attempts that left recipients of this domain pending."""
    next_try: float = 0.0
    """POSIX time of the next attempt."""


@dataclass(eq=False)
class QueueEntry:
    """One queued message: envelope, per-recipient and per-domain state."""

    queue_id: str
    sender: str
    received: float
    recipients: list[RecipientState]
    envid: str | None = None
    ret: Ret | None = None
    smtputf8: bool = False
    eight_bit: bool = False
    size: int = 0
    delay_notified: bool = False
    domains: dict[str, DomainState] = field(default_factory=dict)
    """Destination domains with pending recipients."""
    removed: bool = False
    """In memory only: the entry has been deleted or removed; write nothing more for it."""

    @classmethod
    def from_submission(cls, submission: Submission, now: float) -> QueueEntry:
        """A new entry, every domain due at C{now}."""
        entry = cls(
            queue_id=submission.queue_id,
            sender=submission.sender,
            received=submission.received,
            recipients=[RecipientState(r) for r in submission.recipients],
            envid=submission.envid,
            ret=submission.ret,
            smtputf8=submission.smtputf8,
            eight_bit=submission.eight_bit,
        )
        entry.sync_domains(now)
        return entry

    def pending(self, domain: str | None = None) -> list[RecipientState]:
        """The recipients still to deliver (of C{domain}, when given)."""
        return [
            r
            for r in self.recipients
            if r.state == "pending" and (domain is None or r.domain == domain)
        ]

    def sync_domains(self, now: float) -> None:
        """Give every domain with pending recipients a state (due at C{now}), drop the others."""
        wanted = {r.domain for r in self.pending()}
        for domain in list(self.domains):
            if domain not in wanted:
                del self.domains[domain]
        for r in self.recipients:
            if r.state == "pending" and r.domain not in self.domains:
                self.domains[r.domain] = DomainState(0, now)

    @property
    def done(self) -> bool:
        """No recipient pending and no notice owed: the entry can go."""
        return all(r.state != "pending" and r.notice is None for r in self.recipients)


# -- the envelope format ---------------------------------------------------------------------


def encode_entry(entry: QueueEntry) -> bytes:
    """The C{.env} file of C{entry}: one JSON object, UTF-8 (see L{decode_entry})."""
    data = {
        "version": FORMAT_VERSION,
        "id": entry.queue_id,
        "sender": entry.sender,
        "received": entry.received,
        "envid": entry.envid,
        "ret": entry.ret,
        "smtputf8": entry.smtputf8,
        "eight_bit": entry.eight_bit,
        "size": entry.size,
        "delay_notified": entry.delay_notified,
        "recipients": [
            {
                "address": r.address,
                "notify": None if r.rcpt.notify is None else sorted(r.rcpt.notify),
                "orcpt": r.rcpt.orcpt,
                "state": r.state,
                "code": r.code,
                "text": r.text,
                "host": r.host,
                "expired": r.expired,
                "notice": r.notice,
            }
            for r in entry.recipients
        ],
        "domains": {
            d: {"attempts": s.attempts, "next_try": s.next_try} for d, s in entry.domains.items()
        },
    }
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"


def decode_entry(data: bytes, queue_id: str | None = None) -> QueueEntry:
    """
    Read a C{.env} file.

    @param queue_id: the id its file name gives, which it must carry.
    @raise CorruptEntry: not complete JSON, an unknown version, a missing or mistyped field.
    """
    try:
        obj = json.loads(data.decode("utf-8"))
        if not isinstance(obj, dict):
            raise CorruptEntry("not a JSON object")
        if obj.get("version") != FORMAT_VERSION:
            raise CorruptEntry(f"unknown format version {obj.get('version')!r}")
        entry = _entry_from(obj)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptEntry(f"unreadable: {e}") from e
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, CorruptEntry):
            raise
        raise CorruptEntry(f"bad field: {e!r}") from e
    if queue_id is not None and entry.queue_id != queue_id:
        raise CorruptEntry(f"id {entry.queue_id!r} does not match the file name")
    return entry


def _entry_from(obj: dict[str, Any]) -> QueueEntry:
    queue_id = _typed(obj["id"], str)
    if not valid_queue_id(queue_id):
        raise ValueError(f"bad id {queue_id!r}")
    ret = _optional(obj["ret"], str)
    if ret not in (None, "FULL", "HDRS"):
        raise ValueError(f"bad ret {ret!r}")
    recipients = [_recipient_from(_typed(r, dict)) for r in _typed(obj["recipients"], list)]
    domains = {
        _typed(d, str): DomainState(
            _typed(s["attempts"], int), float(_number(_typed(s, dict)["next_try"]))
        )
        for d, s in _typed(obj["domains"], dict).items()
    }
    return QueueEntry(
        queue_id=queue_id,
        sender=_typed(obj["sender"], str),
        received=float(_number(obj["received"])),
        recipients=recipients,
        envid=_optional(obj["envid"], str),
        ret=cast(Ret | None, ret),
        smtputf8=_typed(obj["smtputf8"], bool),
        eight_bit=_typed(obj["eight_bit"], bool),
        size=_typed(obj["size"], int),
        delay_notified=_typed(obj["delay_notified"], bool),
        domains=domains,
    )


def _recipient_from(obj: dict[str, Any]) -> RecipientState:
    notify_list = _optional(obj["notify"], list)
    notify: frozenset[Notify] | None = None
    if notify_list is not None:
        if not notify_list or any(n not in _NOTIFY for n in notify_list):
            raise ValueError(f"bad notify {notify_list!r}")
        notify = frozenset(cast(list[Notify], notify_list))
    state = _typed(obj["state"], str)
    if state not in _STATES:
        raise ValueError(f"bad state {state!r}")
    notice = _optional(obj["notice"], str)
    if notice is not None and notice not in _NOTICES:
        raise ValueError(f"bad notice {notice!r}")
    address = _typed(obj["address"], str)
    if "@" not in address:
        raise ValueError(f"bad address {address!r}")
    return RecipientState(
        rcpt=QueuedRecipient(address, notify, _optional(obj["orcpt"], str)),
        state=cast(State, state),
        code=_typed(obj["code"], int),
        text=_typed(obj["text"], str),
        host=_typed(obj["host"], str),
        expired=_typed(obj["expired"], bool),
        notice=cast(NoticeOwed | None, notice),
    )


def _typed(value: Any, kind: type[Any]) -> Any:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TypeError(f"expected {kind.__name__}, got {value!r}")
    return value


def _optional(value: Any, kind: type[Any]) -> Any:
    return None if value is None else _typed(value, kind)


def _number(value: Any) -> float | int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"expected a number, got {value!r}")
    return value


# -- the spool -------------------------------------------------------------------------------


@dataclass
class Loaded:
    """What L{Spool.load} found."""

    entries: list[QueueEntry]
    corrupt: list[tuple[str, str]]
    """C{(queue id, reason)} of the entries moved to C{corrupt/}."""
    cleaned: list[str]
    """Leftover files removed (temporary files, messages without an envelope)."""


class Spool:
    """
    The queue directory C{root}. Every method blocks on the disk.

    Changes to one entry must not run concurrently (the service runs them one at a time per
    entry); different entries may be written from several threads at once.
    """

    def __init__(self, root: Path, dir_sync: DirectorySync | None = None) -> None:
        self.root = root
        self.control = root / "control"
        self.corrupt = root / "corrupt"
        self.lock_path = root / ".lock"
        self._dir_sync = dir_sync if dir_sync is not None else DirectorySync()

    def prepare(self) -> None:
        """Create the directories (durably) if missing."""
        for d in (self.root, self.control, self.corrupt):
            make_dirs_durably(d)

    def message_path(self, queue_id: str) -> Path:
        return self.root / f"{queue_id}.msg"

    def envelope_path(self, queue_id: str) -> Path:
        return self.root / f"{queue_id}.env"

    def exists(self, queue_id: str) -> bool:
        return valid_queue_id(queue_id) and self.message_path(queue_id).exists()

    def store(self, entry: QueueEntry, prefix: bytes, body: MessageBody) -> int:
        """
        Write a new entry: its C{.msg} with the message, the envelope and the L{TRAILER}, fsynced,
        then sync the directory. Returns once the entry is durable; sets and returns
        C{entry.size} (the message's length).

        @raise FileExistsError: an entry with this id exists.
        @raise ValueError: the id cannot name a file.
        """
        queue_id = entry.queue_id
        if not valid_queue_id(queue_id):
            raise ValueError(f"bad queue id {queue_id!r}")
        if self.envelope_path(queue_id).exists():
            raise FileExistsError(f"queue entry {queue_id} exists")
        entry.size = len(prefix) + body.size
        envelope = encode_entry(entry)

        def write(f: BinaryIO) -> None:
            summing = _Summing(f)
            summing.write(prefix)
            body.write_to(cast(BinaryIO, summing))
            summing.write(envelope)
            f.write(TRAILER.pack(_MAGIC, entry.size, len(envelope), summing.crc, _END))

        path = self.message_path(queue_id)
        written = write_new_file(path, write)  # O_EXCL: an existing .msg raises
        if written != entry.size + len(envelope) + TRAILER.size:
            _unlink_quietly(path)
            raise OSError(f"queue entry {queue_id}: the message changed while being written")
        try:
            self._adopt(path)
        except BaseException:
            _unlink_quietly(path)
            raise
        self._dir_sync.changed(self.root)
        return entry.size

    def save(self, entry: QueueEntry) -> None:
        """Replace the C{.env} of C{entry} with its current state, durably."""
        self.save_encoded(entry.queue_id, encode_entry(entry))

    def save_encoded(self, queue_id: str, data: bytes) -> None:
        """Replace the C{.env} of C{queue_id} with C{data} (from L{encode_entry}), durably."""
        self._replace(self.envelope_path(queue_id), lambda f: f.write(data))
        self._dir_sync.changed(self.root)

    def remove(self, queue_id: str) -> bool:
        """
        Remove an entry: C{.msg} first (the entry is gone), then C{.env}, then sync the directory.

        @return: whether there was an entry.
        """
        return self.remove_many([queue_id])[0]

    def remove_many(self, queue_ids: Sequence[str]) -> list[bool]:
        """L{remove} several entries with one directory sync; whether each was there."""
        existed = []
        for queue_id in queue_ids:
            existed.append(_unlink_quietly(self.message_path(queue_id)))
            _unlink_quietly(self.envelope_path(queue_id))
        self._dir_sync.changed(self.root)
        return existed

    def read(self, queue_id: str) -> QueueEntry:
        """
        One entry's envelope, as on disk: its C{.env}, or else the one its C{.msg} ends with.

        @raise UnknownEntry: no such entry (or one still being written).
        @raise CorruptEntry: its envelope cannot be read.
        """
        if not valid_queue_id(queue_id):
            raise UnknownEntry(queue_id)
        if not self.message_path(queue_id).exists():
            raise UnknownEntry(queue_id)
        data: bytes | None
        try:
            data = self.envelope_path(queue_id).read_bytes()
        except FileNotFoundError:
            try:
                data = read_trailing_envelope(self.message_path(queue_id))
            except FileNotFoundError:
                data = None
        if data is None:
            raise UnknownEntry(queue_id)
        return decode_entry(data, queue_id)

    def header_block(self, entry: QueueEntry) -> bytes:
        """The header section of an entry's message (up to the empty line, at most 256 KiB)."""
        return read_header_block(self.message_path(entry.queue_id), entry.size)

    def scan(self) -> tuple[list[QueueEntry], list[tuple[str, str]]]:
        """
        Read every entry without changing anything (for the CLI).

        @return: the readable entries (oldest first) and C{(queue id, reason)} of the others.
        """
        entries: list[QueueEntry] = []
        bad: list[tuple[str, str]] = []
        try:
            names = set(os.listdir(self.root))
        except FileNotFoundError:
            return [], []
        for name in sorted(names):
            queue_id = name.removesuffix(".msg")
            if name.startswith(".") or queue_id == name or not valid_queue_id(queue_id):
                continue
            try:
                entries.append(self.read(queue_id))
            except UnknownEntry:
                continue
            except (CorruptEntry, OSError) as e:
                bad.append((queue_id, str(e)))
        entries.sort(key=lambda e: (e.received, e.queue_id))
        return entries, bad

    def load(self) -> Loaded:
        """
        Read every entry at start: clean up what a crash left behind, move unreadable envelopes
        to C{corrupt/}. Must not run while entries are being written.
        """
        self.prepare()
        names = set(os.listdir(self.root))
        loaded = Loaded([], [], [])
        changed = False
        for name in sorted(names):
            path = self.root / name
            if name.startswith(".") and name.endswith(".tmp"):
                changed |= _unlink_quietly(path)
                loaded.cleaned.append(name)
                continue
            stem, dot, ext = name.rpartition(".")
            if not dot or not valid_queue_id(stem) or name.startswith("."):
                continue
            if ext == "env" and f"{stem}.msg" not in names:
                changed |= _unlink_quietly(path)
                loaded.cleaned.append(name)
            elif ext == "msg":
                problem = self._load_one(stem, f"{stem}.env" in names, loaded)
                if problem == _UNCOMMITTED:
                    changed |= _unlink_quietly(path)
                    loaded.cleaned.append(name)
                elif problem is not None:
                    self._move_aside(stem)
                    loaded.corrupt.append((stem, problem))
                    changed = True
        if changed:
            fsync_dir(self.root)
        loaded.entries.sort(key=lambda e: (e.received, e.queue_id))
        return loaded

    def _load_one(self, queue_id: str, has_envelope: bool, loaded: Loaded) -> str | None:
        """Read one entry into C{loaded}; return what is wrong with it, if anything."""
        path = self.message_path(queue_id)
        try:
            if has_envelope:
                entry = decode_entry(self.envelope_path(queue_id).read_bytes(), queue_id)
            else:
                data = read_trailing_envelope(path, verify=True)
                if data is None:
                    return _UNCOMMITTED
                entry = decode_entry(data, queue_id)
            if os.stat(path).st_size < entry.size:
                return "message file shorter than its envelope says"
        except (CorruptEntry, OSError) as e:
            return str(e)
        loaded.entries.append(entry)
        return None

    def _move_aside(self, queue_id: str) -> None:
        """Move an entry's files into C{corrupt/} (under a new name if one is taken)."""
        suffix = ""
        while (self.corrupt / f"{queue_id}{suffix}.env").exists():
            suffix = f".{secrets.token_hex(3)}"
        for ext in ("env", "msg"):
            try:
                os.rename(
                    self.root / f"{queue_id}.{ext}", self.corrupt / f"{queue_id}{suffix}.{ext}"
                )
            except FileNotFoundError:
                pass
        fsync_dir(self.corrupt)

    def _replace(self, path: Path, write: Any) -> int:
        """Write C{path} under a temporary name, fsync, rename into place (no directory sync)."""
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        size = write_new_file(tmp, write)
        try:
            self._adopt(tmp)
            os.rename(tmp, path)
        except BaseException:
            _unlink_quietly(tmp)
            raise
        return size

    def _adopt(self, path: Path) -> None:
        """
        Give a file written by root (the CLI run by an admin) to the queue's owner, so that the
        server, running as that user, can still read it.
        """
        if os.geteuid() != 0:
            return
        st = os.stat(self.root)
        if st.st_uid != 0:
            os.chown(path, st.st_uid, st.st_gid)

    # -- control requests (the CLI to a running server) --

    def write_request(self, action: str, target: str) -> Path:
        """
        Leave a request for the running server in C{control/}: C{retry.<id|ALL>.<random>} or
        C{delete.<id>.<random>}, written under a temporary name and renamed, so the server
        never sees half of one. The server unlinks it once it has acted.
        """
        if action not in _ACTIONS or not (target == ALL or valid_queue_id(target)):
            raise ValueError(f"bad request {action} {target}")
        name = f"{action}.{target}.{secrets.token_hex(6)}"
        tmp = self.control / f".{name}.tmp"
        write_new_file(tmp, lambda f: f.write(b""))
        os.rename(tmp, self.control / name)
        return self.control / name

    def requests(self) -> list[tuple[str, str, str]]:
        """The pending control requests as C{(file name, action, target)}, oldest name first."""
        found: list[tuple[str, str, str]] = []
        try:
            names = os.listdir(self.control)
        except FileNotFoundError:
            return found
        for name in sorted(names):
            parsed = parse_request(name)
            if parsed is not None:
                found.append((name, *parsed))
        return found

    def finish_request(self, name: str) -> None:
        """A request has been acted on: remove its file."""
        _unlink_quietly(self.control / name)


def parse_request(name: str) -> tuple[str, str] | None:
    """C{(action, target)} of a control request file name, or None when it is not one."""
    if name.startswith("."):
        return None
    action, _, rest = name.partition(".")
    target, dot, token = rest.rpartition(".")
    if action not in _ACTIONS or not dot or not token:
        return None
    if target != ALL and not valid_queue_id(target):
        return None
    return action, target


def read_header_block(path: Path, size: int) -> bytes:
    """The header section of the message file C{path} of C{size} octets (L{dsn.read_original})."""
    return read_original(path, size, full=False)[0]


_UNCOMMITTED = "uncommitted"


def read_trailing_envelope(path: Path, verify: bool = False) -> bytes | None:
    """
    The envelope a C{.msg} ends with (see L{TRAILER}), or None when the file does not end with
    a complete, consistent trailer: a write that never finished.

    @param verify: also check the CRC of the message and envelope (reads the whole file).
    @raise CorruptEntry: C{verify} and the CRC does not match.
    """
    with open(path, "rb") as f:
        length = os.fstat(f.fileno()).st_size
        if length < TRAILER.size:
            return None
        f.seek(length - TRAILER.size)
        magic, size, envelope_length, crc, end = TRAILER.unpack(f.read(TRAILER.size))
        if magic != _MAGIC or end != _END or size + envelope_length + TRAILER.size != length:
            return None
        got = 0
        if verify:
            f.seek(0)
            left = size
            while left > 0:
                chunk = f.read(min(left, 1024 * 1024))
                if not chunk:
                    return None
                got = zlib.crc32(chunk, got)
                left -= len(chunk)
        f.seek(size)
        data = f.read(envelope_length)
        if len(data) != envelope_length:
            return None
        if verify and zlib.crc32(data, got) != crc:
            raise CorruptEntry("message file does not match its checksum")
        return data


class _Summing:
    """A file being written, and the CRC-32 of what went through it."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.crc = 0

    def write(self, data: bytes) -> int:
        self.crc = zlib.crc32(data, self.crc)
        return self._f.write(data)

    def writelines(self, lines: Iterable[bytes]) -> None:
        for data in lines:
            self.write(data)


def mark_due(entries: Iterable[QueueEntry], now: float) -> None:
    """Make every pending domain of C{entries} due at C{now} (C{queue retry})."""
    for entry in entries:
        for state in entry.domains.values():
            state.next_try = now


# -- the lock --------------------------------------------------------------------------------


def try_lock(path: Path) -> int | None:
    """
    Take the exclusive C{flock} on C{path} (created if missing) without waiting.

    @return: the open descriptor holding it, or None when another holder has it.
    """
    # Read-only and world-readable: flock needs no more, and a lock file first made by the CLI
    # run as root must still open for the server's user.
    fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def release_lock(fd: int) -> None:
    """Let go of a lock from L{try_lock}."""
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _unlink_quietly(path: Path) -> bool:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True
