# -*- test-case-name: tests.test_imap_selected -*-
"""
The selected mailbox as one IMAP session sees it (RFC 3501 §2.3.1.2, §7.4.1; RFC 7162).

A session numbers the messages it knows 1..N (message sequence numbers, MSN) in UID order, and
that numbering may change only when the session tells its client: C{* n EXPUNGE} (or
C{* VANISHED} with QRESYNC), C{* N EXISTS}, and C{* n FETCH (FLAGS ...)} for flags changed by
someone else. L{SelectedMailbox} keeps that view and turns a fresh L{FolderState} from the store,
with the L{Changes} that lead to it, into exactly those untagged responses (work in proportion to
the changes), holding back expunges while the command in progress may not announce them (FETCH,
STORE, SEARCH by sequence number: RFC 3501 §7.4.1).

The view shares the store's immutable L{FolderState} (the same object for every session on the
folder); a session keeps apart only what differs: the flags it set itself since its last look,
the messages expunged but not yet announced (while there are some, its own list of the messages
it numbers), its \\Recent set and the keywords it announced.

No I/O here: the session asks the store for a state and writes what this returns.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from operator import itemgetter

from mailserver.store.index import Changes, FolderState, MessageInfo

Range = tuple[int | None, int | None]
"""One element of a sequence set: (first, last), C{None} standing for C{*}."""


def flag_list(flags: Iterable[str]) -> str:
    """C{(\\Seen \\Flagged $Label)}: system flags first, then keywords, each sorted."""
    ordered = sorted(flags, key=lambda f: (not f.startswith("\\"), f.lower()))
    return "(" + " ".join(ordered) + ")"


def compress_uids(uids: Iterable[int]) -> str:
    """C{1:3,7,9:10}: a UID set in its shortest form (for VANISHED, COPYUID, SEARCH results)."""
    out: list[str] = []
    run_start: int | None = None
    prev = 0
    for uid in sorted(set(uids)):
        if run_start is None:
            run_start = prev = uid
        elif uid == prev + 1:
            prev = uid
        else:
            out.append(f"{run_start}:{prev}" if prev != run_start else str(run_start))
            run_start = prev = uid
    if run_start is not None:
        out.append(f"{run_start}:{prev}" if prev != run_start else str(run_start))
    return ",".join(out)


@dataclass(slots=True)
class Updates:
    """What to tell the client after a refresh, in the order it must be sent."""

    lines: list[bytes]
    expunged: list[int]
    """UIDs whose expunge was announced."""
    pending_expunges: bool
    """Some expunges are held back until a command that may announce them."""


class _Messages(Mapping[int, MessageInfo]):
    """The messages a session numbers, by UID, as it last saw them (no copy of its own)."""

    __slots__ = ("_box",)

    def __init__(self, box: SelectedMailbox) -> None:
        self._box = box

    def __getitem__(self, uid: int) -> MessageInfo:
        info = self._box._find(uid)
        if info is None:
            raise KeyError(uid)
        return info

    def __contains__(self, uid: object) -> bool:
        return isinstance(uid, int) and self._box._find(uid) is not None

    def __iter__(self) -> Iterator[int]:
        return iter(self._box.uids)

    def __len__(self) -> int:
        return len(self._box.uids)


class SelectedMailbox:
    """
    One session's view of its selected folder.

    @param state: the folder as the store saw it at SELECT.
    @param read_only: EXAMINE (or a SELECT of a read-only folder).
    @param condstore: the client enabled CONDSTORE or QRESYNC (MODSEQ in FETCH responses).
    @param qresync: the client enabled QRESYNC (VANISHED instead of EXPUNGE).
    """

    def __init__(
        self,
        state: FolderState,
        read_only: bool = False,
        condstore: bool = False,
        qresync: bool = False,
    ) -> None:
        self.name = state.name
        self.read_only = read_only
        self.condstore = condstore or qresync
        self.qresync = qresync
        self.uidvalidity = state.uidvalidity
        self.uidnext = state.uidnext
        self.highestmodseq = state.highestmodseq
        self.state = state
        """The store's state as of this session's last look (shared with other sessions)."""
        self._own: dict[int, MessageInfo] = {}  # flags this session set since its last look
        self._held: dict[int, MessageInfo] = {}  # expunged in the store, not yet announced
        self._uids: Sequence[int] = state.uids
        self._list: Sequence[MessageInfo] = state.messages
        self.messages: Mapping[int, MessageInfo] = _Messages(self)
        """The messages the session numbers, by UID."""
        self.recent: set[int] = set()
        """UIDs that are \\Recent in this session (RFC 3501 §2.3.2)."""
        self._recent_told = 0  # the last RECENT count the client was told
        self.keywords: set[str] = set()
        """Keywords announced in FLAGS (RFC 3501 §7.2.6)."""
        for m in state.messages:
            if m.flags:
                self.keywords.update(f for f in m.flags if not f.startswith("\\"))

    @property
    def uids(self) -> Sequence[int]:
        """The UIDs the session numbers 1..N (read only)."""
        return self._uids

    def infos(self) -> Iterator[MessageInfo]:
        """The messages the session numbers, in order, as it last saw them."""
        own = self._own
        if not own:
            return iter(self._list)
        return (own.get(m.uid, m) for m in self._list)

    def _find(self, uid: int) -> MessageInfo | None:
        info = self._own.get(uid)
        if info is not None:
            return info
        i = bisect.bisect_left(self._uids, uid)
        if i < len(self._uids) and self._uids[i] == uid:
            return self._list[i]
        return None

    def _renumber(self) -> None:
        """Number the store's state and the held-back expunged messages (shared when none)."""
        if not self._held:
            self._uids = self.state.uids
            self._list = self.state.messages
            return
        merged = sorted([*self.state.messages, *self._held.values()], key=itemgetter(0))
        self._list = merged
        self._uids = [m.uid for m in merged]

    def claim(self, recent_from: int) -> None:
        """
        Messages at or above C{recent_from} (0: none) are recent for this session: the ones
        a read-write SELECT claimed, or those no session has claimed yet for EXAMINE (which
        sees them as recent but leaves them so: RFC 3501 §2.3.2, §6.3.2). The SELECT or
        EXAMINE reply tells the count.
        """
        if recent_from:
            i = bisect.bisect_left(self.uids, recent_from)
            self.recent.update(self.uids[i:])
        self._recent_told = len(self.recent)

    def flags_of(self, uid: int) -> frozenset[str]:
        """A message's flags as this session shows them (with \\Recent)."""
        flags = self.messages[uid].flags
        return flags | {"\\Recent"} if uid in self.recent else flags

    def flags_lines(self) -> list[bytes]:
        """FLAGS and PERMANENTFLAGS, with the keywords in use."""
        system = "\\Answered \\Flagged \\Deleted \\Seen \\Draft"
        words = " ".join(sorted(self.keywords))
        every = f"{system} {words}".strip()
        perm = "()" if self.read_only else f"({every} \\*)"
        return [
            f"* FLAGS ({every})\r\n".encode(),
            f"* OK [PERMANENTFLAGS {perm}] Flags permitted\r\n".encode(),
        ]

    def learn_keywords(self, flags: Iterable[str]) -> list[bytes]:
        """Lines announcing keywords of C{flags} not announced yet (none when all are known)."""
        new = {f for f in flags if not f.startswith("\\")} - self.keywords
        if not new:
            return []
        self.keywords |= new
        return self.flags_lines()

    # -- numbers ---------------------------------------------------------------------------

    @property
    def exists(self) -> int:
        return len(self.uids)

    def msn(self, uid: int) -> int:
        """The sequence number of C{uid} (0 if the session does not know it)."""
        i = bisect.bisect_left(self.uids, uid)
        return i + 1 if i < len(self.uids) and self.uids[i] == uid else 0

    def resolve(self, ranges: Sequence[Range], uid: bool) -> list[int]:
        """
        The UIDs a sequence set (C{uid=False}: sequence numbers) or UID set names, ascending,
        without duplicates. C{*} is the last message (the highest UID for a UID set, and for
        an empty mailbox a UID set's C{*} matches nothing... except that C{n:*} always
        includes the highest UID, as RFC 3501 §6.4.8 asks).
        """
        if not self.uids:
            return []
        out: set[int] = set()
        if uid:
            top = self.uids[-1]
            for first, last in ranges:
                a = top if first is None else first
                b = top if last is None else last
                lo, hi = min(a, b), max(a, b)
                i = bisect.bisect_left(self.uids, lo)
                j = bisect.bisect_right(self.uids, hi)
                out.update(self.uids[i:j])
        else:
            n = len(self.uids)
            for first, last in ranges:
                a = n if first is None else first
                b = n if last is None else last
                lo, hi = max(1, min(a, b)), min(n, max(a, b))
                if lo <= hi:
                    out.update(self.uids[lo - 1 : hi])
        return sorted(out)

    def valid_msns(self, ranges: Sequence[Range]) -> bool:
        """Whether every sequence number of a sequence set exists (else the command is BAD)."""
        n = len(self.uids)
        for first, last in ranges:
            for value in (first, last):
                if value is not None and not 1 <= value <= n:
                    return False
        return True

    # -- changes ---------------------------------------------------------------------------

    def fetch_flags_line(self, info: MessageInfo, with_uid: bool) -> bytes:
        parts = []
        if with_uid:
            parts.append(f"UID {info.uid}")
        parts.append("FLAGS " + flag_list(self.flags_of(info.uid)))
        if self.condstore:
            parts.append(f"MODSEQ ({info.modseq})")
        return f"* {self.msn(info.uid)} FETCH ({' '.join(parts)})\r\n".encode()

    def update(
        self,
        state: FolderState,
        allow_expunge: bool,
        uid_command: bool,
        recent_from: int = 0,
        changes: Changes | None = None,
    ) -> Updates:
        """
        Take in the folder's new C{state} and return what to tell the client: EXPUNGE (or
        VANISHED) for messages gone (when C{allow_expunge}; else they stay, numbered, until a
        later update may announce them), FETCH FLAGS for messages whose flags someone changed,
        EXISTS when messages were added, each time followed by RECENT (also sent when expunges
        changed the count of recent messages, as Dovecot does); FLAGS and PERMANENTFLAGS first
        when a message shows a keyword the client was not told of.

        @param uid_command: the command in progress is a UID command (its FETCH responses
            carry the UID anyway).
        @param recent_from: the added messages at or above this UID (0: none) are recent for
            this session (L{claim}).
        @param changes: what changed from the state of the session's last look to C{state}
            (L{mailserver.store.mailbox.Folder.look}); without it, found by comparing every
            message.
        """
        if changes is None:
            changes = self._diff(state)
        lines: list[bytes] = []
        top = self.uids[-1] if self.uids else 0
        added: list[MessageInfo] = []
        flagged: list[MessageInfo] = []
        for m in changes.changed:
            if m.uid > top:
                added.append(m)
                lines.extend(self.learn_keywords(m.flags))
                continue
            old = self._find(m.uid)
            if old is None or m.uid in self._held:
                continue
            if m.flags != old.flags:
                lines.extend(self.learn_keywords(m.flags))
                flagged.append(m)
            elif self.condstore and m.modseq != old.modseq:
                flagged.append(m)
        for uid in changes.expunged:
            if uid <= top and uid not in self._held:
                info = self._find(uid)
                if info is not None:
                    self._held[uid] = info
        self.state = state
        self._own = {u: i for u, i in self._own.items() if i.modseq > state.highestmodseq}
        self._renumber()
        announced: list[int] = []
        if self._held and allow_expunge:
            announced = sorted(self._held)
            lines.extend(self._expunge_lines(announced))
            for uid in announced:
                self.recent.discard(uid)
            self._held.clear()
            self._renumber()
        # Flag changes of messages the session knows (and that still exist).
        for m in flagged:
            lines.append(self.fetch_flags_line(m, uid_command or self.qresync))
        if added:
            for m in added:
                if recent_from and m.uid >= recent_from:
                    self.recent.add(m.uid)
            lines.append(f"* {len(self.uids)} EXISTS\r\n".encode())
        if added or len(self.recent) != self._recent_told:
            lines.append(f"* {len(self.recent)} RECENT\r\n".encode())
            self._recent_told = len(self.recent)
        self.uidnext = max(self.uidnext, state.uidnext)
        self.highestmodseq = max(self.highestmodseq, state.highestmodseq)
        return Updates(lines, announced, bool(self._held))

    def _diff(self, state: FolderState) -> Changes:
        """The changes from this session's view to C{state}, by comparing every message."""
        now = set(state.uids)
        changed = []
        top = self.uids[-1] if self.uids else 0
        for m in state.messages:
            old = self._find(m.uid) if m.uid <= top else None
            if m.uid > top or (old is not None and (old.flags, old.modseq) != (m.flags, m.modseq)):
                changed.append(m)
        gone = tuple(u for u in self.uids if u not in now and u not in self._held)
        return Changes(state.highestmodseq, tuple(changed), gone)

    def _expunge_lines(self, uids: list[int]) -> list[bytes]:
        """Announce the expunge of C{uids} (ascending, all numbered now)."""
        if self.qresync:
            return [f"* VANISHED {compress_uids(uids)}\r\n".encode()]
        # Highest first: each EXPUNGE renumbers the messages after it, not those before.
        return [f"* {self.msn(uid)} EXPUNGE\r\n".encode() for uid in reversed(uids)]

    def own_flags(self, info: MessageInfo) -> None:
        """This session changed a message's flags itself (its STORE reply says so)."""
        if self._find(info.uid) is not None:
            self._own[info.uid] = info
