# -*- test-case-name: tests.test_queue_service -*-
"""
L{QueueService}: the outbound queue as a running service (L{IQueue}). It joins the spool (disk,
in the I/O thread pool), the scheduler (when to try what), the delivery side (L{IOutbound}) and
the notices (L{dsn}, handed to a C{notify} callable).

Order of things, for durability: a submission fires only once its entry is on disk; an
attempt's results are written before the entry is removed or any notice about them leaves; a
notice owed is written down with the result that causes it and forgotten only once handed over.
Every write of one entry runs after the previous one (a lock per entry), so the newest state is
the one on disk.

While running, the service holds an exclusive C{flock} on C{queue/.lock}: the C{mailserver queue}
command takes it to know whether a server is live. If one is, the command leaves requests in
C{queue/control/}, which the service looks at once a second (one C{stat} of the directory while
nothing changes), acts on, and unlinks.
"""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, DeferredLock, succeed
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from typing_extensions import override
from zope.interface import implementer

from mailserver import log
from mailserver.config import QueueConfig
from mailserver.interfaces import IOutbound, IQueue
from mailserver.queue import dsn
from mailserver.queue.model import Outgoing, RcptResult, Submission
from mailserver.queue.scheduler import Job, Scheduler, Settlement
from mailserver.queue.spool import (
    ALL,
    Loaded,
    NoticeOwed,
    QueueEntry,
    RecipientState,
    Spool,
    encode_entry,
    release_lock,
    try_lock,
    valid_queue_id,
)
from mailserver.store.body import MessageBody

T = TypeVar("T")

MEMORY_COPY_LIMIT = 256 * 1024
"""Messages up to this size queued by this process are kept in memory for their delivery."""
MEMORY_HELD_LIMIT = 32 * 1024 * 1024
"""At most this much in such copies; messages beyond it are read from their file."""

Notifier = Callable[[str, str, bytes], Deferred[None]]
"""C{notify(notice_id, recipient, message)}: hand a notice over (delivered locally or queued
with the null sender); fires once it is durable somewhere."""

CONTROL_INTERVAL = 1.0
"""Seconds between looks at C{queue/control/}."""
_RECENT = 2.0  # a directory mtime younger than this is not trusted to show every change


class QueueLocked(RuntimeError):
    """Another process (a running server) holds the queue's lock."""


