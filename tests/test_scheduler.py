"""Tests for L{mailserver.queue.scheduler}, on a L{Clock}."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailserver.config import QueueConfig
from mailserver.queue.model import Notify, QueuedRecipient, RcptResult, Submission
from mailserver.queue.scheduler import (
    Job,
    Scheduler,
    Settlement,
    dead_destination,
    retry_delay,
)
from mailserver.queue.spool import QueueEntry

HOUR = 3600.0
DAY = 86400.0

Policy = Callable[[str, Job], RcptResult]


def defer_all(code: int = 451, text: str = "4.3.0 try later") -> Policy:
    return lambda address, job: RcptResult(address, "deferred", code, text, "mx[192.0.2.1]")


def send_all(address: str, job: Job) -> RcptResult:
    return RcptResult(address, "sent", 250, "2.0.0 ok", "mx[192.0.2.1]")


def entry(
    queue_id: str,
    *addresses: str,
    received: float = 0.0,
    sender: str = "alice@example.org",
    notify: frozenset[Notify] | None = None,
) -> QueueEntry:
    recipients = tuple(QueuedRecipient(a, notify) for a in addresses or ("bob@example.net",))
    sub = Submission(queue_id, sender, recipients, received)
    return QueueEntry.from_submission(sub, received)


class SchedulerTestCase(SynchronousTestCase):
    settings = QueueConfig()

    def setUp(self) -> None:
        self.clock = Clock()
        self.calls: list[tuple[float, str, list[str]]] = []
        self.pending: list[tuple[Deferred[list[list[RcptResult]]], list[Job]]] = []
        self.policy: Policy | None = send_all
        self.settled: list[tuple[float, Settlement]] = []
        self.scheduler = Scheduler(self.settings, self.clock, self.send, self.settle)

    def send(self, domain: str, jobs: Sequence[Job]) -> Deferred[list[list[RcptResult]]]:
        self.calls.append((self.clock.seconds(), domain, [j.entry.queue_id for j in jobs]))
        if self.policy is None:
            d: Deferred[list[list[RcptResult]]] = Deferred()
            self.pending.append((d, list(jobs)))
            return d
        return succeed([[self.policy(r.address, job) for r in job.recipients] for job in jobs])

    def settle(self, settlements: Sequence[Settlement]) -> Deferred[None]:
        for s in settlements:
            self.settled.append((self.clock.seconds(), s))
        return succeed(None)

    def finish(self, index: int, policy: Policy) -> None:
        """Fire the C{index}th held send with results from C{policy}."""
        d, jobs = self.pending.pop(index)
        d.callback([[policy(r.address, job) for r in job.recipients] for job in jobs])

    def times(self) -> list[float]:
        return [t for t, _, _ in self.calls]


class BackoffTests(SchedulerTestCase):
    def test_retry_delay(self) -> None:
        """After the n-th failed attempt the wait is retry[n-1]; the last one repeats."""
        retry = (60.0, 300.0, 7200.0)
        self.assertEqual([retry_delay(retry, n) for n in range(1, 6)], [60, 300, 7200, 7200, 7200])

    def test_default_schedule(self) -> None:
        """
        A message that is always deferred is tried at once, then after 1m, 5m, 15m, 30m, 1h,
        then every 2h.
        """
        self.policy = defer_all()
        self.scheduler.add(entry("q1"))
        self.clock.advance(0)
        while self.clock.seconds() < 6 * HOUR:
            self.clock.advance(60)
        expected = [0.0, 60.0, 360.0, 1260.0, 3060.0, 6660.0, 13860.0, 21060.0]
        self.assertEqual(self.times(), expected)
        entry_ = self.scheduler.get("q1")
        assert entry_ is not None
        self.assertEqual(entry_.domains["example.net"].attempts, 8)
        self.assertEqual(entry_.domains["example.net"].next_try, 21060.0 + 7200.0)
        # Each deferral was settled with the next try.
        deferred = [s for _, s in self.settled if s.domain]
        self.assertEqual(deferred[0].next_try, 60.0)
        self.assertEqual(deferred[0].results[0][1].outcome, "deferred")

    def test_loaded_entry_keeps_its_schedule(self) -> None:
        """An entry loaded with attempts and a next try waits for it, then backs off further."""
        self.policy = defer_all()
        e = entry("q1")
        e.domains["example.net"].attempts = 5
        e.domains["example.net"].next_try = 500.0
        self.scheduler.add(e)
        self.clock.advance(499)
        self.assertEqual(self.calls, [])
        self.clock.advance(1)
        self.assertEqual(self.times(), [500.0])
        self.assertEqual(e.domains["example.net"].attempts, 6)
        self.assertEqual(e.domains["example.net"].next_try, 500.0 + 7200.0)

    def test_sent_and_failed_are_settled(self) -> None:
        """Sent and failed recipients leave the schedule; the entry is forgotten."""
        self.policy = lambda a, j: (
            send_all(a, j)
            if a.startswith("bob")
            else RcptResult(a, "failed", 550, "5.1.1 no such user", "mx")
        )
        e = entry("q1", "bob@example.net", "carol@example.net")
        self.scheduler.add(e)
        self.assertEqual(len(self.calls), 1)
        [(_, s)] = self.settled
        self.assertEqual(
            [(r.address, r.state) for r, _ in s.results],
            [("bob@example.net", "sent"), ("carol@example.net", "failed")],
        )
        self.assertIsNone(s.next_try)
        self.assertIsNone(self.scheduler.get("q1"))
        self.assertEqual(e.domains, {})
        self.clock.advance(10 * DAY)
        self.assertEqual(len(self.calls), 1)

    def test_send_failure_is_deferral(self) -> None:
        """A send whose Deferred fails counts as deferred for every recipient."""

        def broken(domain: str, jobs: Sequence[Job]) -> Deferred[list[list[RcptResult]]]:
            self.calls.append((self.clock.seconds(), domain, []))
            return fail(RuntimeError("bug"))

        scheduler = Scheduler(self.settings, self.clock, broken, self.settle)
        scheduler.add(entry("q1"))
        [(_, s)] = self.settled
        self.assertEqual(s.results[0][1].outcome, "deferred")
        self.assertEqual(s.next_try, 60.0)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class ExpiryTests(SchedulerTestCase):
    def test_expiry(self) -> None:
        """
        After C{expire} from arrival the pending recipients fail with 4.4.7 and the last reply;
        no attempt is made after that.
        """
        self.policy = defer_all()
        e = entry("q1", "bob@example.net", "carol@example.com")
        self.scheduler.add(e)
        self.clock.pump([HOUR] * int(5 * 24) + [1])
        expiry = [(t, s) for t, s in self.settled if s.domain is None and s.results]
        self.assertEqual(len(expiry), 1)
        when, s = expiry[0]
        self.assertEqual(when, 5 * DAY)
        self.assertEqual(
            {r.address for r, _ in s.results}, {"bob@example.net", "carol@example.com"}
        )
        for r, result in s.results:
            self.assertEqual(r.state, "failed")
            self.assertTrue(r.expired)
            self.assertEqual(result.outcome, "failed")
            self.assertEqual(result.text, "4.4.7 message expired: 451 4.3.0 try later")
        self.assertLessEqual(max(self.times()), 5 * DAY)
        self.assertIsNone(self.scheduler.get("q1"))
        n = len(self.calls)
        self.clock.advance(DAY)
        self.assertEqual(len(self.calls), n)

    def test_loaded_expired_entry(self) -> None:
        """An entry loaded after its expiry fails at once, without an attempt."""
        self.clock.advance(6 * DAY)
        self.scheduler.add(entry("q1"))
        self.assertEqual(self.calls, [])
        [(_, s)] = self.settled
        self.assertEqual(s.results[0][1].text, "4.4.7 message expired")

    def test_expiry_waits_for_attempt_in_flight(self) -> None:
        """An entry whose attempt is in flight at expiry expires when that attempt settles."""
        self.policy = None
        settings = replace(self.settings, expire=100.0, retry=(1000.0,))
        scheduler = Scheduler(settings, self.clock, self.send, self.settle)
        scheduler.add(entry("q1"))
        self.clock.advance(150)
        self.assertEqual(self.settled, [])
        self.finish(0, defer_all(421, "4.4.2 bye"))
        kinds = [(s.domain, [res.outcome for _, res in s.results]) for _, s in self.settled]
        self.assertEqual(kinds, [("example.net", ["deferred"]), (None, ["failed"])])


class DelayNoticeTests(SchedulerTestCase):
    def test_once_at_four_hours_for_delay_wanting_recipients(self) -> None:
        """
        A delay settlement comes exactly once, at 4 h, naming only the pending recipients that
        want DELAY notices (default NOTIFY does; NOTIFY=FAILURE does not).
        """
        self.policy = defer_all()
        e = entry("q1", "bob@example.net", "carol@example.net", "dave@example.net")
        replace_notify(e, 1, frozenset({"FAILURE"}))
        self.scheduler.add(e)
        self.clock.pump([60.0] * int(10 * HOUR / 60))
        delays = [(t, s) for t, s in self.settled if s.delayed]
        self.assertEqual(len(delays), 1)
        when, s = delays[0]
        self.assertEqual(when, 4 * HOUR)
        self.assertEqual([r.address for r in s.delayed], ["bob@example.net", "dave@example.net"])

    def test_none_for_null_sender(self) -> None:
        """A message from the null sender gets no delay notice."""
        self.policy = defer_all()
        self.scheduler.add(entry("q1", sender=""))
        self.clock.pump([HOUR] * 6)
        self.assertEqual([s for _, s in self.settled if s.delayed], [])

    def test_none_when_already_sent(self) -> None:
        """An entry loaded with its delay notice sent does not get another."""
        self.policy = defer_all()
        e = entry("q1")
        e.delay_notified = True
        self.scheduler.add(e)
        self.clock.pump([HOUR] * 6)
        self.assertEqual([s for _, s in self.settled if s.delayed], [])


def replace_notify(e: QueueEntry, index: int, notify: frozenset[Notify]) -> None:
    r = e.recipients[index]
    r.rcpt = replace(r.rcpt, notify=notify)


class ConcurrencyTests(SchedulerTestCase):
    def test_per_domain_cap(self) -> None:
        """At most C{connections_per_domain} sends run at once for one domain."""
        self.policy = None
        settings = replace(self.settings, connections_per_domain=2, messages_per_connection=1)
        scheduler = Scheduler(settings, self.clock, self.send, self.settle)
        for i in range(5):
            scheduler.add(entry(f"q{i}"))
        self.assertEqual([q for _, _, q in self.calls], [["q0"], ["q1"]])
        self.finish(0, send_all)
        self.assertEqual([q for _, _, q in self.calls][2:], [["q2"]])
        self.assertEqual(len(self.pending), 2)

    def test_total_cap(self) -> None:
        """At most C{connections} sends run at once in all; other domains wait for a slot."""
        self.policy = None
        settings = replace(self.settings, connections=2)
        scheduler = Scheduler(settings, self.clock, self.send, self.settle)
        for i, domain in enumerate(("a.example", "b.example", "c.example")):
            scheduler.add(entry(f"q{i}", f"x@{domain}"))
        self.assertEqual([d for _, d, _ in self.calls], ["a.example", "b.example"])
        self.finish(0, send_all)
        self.assertEqual([d for _, d, _ in self.calls], ["a.example", "b.example", "c.example"])

    def test_connection_reuse(self) -> None:
        """Due messages of one domain share a send, up to C{messages_per_connection} each."""
        self.policy = None
        settings = replace(self.settings, connections_per_domain=1, messages_per_connection=2)
        scheduler = Scheduler(settings, self.clock, self.send, self.settle)
        scheduler.add_many([entry(f"q{i}") for i in range(5)])
        self.assertEqual([q for _, _, q in self.calls], [["q0", "q1"]])
        self.finish(0, send_all)
        self.finish(0, send_all)
        self.finish(0, send_all)
        self.assertEqual([q for _, _, q in self.calls], [["q0", "q1"], ["q2", "q3"], ["q4"]])

    def test_spread_over_free_connections(self) -> None:
        """Many due messages are spread over the free connections of their domain."""
        self.policy = None
        settings = replace(self.settings, connections_per_domain=3, messages_per_connection=100)
        scheduler = Scheduler(settings, self.clock, self.send, self.settle)
        scheduler.add_many([entry(f"q{i}") for i in range(9)])
        self.assertEqual([len(q) for _, _, q in self.calls], [3, 3, 3])

    def test_batch_waits_while_a_message_is_in_flight(self) -> None:
        """Messages arriving while the only connection is busy go together on the next one."""
        self.policy = None
        settings = replace(self.settings, connections_per_domain=1)
        scheduler = Scheduler(settings, self.clock, self.send, self.settle)
        for i in range(4):
            scheduler.add(entry(f"q{i}"))
        self.finish(0, send_all)
        self.assertEqual([q for _, _, q in self.calls], [["q0"], ["q1", "q2", "q3"]])


class DeadDestinationTests(SchedulerTestCase):
    def test_dead_destination(self) -> None:
        """Only results that all say the destination is unreachable (0 or 421) count."""
        dead = RcptResult("a@x", "deferred", 0, "connection refused")
        bye = RcptResult("b@x", "deferred", 421, "4.4.2 closing")
        busy = RcptResult("c@x", "deferred", 452, "4.2.2 mailbox full")
        self.assertTrue(dead_destination([[dead], [bye]]))
        self.assertFalse(dead_destination([[dead, busy]]))
        self.assertFalse(dead_destination([[replace(dead, outcome="failed")]]))
        self.assertFalse(dead_destination([]))

    def test_dead_destination_holds_the_domain(self) -> None:
        """
        When a domain's connection fails for everyone, its other due messages are not tried
        until the retry time; then they go together.
        """
        self.policy = None
        settings = replace(self.settings, connections_per_domain=1)
        scheduler = Scheduler(settings, self.clock, self.send, self.settle)
        scheduler.add(entry("q0"))
        scheduler.add(entry("q1"))
        scheduler.add(entry("q2"))
        self.assertEqual(len(self.calls), 1)
        self.finish(0, defer_all(0, "connection refused"))
        self.assertEqual(len(self.calls), 1)  # q1, q2 due, but the domain is held
        self.assertEqual(scheduler.held_until("example.net"), 60.0)
        scheduler.add(entry("q3", received=self.clock.seconds()))
        self.assertEqual(len(self.calls), 1)  # a new message for it waits too
        self.clock.advance(59)
        self.assertEqual(len(self.calls), 1)
        self.clock.advance(1)
        self.assertEqual(self.calls[1], (60.0, "example.net", ["q1", "q2", "q3", "q0"]))

    def test_other_domain_not_held(self) -> None:
        """A new message for another domain goes at once while one domain is held."""
        self.policy = None
        self.scheduler.add(entry("q0"))
        self.finish(0, defer_all(0, "connection timed out"))
        self.scheduler.add(entry("q1", "dan@example.com"))
        self.assertEqual([d for _, d, _ in self.calls], ["example.net", "example.com"])

    def test_recipient_deferral_does_not_hold(self) -> None:
        """A 4xx for a recipient (not the destination) leaves the domain open."""
        self.policy = None
        self.scheduler.add(entry("q0"))
        self.finish(0, defer_all(452, "4.2.2 mailbox full"))
        self.assertIsNone(self.scheduler.held_until("example.net"))
        self.scheduler.add(entry("q1"))
        self.assertEqual([q for _, _, q in self.calls], [["q0"], ["q1"]])


class ControlTests(SchedulerTestCase):
    def test_retry_now(self) -> None:
        """C{retry} makes an entry due at once and lifts its domain's hold."""
        self.policy = defer_all(0, "connection refused")
        self.scheduler.add(entry("q0"))
        self.clock.advance(10)
        self.assertEqual(self.scheduler.retry("q0"), 1)
        self.assertEqual(self.times(), [0.0, 10.0])
        self.assertEqual(self.scheduler.retry("nope"), 0)
        self.clock.advance(10)
        self.assertEqual(self.scheduler.retry(), 1)
        self.assertEqual(self.times(), [0.0, 10.0, 20.0])

    def test_remove_drops_results_in_flight(self) -> None:
        """An entry removed while its attempt is in flight is not settled or retried."""
        self.policy = None
        self.scheduler.add(entry("q0"))
        self.assertIsNotNone(self.scheduler.remove("q0"))
        self.finish(0, defer_all())
        self.assertEqual(self.settled, [])
        self.clock.advance(DAY)
        self.assertEqual(len(self.calls), 1)

    def test_stop(self) -> None:
        """After C{stop} nothing starts; its Deferred fires when the attempts in flight end."""
        self.policy = None
        self.scheduler.add(entry("q0"))
        stopped = self.scheduler.stop()
        self.assertNoResult(stopped)
        self.scheduler.add(entry("q1"))
        self.finish(0, defer_all())
        self.successResultOf(stopped)
        self.clock.advance(DAY)
        self.assertEqual(len(self.calls), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_one_timer(self) -> None:
        """However many entries wait, one timer is armed."""
        self.policy = defer_all()
        self.scheduler.add_many([entry(f"q{i}", f"x@d{i}.example") for i in range(50)])
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
