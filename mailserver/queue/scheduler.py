# -*- test-case-name: tests.test_scheduler -*-
"""
When each queued message is tried for each of its destination domains: retries with backoff,
expiry, delay notices, concurrency limits, connection reuse and dead destinations. Pure logic on
an injected clock; the disk and the wire are the caller's (the L{Send} and L{Settle} callables).

The unit of work is an entry's pending recipients in one destination domain (a L{Job}). A job is
due at its domain's C{next_try}; due jobs of a domain wait in a ready list until a connection
slot is free (at most C{connections_per_domain} per domain, C{connections} in all), and one
C{send} carries several of them (up to C{messages_per_connection}: connection reuse).

After an attempt in which some recipients of a domain were deferred, that domain of that entry
waits C{retry[n-1]} after its n-th such attempt (the last interval repeating). When every result
of a send says the destination itself is unreachable (L{dead_destination}), the whole domain is
held until the earliest retry of the entries just tried: the other due entries of that domain
wait too instead of each trying a dead host (Postfix's dead destination). A domain that is not
held is tried at once when a new message for it arrives.

One timer is armed, for the earliest time anything becomes due (a heap of due times; stale
items are skipped when they come up).
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from mailserver import log
from mailserver.config import QueueConfig
from mailserver.queue.dsn import wanted
from mailserver.queue.model import RcptResult
from mailserver.queue.spool import QueueEntry, RecipientState

_SEND, _EXPIRE, _DELAY = 0, 1, 2
_DEAD_CODES = (0, 421)
"""Results that speak for the destination, not for a recipient: no connection (0) or the next
hop closing the channel (RFC 5321 §3.8: 421, also a refused greeting)."""


@dataclass(eq=False, slots=True)
class Job:
    """One entry's pending recipients in the domain of one attempt."""

    entry: QueueEntry
    recipients: list[RecipientState]


@dataclass(eq=False)
class Settlement:
    """
    What the scheduler decided for one entry; the caller records it, logs it, sends the notices
    it calls for, and removes the entry once nothing is left to do.
    """

    entry: QueueEntry
    domain: str | None
    """The domain of the attempt; None for an expiry or a delay notice."""
    results: list[tuple[RecipientState, RcptResult]] = field(default_factory=list)
    """Each recipient whose fate this step decided or deferred, with the result to log (the
    recipient's state is already updated)."""
    next_try: float | None = None
    """When the domain is tried again, if recipients were deferred."""
    delayed: list[RecipientState] = field(default_factory=list)
    """Recipients to name in a delay notice (pending, wanting DELAY, sender not null)."""


Send = Callable[[str, Sequence[Job]], Deferred[list[list[RcptResult]]]]
"""Deliver jobs of one domain over one connection; one result list per job, in order."""
Settle = Callable[[Sequence[Settlement]], Deferred[None]]
"""Record settlements durably and act on them; fires when done (should not fail)."""


def retry_delay(retry: Sequence[float], attempts: int) -> float:
    """The wait after the C{attempts}-th failed attempt (1-based; the last interval repeats)."""
    return retry[min(max(attempts, 1), len(retry)) - 1]


def dead_destination(results: Sequence[Sequence[RcptResult]]) -> bool:
    """
    Whether C{results} of one send say the destination, not the recipients, failed: every
    result deferred with no reply (code 0: no address, no connection, timeout) or 421.
    """
    flat = [r for per_message in results for r in per_message]
    return bool(flat) and all(r.outcome == "deferred" and r.code in _DEAD_CODES for r in flat)


def expiry_text(r: RecipientState) -> str:
    """The reply logged for a recipient that expired: C{4.4.7} and the last reply, if any."""
    last = f"{r.code} {r.text}" if r.code else r.text
    return f"4.4.7 message expired: {last}" if last else "4.4.7 message expired"


