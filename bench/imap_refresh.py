#!/usr/bin/env python3
"""
IMAP refresh cost: what a selected session's NOOP (or IDLE wake) costs after another session
changed one message's flags, in a large folder.

Builds a maildir of --messages (100,000) files in C{cur/} directly (names with C{,W=} sizes),
indexes it once, then opens the folder twice through L{MailboxStore} (a real thread pool, as
the server runs it): session A sets a flag on one message, session B refreshes and turns the
result into its untagged responses (L{SelectedMailbox.update}). Reports the median and the
maximum of --rounds refreshes, in milliseconds. In-process; no network.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import react
from twisted.python.threadpool import ThreadPool

from mailserver.imap.selected import SelectedMailbox
from mailserver.store.index import MailIndex
from mailserver.store.mailbox import Folder, MailboxStore
from mailserver.store.maildir import mailbox_path

ACCOUNT = "bench@example.test"
BODY = b"From: a@example.test\r\nSubject: bench\r\n\r\nhello\r\n"


def build(root: Path, count: int) -> None:
    """A maildir of C{count} messages in C{cur/}, indexed once."""
    md = mailbox_path(root, ACCOUNT)
    for sub in ("cur", "new", "tmp"):
        (md / sub).mkdir(parents=True, exist_ok=True)
    size = len(BODY)
    base = 1_700_000_000
    for i in range(count):
        name = f"{base + i}.M{i}P1.bench,S={size},W={size}:2,"
        (md / "cur" / name).write_bytes(BODY)
    index = MailIndex(md, now=lambda: time.time() + 10)
    index.sync("INBOX")
    index.close()


async def refresh_once(folder: Folder, box: SelectedMailbox) -> None:
    if hasattr(folder, "look"):
        state, changes = await folder.look(claim_recent=True)
        box.update(state, True, False, folder.recent_from, changes)
    else:  # the code before incremental refreshes
        state = await folder.refresh(claim_recent=True)
        box.update(state, True, False, folder.recent_from)


async def measure(args: argparse.Namespace, root: Path) -> list[float]:
    pool = ThreadPool(1, 4, "bench-io")
    pool.start()
    try:
        store = MailboxStore(root, _reactor, pool)  # type: ignore[arg-type]
        a = await store.open_folder(ACCOUNT, "INBOX", lambda: None, claim_recent=True)
        b = await store.open_folder(ACCOUNT, "INBOX", lambda: None, claim_recent=True)
        box = SelectedMailbox(b.state)
        times: list[float] = []
        n = len(a.state.messages)
        for r in range(args.rounds):
            uid = a.state.messages[(r * 7919) % n].uid
            await a.store_flags([uid], ["\\Flagged"], "add" if r % 2 == 0 else "remove")
            t0 = time.perf_counter()
            await refresh_once(b, box)
            times.append(time.perf_counter() - t0)
        a.close()
        b.close()
        store.close()
        return times
    finally:
        pool.stop()


def main(reactor: Any, args: argparse.Namespace) -> Any:
    tmp = tempfile.TemporaryDirectory(dir=args.dir)
    root = Path(tmp.name)
    t0 = time.perf_counter()
    build(root, args.messages)
    print(f"built and indexed {args.messages} messages in {time.perf_counter() - t0:.1f} s")

    async def run() -> None:
        try:
            times = await measure(args, root)
        finally:
            tmp.cleanup()
        ms = [t * 1000 for t in times]
        print(
            f"refresh after one flag change, {args.messages} messages: "
            f"median {statistics.median(ms):.2f} ms, max {max(ms):.2f} ms ({len(ms)} rounds)"
        )

    return Deferred.fromCoroutine(run())


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--dir", default=None, help="where the temporary maildir goes")
    react(main, [ap.parse_args()])
