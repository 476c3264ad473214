# -*- test-case-name: tests.test_imap_search -*-
"""
SEARCH evaluation (RFC 3501 §6.4.4, RFC 7162 MODSEQ, RFC 5032 OLDER/YOUNGER) over the messages
of a selected mailbox. Keys that need only the index (flags, sizes, dates, UIDs) cost nothing;
header and text keys read the message file, once per message and search, through the
C{content} callable the caller gives.
"""

from __future__ import annotations

import datetime as dt
import email.utils
from collections.abc import Callable

from mailserver.imap.message import parse_addresses
from mailserver.imap.parser import (
    AgeKey,
    AllKey,
    AndKey,
    DateKey,
    FlagKey,
    HeaderKey,
    ModSeqKey,
    NotKey,
    OrKey,
    SearchKey,
    SeqKey,
    SizeKey,
    TextKey,
)
from mailserver.store.index import MessageInfo

Content = Callable[[MessageInfo], tuple[bytes, bytes]]
"""(header, body) octets of a message."""


class Matcher:
    """
    Decides which messages a search key matches.

    @param msn: the sequence number of a UID in the session.
    @param exists: messages in the session (for C{*} in sequence sets).
    @param top_uid: the highest UID in the session (C{*} in UID sets).
    @param content: reads a message's header and body (only for header and text keys).
    @param now: the time, for OLDER/YOUNGER.
    """

    def __init__(
        self,
        msn: Callable[[int], int],
        exists: int,
        top_uid: int,
        content: Content,
        now: float,
        recent: set[int] | frozenset[int] = frozenset(),
    ) -> None:
        self._msn = msn
        self._exists = exists
        self._top_uid = top_uid
        self._content = content
        self._now = now
        self._recent = recent
        self._cache: dict[int, tuple[bytes, bytes]] = {}

    def _text(self, info: MessageInfo) -> tuple[bytes, bytes]:
        found = self._cache.get(info.uid)
        if found is None:
            found = self._content(info)
            self._cache = {info.uid: found}  # one message at a time: memory stays bounded
        return found

    def matches(self, key: SearchKey, info: MessageInfo) -> bool:
        if isinstance(key, AllKey):
            return True
        if isinstance(key, AndKey):
            return all(self.matches(k, info) for k in key.keys)
        if isinstance(key, OrKey):
            return self.matches(key.left, info) or self.matches(key.right, info)
        if isinstance(key, NotKey):
            return not self.matches(key.key, info)
        if isinstance(key, FlagKey):
            if key.flag == "\\Recent":
                # RECENT, OLD and NEW: recent in this session (RFC 3501 §2.3.2).
                return (info.uid in self._recent) == key.present
            has = key.flag in info.flags or (
                not key.flag.startswith("\\")
                and key.flag.lower() in {f.lower() for f in info.flags}
            )
            return has == key.present
        if isinstance(key, SizeKey):
            return info.size > key.size if key.larger else info.size < key.size
        if isinstance(key, SeqKey):
            if key.uid:
                return key.sequence_set.contains(info.uid, self._top_uid)
            return key.sequence_set.contains(self._msn(info.uid), self._exists)
        if isinstance(key, ModSeqKey):
            return info.modseq >= key.modseq
        if isinstance(key, AgeKey):
            age = self._now - info.internaldate
            return age > key.seconds if key.older else age <= key.seconds
        if isinstance(key, DateKey):
            return self._date(key, info)
        if isinstance(key, HeaderKey):
            header, _ = self._text(info)
            return _header_contains(header, key.name, key.value)
        if isinstance(key, TextKey):
            header, body = self._text(info)
            needle = key.value.lower().encode("utf-8")
            if key.field == "BODY":
                return needle in body.lower()
            if key.field == "TEXT":
                return needle in header.lower() or needle in body.lower()
            if key.field in ("FROM", "TO", "CC", "BCC"):
                return _address_contains(header, key.field, key.value)
            return _header_contains(header, key.field, key.value)
        raise ValueError(f"unknown search key {key!r}")

    def _date(self, key: DateKey, info: MessageInfo) -> bool:
        if key.which.startswith("SENT"):
            header, _ = self._text(info)
            value = _header_value(header, "Date")
            try:
                parsed = email.utils.parsedate_to_datetime(value) if value else None
            except (TypeError, ValueError):
                parsed = None
            if parsed is None:
                return False
            day = parsed.date()
            which = key.which[4:]
        else:
            # The internal date's day in UTC (RFC 3501 leaves the zone to the server).
            day = dt.datetime.fromtimestamp(info.internaldate, dt.UTC).date()
            which = key.which
        if which == "BEFORE":
            return day < key.date
        if which == "ON":
            return day == key.date
        return day >= key.date


def _header_value(header: bytes, name: str) -> str | None:
    """The unfolded value of the first field C{name} of a header block."""
    target = name.lower().encode("ascii", "replace") + b":"
    lines = header.split(b"\n")
    for i, line in enumerate(lines):
        if line.lower().startswith(target):
            value = line[len(target) :]
            for more in lines[i + 1 :]:
                if more[:1] in (b" ", b"\t"):
                    value += b" " + more.strip()
                else:
                    break
            return value.strip().decode("utf-8", "replace")
    return None


def _header_contains(header: bytes, name: str, value: str) -> bool:
    """RFC 3501 HEADER: the field exists and contains C{value} (case-insensitive)."""
    target = name.lower().encode("ascii", "replace") + b":"
    needle = value.lower()
    lines = header.split(b"\n")
    for i, line in enumerate(lines):
        if line.lower().startswith(target):
            text = line[len(target) :]
            for more in lines[i + 1 :]:
                if more[:1] in (b" ", b"\t"):
                    text += b" " + more.strip()
                else:
                    break
            if needle in text.decode("utf-8", "replace").lower():
                return True
    return False


def _address_contains(header: bytes, name: str, value: str) -> bool:
    """
    FROM/TO/CC/BCC (RFC 3501 §6.4.4): the field's addresses as the envelope gives them
    (comments dropped, C{mailbox@host} rebuilt) or its raw text contain C{value}.
    """
    if _header_contains(header, name, value):
        return True
    raw = _header_value(header, name)
    if raw is None:
        return False
    needle = value.lower()
    for display, _route, mailbox, host in parse_addresses(raw.encode("utf-8", "replace")):
        parts = []
        if display:
            parts.append(display.decode("utf-8", "replace"))
        if mailbox is not None and host is not None:
            parts.append(f"{mailbox.decode('utf-8', 'replace')}@{host.decode('utf-8', 'replace')}")
        if any(needle in part.lower() for part in parts):
            return True
    return False