@implementer(IQueue)
class QueueService(Service):
    """
    The outbound queue under C{root} (C{<data_dir>/queue}).

    @param outbound: delivers to next hops.
    @param notify: hands notices over (L{Notifier}).
    @param hostname: ours, for notices (C{Reporting-MTA}, C{From: MAILER-DAEMON@...}).
    @param reactor: an C{IReactorTime} that is also C{IReactorFromThreads}.
    @param pool: the I/O thread pool: every disk access of the queue runs there.
    @param grace: seconds a stop waits for attempts in flight to be recorded.

    A stopped service is not started again (make a new one); C{submit} still works after a
    stop (the SMTP sessions being drained need it): the entry is written and waits for the
    next start.
    """

    def __init__(
        self,
        root: Path,
        settings: QueueConfig,
        outbound: IOutbound,
        notify: Notifier,
        hostname: str,
        reactor: IReactorTime,
        pool: ThreadPool,
        grace: float = 30.0,
    ) -> None:
        self.spool = Spool(root)
        self.settings = settings
        self._outbound = outbound
        self._notify = notify
        self._hostname = hostname
        self._clock = reactor
        self._threads = cast(IReactorFromThreads, reactor)
        self._pool = pool
        self._grace = grace
        self.scheduler = Scheduler(settings, reactor, self._send, self._settle)
        self._entries: dict[str, QueueEntry] = {}  # every entry on disk
        self._locks: dict[str, DeferredLock] = {}
        self._noticing: dict[str, bool] = {}  # queue id -> another notice pass wanted
        self._copies: dict[str, bytes] = {}  # queue id -> the .msg content, small ones
        self._held = 0  # octets in _copies
        self._lock_fd: int | None = None
        self._loaded = False
        self._load_waiters: list[Deferred[None]] = []
        self._control_loop: LoopingCall | None = None
        self._control_mtime: int | None = None
        self._handling: set[str] = set()
        self._notices = itertools.count(1)
        self._removals: list[tuple[str, Deferred[None]]] = []  # the next batch to remove
        self._removing = False  # a batch is being removed

    # -- the service --

    @override
    def startService(self) -> None:
        """
        Take the queue's lock, then load the spool in the pool and schedule every entry.

        @raise QueueLocked: another server runs on this queue.
        """
        self.spool.root.mkdir(parents=True, exist_ok=True)
        fd = try_lock(self.spool.lock_path)
        if fd is None:
            raise QueueLocked(f"{self.spool.lock_path} is held by another process")
        self._lock_fd = fd
        Service.startService(self)
        d = self._in_pool(self.spool.load)
        d.addCallbacks(self._start, self._load_failed)

    @override
    def stopService(self) -> Deferred[None]:
        """Start no new attempt; wait (at most C{grace}) for those in flight; let go the lock."""
        Service.stopService(self)
        if self._control_loop is not None and self._control_loop.running:
            self._control_loop.stop()
        d: Deferred[None] = Deferred.fromCoroutine(self._stop())
        return d

    async def _stop(self) -> None:
        done: Deferred[None] = Deferred()

        def end(_: object = None) -> None:
            if not done.called:
                done.callback(None)

        # Attempts still in flight after the grace period are tried again at the next start.
        timer = self._clock.callLater(self._grace, end)
        self.scheduler.stop().addBoth(end)
        try:
            await done
        finally:
            if timer.active():
                timer.cancel()
            if self._lock_fd is not None:
                release_lock(self._lock_fd)
                self._lock_fd = None

    def _start(self, loaded: Loaded) -> None:
        for queue_id, reason in loaded.corrupt:
            log.queue_corrupt(queue_id, reason)
        pending = []
        for entry in loaded.entries:
            self._entries[entry.queue_id] = entry
            if entry.pending():
                pending.append(entry)
            if any(r.notice is not None for r in entry.recipients) or not entry.pending():
                self._spawn(self._notices_and_cleanup(entry), entry.queue_id)
        self._ready()
        if not self.running:
            return
        self.scheduler.add_many(pending)
        loop = self._control_loop = LoopingCall(self._poll_control)
        loop.clock = self._clock
        loop.start(CONTROL_INTERVAL, now=True).addErrback(log.queue_error, "", "control")

    def _load_failed(self, failure: Failure) -> None:
        log.queue_error(failure, "", "loading the queue")
        self._ready()

    def _ready(self) -> None:
        self._loaded = True
        waiters, self._load_waiters = self._load_waiters, []
        for d in waiters:
            d.callback(None)

    def _wait_loaded(self) -> Deferred[None]:
        if self._loaded:
            return succeed(None)
        if not self.running:
            raise RuntimeError("the queue service is not started")
        d: Deferred[None] = Deferred()
        self._load_waiters.append(d)
        return d

    # -- IQueue --

    def submit(self, submission: Submission, prefix: bytes, body: MessageBody) -> Deferred[None]:
        """
        Write the entry (C{prefix} then C{body}) durably, log it, schedule it (at once unless
        its domain is held). Works after a stop too: the entry waits for the next start.
        """
        return Deferred.fromCoroutine(self._submit(submission, prefix, body))

    async def _submit(self, submission: Submission, prefix: bytes, body: MessageBody) -> None:
        qid = submission.queue_id
        if not valid_queue_id(qid):
            raise ValueError(f"bad queue id {qid!r}")
        if not submission.recipients:
            raise ValueError("no recipients")
        await self._wait_loaded()
        if qid in self._entries:
            raise ValueError(f"queue id {qid} is in use")
        entry = QueueEntry.from_submission(submission, self._clock.seconds())
        self._entries[qid] = entry
        try:
            await self._locked(entry, lambda: self._in_pool(self.spool.store, entry, prefix, body))
        except BaseException:
            del self._entries[qid]
            raise
        log.queued(qid, entry.sender, [r.address for r in entry.recipients], entry.size)
        if entry.size <= MEMORY_COPY_LIMIT and self._held + entry.size <= MEMORY_HELD_LIMIT:
            # Read back from the page cache on the reactor thread otherwise: an open and a
            # read that each let go of the GIL while the I/O threads are busy.
            copy = self._copies[qid] = prefix + body.read()
            self._held += len(copy)
        if self.running and not entry.removed:  # (deleted by the admin meanwhile)
            self.scheduler.add(entry)

    # -- admin --

    def entry(self, queue_id: str) -> QueueEntry | None:
        """The entry C{queue_id}, as this process knows it."""
        return self._entries.get(queue_id)

    def retry(self, queue_id: str | None = None) -> int:
        """
        Make an entry (None: all) due now, and hand over any notice still owed.

        @return: how many pending entries that concerned.
        """
        count = self.scheduler.retry(queue_id)
        targets = self._entries.values() if queue_id is None else [self._entries.get(queue_id)]
        for entry in list(targets):
            if entry is not None and self.scheduler.get(entry.queue_id) is None:
                self._spawn(self._notices_and_cleanup(entry), entry.queue_id)
        return count

    def delete(self, queue_id: str) -> Deferred[bool]:
        """
        Remove an entry without a notice (like C{postsuper -d}), even while an attempt for it
        is in flight (whose results are then dropped).

        @return: fires with whether there was such an entry.
        """
        return Deferred.fromCoroutine(self._delete(queue_id))

    async def _delete(self, queue_id: str) -> bool:
        entry = self._entries.get(queue_id)
        if entry is None:
            return False
        self.scheduler.remove(queue_id)
        if not await self._remove(entry, "deleted"):
            return False
        return True

    # -- attempts --

    def _send(self, domain: str, jobs: Sequence[Job]) -> Deferred[list[list[RcptResult]]]:
        messages = [
            Outgoing(
                queue_id=job.entry.queue_id,
                sender=job.entry.sender,
                recipients=tuple(r.rcpt for r in job.recipients),
                path=self.spool.message_path(job.entry.queue_id),
                size=job.entry.size,
                envid=job.entry.envid,
                ret=job.entry.ret,
                smtputf8=job.entry.smtputf8,
                eight_bit=job.entry.eight_bit,
                data=self._copies.get(job.entry.queue_id),
            )
            for job in jobs
        ]
        return self._outbound.send(domain, messages)

    def _settle(self, settlements: Sequence[Settlement]) -> Deferred[None]:
        ds = [self._spawn(self._settle_one(s), s.entry.queue_id) for s in settlements]
        done: Deferred[Any] = DeferredList(ds)
        return done.addCallback(lambda _: None)

    async def _settle_one(self, s: Settlement) -> None:
        """Log the results, record them, then send the notices they call for."""
        entry = s.entry
        for r, result in s.results:
            next_try = s.next_try if result.outcome == "deferred" else None
            log.delivery_attempt(
                entry.queue_id,
                r.address,
                result.host,
                result.outcome,
                result.code,
                result.text,
                next_try,
            )
            r.notice = _notice_owed(entry, r, result)
        if s.delayed:
            await self._delay_notice(entry, s.delayed)
        if not s.results:
            return
        if entry.done and not any(r.notice for r in entry.recipients):
            # Nothing left to do or to tell: unlinking the envelope records it all at once.
            # (A crash before the unlink sends again: the window of spool.py, no wider.)
            await self._notices_and_cleanup(entry)
        elif await self._save(entry):
            await self._notices_and_cleanup(entry)

    async def _notices_and_cleanup(self, entry: QueueEntry) -> None:
        """
        Hand over the notices owed, then remove the entry or record what was handed over.

        One pass per entry at a time: the settlements of two domains of one message may end
        together, and each must not send the other's notice again. A call during a pass asks
        for one more pass after it.
        """
        qid = entry.queue_id
        if qid in self._noticing:
            self._noticing[qid] = True
            return
        self._noticing[qid] = False
        try:
            while True:
                handed = await self._send_owed(entry)
                if entry.done:
                    await self._remove(entry, _removal_reason(entry))
                    return
                if handed:
                    await self._save(entry)
                if not self._noticing[qid]:
                    return
                self._noticing[qid] = False
        finally:
            del self._noticing[qid]

    # -- notices --

    async def _send_owed(self, entry: QueueEntry) -> bool:
        """Send the failure and relayed notices owed; return whether any was handed over."""
        handed = False
        kinds: tuple[tuple[dsn.Kind, dsn.Action], ...] = (
            ("failure", "failed"),
            ("relayed", "relayed"),
        )
        for kind, action in kinds:
            owed = [r for r in entry.recipients if r.notice == kind]
            if not owed or entry.removed:
                continue
            reports = [self._report(entry, r, action) for r in owed]
            if await self._notice(entry, kind, reports):
                for r in owed:
                    r.notice = None
                handed = True
        return handed

    async def _delay_notice(self, entry: QueueEntry, delayed: list[RecipientState]) -> None:
        if entry.removed or entry.delay_notified:
            return
        reports = [self._report(entry, r, "delayed") for r in delayed]
        if await self._notice(entry, "delay", reports):
            entry.delay_notified = True
            await self._save(entry)

    async def _notice(self, entry: QueueEntry, kind: dsn.Kind, reports: list[dsn.Report]) -> bool:
        """Compose (in the pool: it reads the message) and hand over one notice."""
        notice_id = f"{entry.queue_id[:64]}.{kind[0]}{next(self._notices):x}{secrets.token_hex(2)}"
        original = dsn.Original(
            queue_id=entry.queue_id,
            sender=entry.sender,
            received=entry.received,
            envid=entry.envid,
            ret=entry.ret,
            smtputf8=entry.smtputf8,
            size=entry.size,
        )
        try:
            data = await self._in_pool(
                dsn.build_notice,
                kind,
                original,
                reports,
                self.spool.message_path(entry.queue_id),
                hostname=self._hostname,
                notice_id=notice_id,
                now=self._clock.seconds(),
            )
            await self._notify(notice_id, entry.sender, data)
        except Exception:
            log.queue_error(Failure(), entry.queue_id, f"sending a {kind} notice")
            return False
        log.notice_sent(entry.queue_id, kind, entry.sender, notice_id)
        return True

    def _report(self, entry: QueueEntry, r: RecipientState, action: dsn.Action) -> dsn.Report:
        """What a notice says about recipient C{r}."""
        diagnostic = f"{r.code} {r.text}" if r.code else ""
        detail = "" if r.code else r.text
        until = None
        if action == "failed" and r.expired:
            status = "4.4.7"  # RFC 3463: delivery time expired
            gave_up = f"not delivered within {_period(self.settings.expire)}"
            detail = f"{gave_up}; last error: {detail}" if detail else gave_up
        else:
            status = dsn.status_of(r.code, r.text, action)
        if action == "delayed":
            until = entry.received + self.settings.expire
            detail = detail or "not yet delivered"
        return dsn.Report(
            address=r.address,
            action=action,
            status=status,
            orcpt=r.rcpt.orcpt,
            remote_mta=r.host,
            diagnostic=diagnostic,
            detail=detail,
            will_retry_until=until,
        )

    # -- the spool, one write at a time per entry --

    async def _save(self, entry: QueueEntry) -> bool:
        """Write C{entry}'s state; False when it is gone or the write failed (logged)."""
        try:
            return await self._locked(entry, lambda: self._save_now(entry))
        except Exception:
            log.queue_error(Failure(), entry.queue_id, "recording the state")
            return False

    def _save_now(self, entry: QueueEntry) -> Deferred[bool]:
        if entry.removed:
            return succeed(False)
        data = encode_entry(entry)  # a snapshot, taken on the reactor thread
        d = self._in_pool(self.spool.save_encoded, entry.queue_id, data)
        return d.addCallback(lambda _: True)

    async def _remove(self, entry: QueueEntry, reason: str) -> bool:
        """Remove C{entry} from disk and memory; False when it was removed already."""

        def remove() -> Deferred[bool]:
            if entry.removed:
                return succeed(False)
            entry.removed = True
            return self._unlink(entry.queue_id).addCallback(lambda _: True)

        try:
            removed = await self._locked(entry, remove)
        except Exception:
            log.queue_error(Failure(), entry.queue_id, "removing the entry")
            return False
        if removed:
            copy = self._copies.pop(entry.queue_id, None)
            if copy is not None:
                self._held -= len(copy)
            if self._entries.get(entry.queue_id) is entry:
                del self._entries[entry.queue_id]
            self.scheduler.remove(entry.queue_id)
            log.queue_removed(entry.queue_id, reason)
        return removed

    def _unlink(self, queue_id: str) -> Deferred[None]:
        """
        Remove C{queue_id}'s files with the others asked for meanwhile: while one batch is in
        the pool, the next collects, and each batch is one job and one directory sync (a
        group commit, as for new entries), not one of each per message.
        """
        d: Deferred[None] = Deferred()
        self._removals.append((queue_id, d))
        if not self._removing:
            self._remove_batch()
        return d

    def _remove_batch(self) -> None:
        batch, self._removals = self._removals, []
        self._removing = True

        def done(result: object) -> None:
            for _, d in batch:
                if isinstance(result, Failure):
                    d.errback(result)
                else:
                    d.callback(None)
            if self._removals:
                self._remove_batch()
            else:
                self._removing = False

        self._in_pool(self.spool.remove_many, [qid for qid, _ in batch]).addBoth(done)

    async def _locked(self, entry: QueueEntry, work: Callable[[], Deferred[T]]) -> T:
        """Run C{work} (which returns a Deferred) under C{entry}'s lock: one at a time."""
        qid = entry.queue_id
        lock = self._locks.get(qid)
        if lock is None:
            lock = self._locks[qid] = DeferredLock()
        await lock.acquire()
        try:
            return await work()
        finally:
            lock.release()
            if not lock.locked and not lock.waiting and self._locks.get(qid) is lock:
                del self._locks[qid]

    def _in_pool(self, f: Callable[..., T], *args: Any, **kwargs: Any) -> Deferred[T]:
        d: Deferred[T] = deferToThreadPool(self._threads, self._pool, f, *args, **kwargs)
        return d

    def _spawn(self, coro: Coroutine[Any, Any, None], queue_id: str) -> Deferred[None]:
        d: Deferred[None] = Deferred.fromCoroutine(coro)
        return d.addErrback(log.queue_error, queue_id, "settling")

    # -- control requests --

    def _poll_control(self) -> None:
        """One look at C{queue/control/}: act on the requests of the C{mailserver queue} CLI."""
        try:
            mtime = self.spool.control.stat().st_mtime_ns
        except OSError:
            return
        recent = self._clock.seconds() - mtime / 1e9 < _RECENT
        if mtime == self._control_mtime and not recent:
            return
        self._control_mtime = mtime
        try:
            requests = self.spool.requests()
        except OSError:
            log.queue_error(Failure(), "", "reading queue/control")
            return
        for name, action, target in requests:
            if name not in self._handling:
                self._handling.add(name)
                self._spawn(self._handle(name, action, target), target)

    async def _handle(self, name: str, action: str, target: str) -> None:
        try:
            if action == "retry":
                self.retry(None if target == ALL else target)
            elif action == "delete":
                await self._delete(target)
        finally:
            try:
                await self._in_pool(self.spool.finish_request, name)
            finally:
                self._handling.discard(name)


def _notice_owed(entry: QueueEntry, r: RecipientState, result: RcptResult) -> NoticeOwed | None:
    """The notice C{result} calls for (RFC 3461 §4.1), or what was owed already."""
    if result.outcome == "failed" and dsn.wanted(entry.sender, r.rcpt, "FAILURE"):
        return "failure"
    if (
        result.outcome == "sent"
        and not result.dsn_relayed  # the next hop took NOTIFY: notices are its job now
        and dsn.wanted(entry.sender, r.rcpt, "SUCCESS")
    ):
        return "relayed"
    return r.notice


def _removal_reason(entry: QueueEntry) -> str:
    if any(r.expired for r in entry.recipients):
        return "expired"
    if any(r.state == "failed" for r in entry.recipients):
        return "bounced"
    return "delivered"


def _period(seconds: float) -> str:
    """C{"5 days"}, C{"4 hours"}, C{"90 seconds"}: a duration in words."""
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size and seconds % size == 0:
            n = int(seconds // size)
            return f"{n} {unit}{'s' if n != 1 else ''}"
    return f"{seconds:g} seconds"