class Scheduler:
    """
    The in-memory queue of pending entries.

    @param send: starts one attempt (L{Send}).
    @param settle: records what an attempt, an expiry or a delay decided (L{Settle}); the jobs
        of an attempt stay busy until it fires, so nothing retries an entry whose last result
        is not yet on disk.
    """

    def __init__(
        self, settings: QueueConfig, clock: IReactorTime, send: Send, settle: Settle
    ) -> None:
        self._settings = settings
        self._clock = clock
        self._send = send
        self._settle = settle
        self._entries: dict[str, QueueEntry] = {}
        self._heap: list[tuple[float, int, str, int, str]] = []
        self._seq = itertools.count()
        self._ready: dict[str, dict[str, None]] = {}  # domain -> due queue ids, in order
        self._busy: set[tuple[str, str]] = set()  # (queue id, domain) in an attempt
        self._busy_entries: Counter[str] = Counter()
        self._active: Counter[str] = Counter()  # connections per domain
        self._total = 0
        self._hold: dict[str, float] = {}  # dead destinations: domain -> until
        self._timer: IDelayedCall | None = None
        self._running = True
        self._pumping = False
        self._again = False
        self._in_flight = 0
        self._idle_waiters: list[Deferred[None]] = []

    # -- the entries --

    def add(self, entry: QueueEntry) -> None:
        """Schedule C{entry} (new or loaded: its domains keep their attempts and times)."""
        self.add_many([entry])

    def add_many(self, entries: Iterable[QueueEntry]) -> None:
        """Schedule several entries, then dispatch once (so due ones share connections)."""
        for entry in entries:
            self._add(entry)
        self._pump()

    def _add(self, entry: QueueEntry) -> None:
        qid = entry.queue_id
        if qid in self._entries:
            return
        now = self._clock.seconds()
        entry.sync_domains(now)
        self._entries[qid] = entry
        for domain, state in entry.domains.items():
            self._push(state.next_try, qid, _SEND, domain)
        s = self._settings
        self._push(entry.received + s.expire, qid, _EXPIRE)
        if 0 < s.delay_notice < s.expire and not entry.delay_notified:
            self._push(entry.received + s.delay_notice, qid, _DELAY)

    def get(self, queue_id: str) -> QueueEntry | None:
        """The pending entry C{queue_id}, if scheduled."""
        return self._entries.get(queue_id)

    def __len__(self) -> int:
        return len(self._entries)

    def remove(self, queue_id: str) -> QueueEntry | None:
        """
        Forget an entry (C{queue delete}). An attempt in flight for it goes on, but its results
        are dropped.
        """
        return self._entries.pop(queue_id, None)

    def retry(self, queue_id: str | None = None) -> int:
        """
        Make an entry (None: every entry) due now, lifting the hold on its domains.

        @return: how many entries that concerned.
        """
        if queue_id is None:
            targets = list(self._entries.values())
        else:
            entry = self._entries.get(queue_id)
            targets = [] if entry is None else [entry]
        now = self._clock.seconds()
        for entry in targets:
            for domain, state in entry.domains.items():
                state.next_try = min(state.next_try, now)
                self._hold.pop(domain, None)
                self._push(now, entry.queue_id, _SEND, domain)
        self._pump()
        return len(targets)

    def held_until(self, domain: str) -> float | None:
        """When a held (dead) destination is tried again; None if it is not held."""
        until = self._hold.get(domain)
        return until if until is not None and until > self._clock.seconds() else None

    def stop(self) -> Deferred[None]:
        """Start nothing more; fires once the attempts in flight have settled."""
        self._running = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._in_flight == 0:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle_waiters.append(d)
        return d

    # -- the loop --

    def _push(self, when: float, queue_id: str, kind: int, domain: str = "") -> None:
        heapq.heappush(self._heap, (when, next(self._seq), queue_id, kind, domain))

    def _pump(self) -> None:
        """Take what is due, start what may start, arm the timer."""
        if not self._running:
            return
        if self._pumping:
            self._again = True
            return
        self._pumping = True
        try:
            self._again = True
            while self._again and self._running:
                self._again = False
                now = self._clock.seconds()
                self._take_due(now)
                self._dispatch(now)
            self._arm()
        finally:
            self._pumping = False

    def _fire(self) -> None:
        self._timer = None
        self._pump()

    def _arm(self) -> None:
        if not self._running:
            return
        now = self._clock.seconds()
        when = self._heap[0][0] if self._heap else None
        for domain, queue in self._ready.items():
            until = self._hold.get(domain)
            if queue and until is not None and until > now and (when is None or until < when):
                when = until
        timer = self._timer
        if timer is not None and timer.active():
            if when is not None and timer.getTime() == when:
                return
            timer.cancel()
        self._timer = None
        if when is not None:
            self._timer = self._clock.callLater(max(0.0, when - now), self._fire)

    def _take_due(self, now: float) -> None:
        while self._heap and self._heap[0][0] <= now:
            _, _, qid, kind, domain = heapq.heappop(self._heap)
            entry = self._entries.get(qid)
            if entry is None:
                continue
            if kind == _SEND:
                state = entry.domains.get(domain)
                if state is None or state.next_try > now or (qid, domain) in self._busy:
                    continue
                self._ready.setdefault(domain, {})[qid] = None
            elif kind == _EXPIRE:
                self._expire(entry, now)
            else:
                self._delay(entry, now)

    def _dispatch(self, now: float) -> None:
        s = self._settings
        progress = True
        while progress:
            progress = False
            for domain in list(self._ready):
                if self._total >= s.connections:
                    return
                queue = self._ready[domain]
                if not queue:
                    del self._ready[domain]
                    continue
                until = self._hold.get(domain)
                if until is not None:
                    if until > now:
                        continue
                    del self._hold[domain]
                free = s.connections_per_domain - self._active[domain]
                if free <= 0:
                    continue
                # Spread what is due over the free connections, each carrying up to
                # messages_per_connection (connection reuse).
                size = min(s.messages_per_connection, -(-len(queue) // free))
                qids = list(itertools.islice(queue, size))
                for qid in qids:
                    del queue[qid]
                self._launch(domain, qids)
                progress = True

    # -- one attempt --

    def _launch(self, domain: str, qids: list[str]) -> None:
        jobs: list[Job] = []
        for qid in qids:
            entry = self._entries.get(qid)
            if entry is None or (qid, domain) in self._busy:
                continue
            recipients = entry.pending(domain)
            if recipients:
                self._busy.add((qid, domain))
                self._busy_entries[qid] += 1
                jobs.append(Job(entry, recipients))
        if not jobs:
            return
        self._active[domain] += 1
        self._total += 1
        self._in_flight += 1
        d: Deferred[list[list[RcptResult]]] = maybeDeferred(self._send, domain, jobs)
        d.addErrback(self._send_failed, jobs)
        settled = d.addCallback(self._sent, domain, jobs)
        settled.addErrback(log.queue_error, "", "settling an attempt")
        settled.addBoth(self._attempt_done, domain, jobs)

    def _send_failed(self, failure: Failure, jobs: list[Job]) -> list[list[RcptResult]]:
        """A C{send} that failed (it should not) leaves everyone deferred."""
        log.queue_error(failure, jobs[0].entry.queue_id, "sending")
        text = "4.3.0 internal error in delivery"
        return [
            [RcptResult(r.address, "deferred", 0, text) for r in job.recipients] for job in jobs
        ]

    def _sent(
        self, results: list[list[RcptResult]], domain: str, jobs: list[Job]
    ) -> Deferred[None]:
        self._active[domain] -= 1
        if self._active[domain] <= 0:
            del self._active[domain]
        self._total -= 1
        now = self._clock.seconds()
        settlements = []
        for i, job in enumerate(jobs):
            if self._entries.get(job.entry.queue_id) is not job.entry:
                continue  # deleted meanwhile: its results are dropped
            got = results[i] if i < len(results) else []
            settlements.append(self._apply(job, domain, got, now))
        retries = [s.next_try for s in settlements if s.next_try is not None]
        if retries and dead_destination(results):
            self._hold[domain] = min(retries)
        else:
            self._hold.pop(domain, None)
        self._pump()  # a connection slot is free
        if not settlements:
            return succeed(None)
        return maybeDeferred(self._settle, settlements)

    def _apply(self, job: Job, domain: str, results: list[RcptResult], now: float) -> Settlement:
        """Record C{results} in the entry's recipients and the domain's retry state."""
        entry = job.entry
        settlement = Settlement(entry, domain)
        deferred = False
        for i, r in enumerate(job.recipients):
            if i < len(results):
                result = results[i]
            else:
                result = RcptResult(r.address, "deferred", 0, "4.3.0 no result from delivery")
            r.code, r.text, r.host = result.code, result.text, result.host
            if result.outcome == "deferred":
                deferred = True
            else:
                r.state = result.outcome
            settlement.results.append((r, result))
        state = entry.domains.get(domain)
        if deferred and state is not None:
            state.attempts += 1
            expiry = entry.received + self._settings.expire
            state.next_try = min(now + retry_delay(self._settings.retry, state.attempts), expiry)
            settlement.next_try = state.next_try
        elif state is not None and not entry.pending(domain):
            del entry.domains[domain]
        return settlement

    def _attempt_done(self, _: object, domain: str, jobs: list[Job]) -> None:
        now = self._clock.seconds()
        for job in jobs:
            qid = job.entry.queue_id
            self._busy.discard((qid, domain))
            self._busy_entries[qid] -= 1
            if self._busy_entries[qid] <= 0:
                del self._busy_entries[qid]
            if self._entries.get(qid) is not job.entry:
                continue
            self._after(job.entry, domain, now)
        self._done_one()

    def _after(self, entry: QueueEntry, domain: str, now: float) -> None:
        """An attempt of C{entry} has settled: forget it, expire it, or wait for its retry."""
        qid = entry.queue_id
        if not entry.pending():
            if not self._busy_entries[qid]:
                del self._entries[qid]
            return
        if now >= entry.received + self._settings.expire:
            self._expire(entry, now)
            return
        state = entry.domains.get(domain)
        if state is not None:
            self._push(state.next_try, qid, _SEND, domain)

    def _done_one(self) -> None:
        self._in_flight -= 1
        if self._in_flight == 0 and self._idle_waiters:
            waiters, self._idle_waiters = self._idle_waiters, []
            for d in waiters:
                d.callback(None)
        self._pump()

    # -- expiry and delay notices --

    def _expire(self, entry: QueueEntry, now: float) -> None:
        """Fail every pending recipient: the message has been queued too long."""
        if self._busy_entries[entry.queue_id]:
            return  # done when its attempts have settled (L{_after})
        pending = entry.pending()
        if not pending:
            return
        settlement = Settlement(entry, None)
        for r in pending:
            result = RcptResult(r.address, "failed", 0, expiry_text(r), r.host)
            r.state = "failed"
            r.expired = True
            settlement.results.append((r, result))
        entry.domains.clear()
        self._run_settle(entry, settlement)

    def _delay(self, entry: QueueEntry, now: float) -> None:
        """The delay notice is due (once per entry; none when the message has expired)."""
        if entry.delay_notified or now >= entry.received + self._settings.expire:
            return
        delayed = [r for r in entry.pending() if wanted(entry.sender, r.rcpt, "DELAY")]
        if not delayed:
            entry.delay_notified = True  # nobody wants one: nothing to send, ever
            return
        self._run_settle(entry, Settlement(entry, None, delayed=delayed))

    def _run_settle(self, entry: QueueEntry, settlement: Settlement) -> None:
        self._in_flight += 1
        self._busy_entries[entry.queue_id] += 1
        d = maybeDeferred(self._settle, [settlement])
        d.addErrback(log.queue_error, entry.queue_id, "settling")
        d.addBoth(self._settled, entry)

    def _settled(self, _: object, entry: QueueEntry) -> None:
        qid = entry.queue_id
        self._busy_entries[qid] -= 1
        if self._busy_entries[qid] <= 0:
            del self._busy_entries[qid]
            if self._entries.get(qid) is entry:
                if not entry.pending():
                    del self._entries[qid]
                elif self._clock.seconds() >= entry.received + self._settings.expire:
                    self._expire(entry, self._clock.seconds())
        self._done_one()
