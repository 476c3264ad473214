"""
Tests for L{mailserver.queue.service}: a real spool in a temporary directory, a fake next hop,
a L{Clock} for time and a thread pool that runs its work when told (or at once).
"""

from __future__ import annotations

import email
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.task import Clock, deferLater
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailserver.config import QueueConfig
from mailserver.interfaces import IOutbound, IQueue
from mailserver.queue.model import Notify, Outgoing, QueuedRecipient, RcptResult, Submission
from mailserver.queue.service import QueueLocked, QueueService
from mailserver.queue.spool import Spool, encode_entry, release_lock, try_lock, valid_queue_id
from mailserver.store.body import MessageBody

HOUR = 3600.0
DAY = 86400.0
PREFIX = b"Received: from client by mail.example.org\r\n"
BODY = b"From: alice@example.org\r\nSubject: lunch\r\n\r\nShall we?\r\n"

Policy = Callable[[str, Outgoing], RcptResult]


def sent(address: str, msg: Outgoing) -> RcptResult:
    return RcptResult(address, "sent", 250, "2.0.0 ok", "mx.example.net[192.0.2.1]")


def deferred(address: str, msg: Outgoing) -> RcptResult:
    return RcptResult(address, "deferred", 451, "4.3.0 try later", "mx.example.net[192.0.2.1]")


def failed(address: str, msg: Outgoing) -> RcptResult:
    return RcptResult(address, "failed", 550, "5.1.1 no such user", "mx.example.net[192.0.2.1]")


@implementer(IReactorFromThreads)
class FakeReactor(Clock):
    """A clock whose "threads" report back at once."""

    def callFromThread(self, callable: Callable[..., Any], *args: object, **kw: object) -> None:
        callable(*args, **kw)


class FakePool:
    """Runs the work given to it at once, or, when C{hold} is set, when L{run} is called."""

    def __init__(self) -> None:
        self.hold = False
        self.work: list[tuple[Callable[..., Any], Callable[..., Any], Any, Any]] = []

    def callInThreadWithCallback(
        self, on_result: Callable[..., Any], f: Callable[..., Any], *args: Any, **kw: Any
    ) -> None:
        self.work.append((on_result, f, args, kw))
        if not self.hold:
            self.run()

    def run(self) -> None:
        while self.work:
            on_result, f, args, kw = self.work.pop(0)
            try:
                result = f(*args, **kw)
            except BaseException:
                on_result(False, Failure())
            else:
                on_result(True, result)


@implementer(IOutbound)
class FakeOutbound:
    """A next hop that answers by C{policy}, or holds each send until L{finish}."""

    def __init__(self) -> None:
        self.policy: Policy | None = sent
        self.calls: list[tuple[str, list[Outgoing]]] = []
        self.held: list[tuple[Deferred[list[list[RcptResult]]], list[Outgoing]]] = []

    def send(self, domain: str, messages: Sequence[Outgoing]) -> Deferred[list[list[RcptResult]]]:
        self.calls.append((domain, list(messages)))
        if self.policy is None:
            d: Deferred[list[list[RcptResult]]] = Deferred()
            self.held.append((d, list(messages)))
            return d
        policy = self.policy
        return succeed([[policy(r.address, m) for r in m.recipients] for m in messages])

    def finish(self, policy: Policy) -> None:
        d, messages = self.held.pop(0)
        d.callback([[policy(r.address, m) for r in m.recipients] for m in messages])


def parse(data: bytes) -> Any:
    """A message parsed by the stdlib (typed loosely: its payloads are of many kinds)."""
    return email.message_from_bytes(data)


def submission(
    queue_id: str = "q1",
    sender: str = "alice@example.org",
    notify: frozenset[Notify] | None = None,
    orcpt: str | None = None,
    received: float = 0.0,
    addresses: Sequence[str] = ("bob@example.net",),
) -> Submission:
    recipients = tuple(QueuedRecipient(a, notify, orcpt) for a in addresses)
    return Submission(queue_id, sender, recipients, received, envid="env-1")


class ServiceTestCase(SynchronousTestCase):
    settings = QueueConfig()

    def setUp(self) -> None:
        self.root = Path(self.mktemp())
        self.reactor = FakeReactor()
        self.pool = FakePool()
        self.outbound = FakeOutbound()
        self.notices: list[tuple[str, str, bytes]] = []
        self.notify_fails = False
        self.services: list[QueueService] = []

    def notify(self, notice_id: str, recipient: str, message: bytes) -> Deferred[None]:
        if self.notify_fails:
            return fail(OSError("mailbox unavailable"))
        self.notices.append((notice_id, recipient, message))
        return succeed(None)

    def start(self) -> QueueService:
        service = QueueService(
            self.root,
            self.settings,
            self.outbound,
            self.notify,
            "mail.example.org",
            self.reactor,
            cast(ThreadPool, self.pool),
            grace=30.0,
        )
        service.startService()
        self.services.append(service)
        self.addCleanup(self.stop, service)
        return service

    def stop(self, service: QueueService) -> None:
        if not service.running:
            return
        d = service.stopService()
        self.reactor.advance(30)
        self.successResultOf(d)

    def submit(self, service: QueueService, sub: Submission | None = None) -> Deferred[None]:
        body = MessageBody()
        body.append(BODY)
        return service.submit(sub or submission(), PREFIX, body)

    def envelope(self, queue_id: str = "q1") -> dict[str, Any]:
        data: dict[str, Any] = json.loads(encode_entry(Spool(self.root).read(queue_id)))
        return data

    def files(self) -> list[str]:
        return sorted(n for n in os.listdir(self.root) if not n.startswith("."))


class SubmitTests(ServiceTestCase):
    def test_provides_iqueue(self) -> None:
        """The service provides L{IQueue}; the fake next hop provides L{IOutbound}."""
        self.assertTrue(verifyObject(IQueue, self.start()))
        self.assertTrue(verifyObject(IOutbound, self.outbound))

    def test_fires_only_after_durable_write(self) -> None:
        """
        C{submit} fires once the entry's files are on disk (written in the pool), and only
        then is it logged and handed to the next hop.
        """
        self.pool.hold = True
        service = self.start()
        self.pool.run()  # the load
        self.outbound.policy = None
        with capturedLogs() as events:
            d = self.submit(service)
            self.assertNoResult(d)
            self.assertFalse((self.root / "q1.msg").exists())
            self.assertEqual(self.outbound.calls, [])
            self.pool.run()
            self.successResultOf(d)
        self.assertEqual(self.files(), ["control", "corrupt", "q1.msg"])
        self.assertEqual((self.root / "q1.msg").read_bytes()[: len(PREFIX + BODY)], PREFIX + BODY)
        self.assertEqual([e["event"] for e in events], ["queue.queued"])
        self.assertEqual(events[0]["size"], len(PREFIX + BODY))
        [(domain, [msg])] = self.outbound.calls
        self.assertEqual(domain, "example.net")
        self.assertEqual(msg.path, self.root / "q1.msg")
        self.assertEqual(msg.envid, "env-1")
        self.assertEqual([r.address for r in msg.recipients], ["bob@example.net"])

    def test_bad_submissions(self) -> None:
        """A bad or duplicate queue id, or no recipients, fails without a trace on disk."""
        service = self.start()
        self.outbound.policy = None
        self.successResultOf(self.submit(service))
        self.failureResultOf(self.submit(service), ValueError)
        self.failureResultOf(self.submit(service, submission("../x")), ValueError)
        empty = Submission("q2", "a@example.org", (), 0.0)
        self.failureResultOf(self.submit(service, empty), ValueError)
        self.assertEqual(self.files(), ["control", "corrupt", "q1.msg"])

    def test_submit_after_stop_waits_for_next_start(self) -> None:
        """A message accepted while stopping is written, and tried at the next start."""
        service = self.start()
        self.stop(service)
        self.successResultOf(self.submit(service))
        self.assertEqual(self.outbound.calls, [])
        self.assertTrue((self.root / "q1.msg").exists())
        self.start()
        self.assertEqual(len(self.outbound.calls), 1)


class AttemptTests(ServiceTestCase):
    def test_delivered_and_removed(self) -> None:
        """A delivered message is logged per recipient and removed, with no notice."""
        service = self.start()
        with capturedLogs() as events:
            self.successResultOf(
                self.submit(service, submission(addresses=("bob@example.net", "c@example.net")))
            )
        names = [e["event"] for e in events]
        self.assertEqual(names, ["queue.queued", "queue.attempt", "queue.attempt", "queue.removed"])
        self.assertEqual(events[1]["outcome"], "sent")
        self.assertEqual(events[1]["host"], "mx.example.net[192.0.2.1]")
        self.assertEqual(events[-1]["reason"], "delivered")
        self.assertEqual(self.files(), ["control", "corrupt"])
        self.assertEqual(self.notices, [])
        self.assertIsNone(service.entry("q1"))

    def test_removals_meanwhile_share_one_job_and_directory_sync(self) -> None:
        """
        Entries done while a removal is in the pool are removed together after it: one job
        and one directory sync for the batch; every one is gone and logged as delivered.
        """
        self.outbound.policy = None
        service = self.start()
        for qid in ("q1", "q2", "q3"):
            self.successResultOf(self.submit(service, submission(queue_id=qid)))
        batches: list[list[str]] = []
        syncs: list[Path] = []
        real_remove, real_changed = service.spool.remove_many, service.spool._dir_sync.changed

        def remove(queue_ids: list[str]) -> list[bool]:
            batches.append(list(queue_ids))
            return real_remove(queue_ids)

        def changed(path: Path) -> None:
            syncs.append(path)
            real_changed(path)

        self.patch(service.spool, "remove_many", remove)
        self.patch(service.spool._dir_sync, "changed", changed)
        self.pool.hold = True
        with capturedLogs() as events:
            while self.outbound.held:
                self.outbound.finish(sent)
            self.assertEqual(batches, [])
            self.pool.run()
        self.assertEqual([len(b) for b in batches], [1, 2])
        self.assertEqual(sorted(sum(batches, [])), ["q1", "q2", "q3"])
        self.assertEqual(syncs, [self.root, self.root])
        removed = [e["queue_id"] for e in events if e["event"] == "queue.removed"]
        self.assertEqual(sorted(removed), ["q1", "q2", "q3"])
        self.assertEqual(self.files(), ["control", "corrupt"])

    def test_deferred_recorded(self) -> None:
        """A deferral is recorded: attempts, next try, last reply."""
        self.outbound.policy = deferred
        service = self.start()
        with capturedLogs() as events:
            self.successResultOf(self.submit(service))
        attempt = [e for e in events if e["event"] == "queue.attempt"][0]
        self.assertEqual(attempt["next_try"], 60.0)
        env = self.envelope()
        self.assertEqual(env["domains"], {"example.net": {"attempts": 1, "next_try": 60.0}})
        self.assertEqual(env["recipients"][0]["code"], 451)
        self.assertEqual(env["recipients"][0]["state"], "pending")

    def test_restart_keeps_attempts_and_next_try(self) -> None:
        """After a restart an entry keeps its attempt count and waits for its next try."""
        self.outbound.policy = deferred
        service = self.start()
        self.successResultOf(self.submit(service))
        service.stopService()
        self.services.remove(service)
        self.start()
        self.assertEqual(len(self.outbound.calls), 1)
        self.reactor.advance(59)
        self.assertEqual(len(self.outbound.calls), 1)
        self.reactor.advance(1)
        self.assertEqual(len(self.outbound.calls), 2)
        self.assertEqual(self.envelope()["domains"]["example.net"]["attempts"], 2)

    def test_small_message_sent_from_memory_until_restart(self) -> None:
        """
        A small message queued by this process goes to delivery with its content in memory
        (the file's exact bytes); after a restart it is read from its file again.
        """
        self.outbound.policy = deferred
        service = self.start()
        self.successResultOf(self.submit(service))
        [(_, [first])] = self.outbound.calls
        self.assertEqual(first.data, PREFIX + BODY)
        self.assertEqual(first.data, (self.root / "q1.msg").read_bytes()[: first.size])
        service.stopService()
        self.services.remove(service)
        self.start()
        self.reactor.advance(60)
        self.assertEqual(len(self.outbound.calls), 2)
        self.assertIsNone(self.outbound.calls[-1][1][0].data)

    def test_state_recorded_before_removal(self) -> None:
        """
        A failed recipient's state (and the notice it owes) reaches the disk before the
        notice goes and the entry is removed; an entry all sent with nothing owed is removed
        at once (unlinking the envelope records it: no rewrite first).
        """
        for policy, expected in (
            (failed, ["save failed", "remove"]),
            (sent, ["remove"]),
        ):
            self.outbound.policy = policy
            self.assertEqual(self._writes_of_one_attempt(), expected)

    def _writes_of_one_attempt(self) -> list[str]:
        writes: list[str] = []
        service = self.start()
        real_save, real_remove = service.spool.save_encoded, service.spool.remove_many

        def save(queue_id: str, data: bytes) -> None:
            writes.append(f"save {json.loads(data)['recipients'][0]['state']}")
            real_save(queue_id, data)

        def remove(queue_ids: list[str]) -> list[bool]:
            writes.extend("remove" for _ in queue_ids)
            return real_remove(queue_ids)

        self.patch(service.spool, "save_encoded", save)
        self.patch(service.spool, "remove_many", remove)
        self.successResultOf(self.submit(service))
        service.stopService()
        self.services.remove(service)
        return writes

    def test_lock(self) -> None:
        """A second service on the same queue does not start; a stopped one lets go."""
        service = self.start()
        other = QueueService(
            self.root,
            self.settings,
            self.outbound,
            self.notify,
            "h",
            self.reactor,
            cast(ThreadPool, self.pool),
        )
        self.assertRaises(QueueLocked, other.startService)
        self.assertIsNone(try_lock(self.root / ".lock"))
        self.stop(service)
        fd = try_lock(self.root / ".lock")
        self.assertIsNotNone(fd)
        assert fd is not None
        release_lock(fd)

    def test_corrupt_entry_logged(self) -> None:
        """A corrupt envelope is moved aside and logged; the other entries are scheduled."""
        self.outbound.policy = None
        self.root.mkdir()
        Spool(self.root).prepare()
        (self.root / "bad.env").write_bytes(b"{not json")
        (self.root / "bad.msg").write_bytes(b"x")
        with capturedLogs() as events:
            service = self.start()
        self.assertEqual([e["event"] for e in events], ["queue.corrupt"])
        self.assertEqual(events[0]["queue_id"], "bad")
        self.assertTrue((self.root / "corrupt" / "bad.env").exists())
        self.successResultOf(self.submit(service))
        self.assertEqual(len(self.outbound.calls), 1)

    def test_stop_waits_for_attempts_in_flight(self) -> None:
        """A stop waits for an attempt in flight and records its result."""
        self.outbound.policy = None
        service = self.start()
        self.successResultOf(self.submit(service))
        d = service.stopService()
        self.reactor.advance(29)
        self.assertNoResult(d)
        self.outbound.finish(deferred)
        self.successResultOf(d)
        self.assertEqual(self.envelope()["domains"]["example.net"]["attempts"], 1)

    def test_stop_gives_up_after_grace(self) -> None:
        """A stop waits at most the grace period; the entry stays queued for the next start."""
        self.outbound.policy = None
        service = self.start()
        self.successResultOf(self.submit(service))
        d = service.stopService()
        self.reactor.advance(30)
        self.successResultOf(d)
        self.assertTrue((self.root / "q1.msg").exists())
        fd = try_lock(self.root / ".lock")
        assert fd is not None
        release_lock(fd)


class NoticeTests(ServiceTestCase):
    def notice(self, index: int = 0) -> Any:
        return parse(self.notices[index][2])

    def test_failure_notice(self) -> None:
        """
        A permanent failure sends one failure notice to the sender (after the result is
        recorded), then the entry is removed.
        """
        self.outbound.policy = failed
        service = self.start()
        with capturedLogs() as events:
            self.successResultOf(
                self.submit(
                    service,
                    submission(addresses=("bob@example.net", "c@example.net"), orcpt="rfc822;B@x"),
                )
            )
        [(notice_id, to, _)] = self.notices
        self.assertTrue(valid_queue_id(notice_id))
        self.assertEqual(to, "alice@example.org")
        msg = self.notice()
        blocks = msg.get_payload()[1].get_payload()
        self.assertEqual(blocks[0]["Original-Envelope-Id"], "env-1")
        self.assertEqual([b["Action"] for b in blocks[1:]], ["failed", "failed"])
        self.assertEqual(blocks[1]["Status"], "5.1.1")
        self.assertEqual(blocks[1]["Original-Recipient"], "rfc822; B@x")
        self.assertEqual(blocks[1]["Diagnostic-Code"], "smtp; 550 5.1.1 no such user")
        names = [e["event"] for e in events]
        self.assertEqual(names[-2:], ["queue.notice", "queue.removed"])
        self.assertEqual(events[-2]["kind"], "failure")
        self.assertEqual(events[-1]["reason"], "bounced")
        self.assertEqual(self.files(), ["control", "corrupt"])

    def test_no_notice_to_null_sender_or_notify_never(self) -> None:
        """No failure notice for the null sender, nor for NOTIFY=NEVER."""
        self.outbound.policy = failed
        service = self.start()
        self.successResultOf(self.submit(service, submission("q1", sender="")))
        self.successResultOf(self.submit(service, submission("q2", notify=frozenset({"NEVER"}))))
        self.assertEqual(self.notices, [])
        self.assertEqual(self.files(), ["control", "corrupt"])

    def test_owed_notice_survives_failure_and_restart(self) -> None:
        """
        When the notice cannot be handed over, the entry stays with the notice owed; the next
        start sends it and removes the entry.
        """
        self.outbound.policy = failed
        self.notify_fails = True
        service = self.start()
        self.successResultOf(self.submit(service))
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertEqual(self.envelope()["recipients"][0]["notice"], "failure")
        self.assertEqual(self.envelope()["recipients"][0]["state"], "failed")
        self.stop(service)
        self.notify_fails = False
        self.start()
        self.assertEqual(len(self.notices), 1)
        self.assertEqual(self.files(), ["control", "corrupt"])

    def test_relayed_notice(self) -> None:
        """
        NOTIFY=SUCCESS and a next hop that did not take the DSN parameters: a "relayed"
        notice; when it did take them, none (it reports from there on).
        """
        self.outbound.policy = sent
        service = self.start()
        self.successResultOf(self.submit(service, submission("q1", notify=frozenset({"SUCCESS"}))))
        self.assertEqual(len(self.notices), 1)
        blocks = self.notice().get_payload()[1].get_payload()
        self.assertEqual(blocks[1]["Action"], "relayed")
        self.outbound.policy = lambda a, m: RcptResult(a, "sent", 250, "ok", "mx", dsn_relayed=True)
        self.successResultOf(self.submit(service, submission("q2", notify=frozenset({"SUCCESS"}))))
        self.assertEqual(len(self.notices), 1)

    def test_expiry_notice(self) -> None:
        """A message deferred until expiry bounces with 4.4.7 and the last reply."""
        self.outbound.policy = deferred
        service = self.start()
        self.successResultOf(self.submit(service))
        with capturedLogs() as events:
            self.reactor.pump([HOUR] * 120)
        failures = [n for n in self.notices if b"Undelivered" in n[2]]
        self.assertEqual(len(failures), 1)
        msg = parse(failures[0][2])
        block = msg.get_payload()[1].get_payload()[1]
        self.assertEqual(block["Status"], "4.4.7")
        self.assertEqual(block["Action"], "failed")
        self.assertEqual(block["Diagnostic-Code"], "smtp; 451 4.3.0 try later")
        self.assertIn("not delivered within 5 days", msg.get_payload()[0].get_payload())
        removed = [e for e in events if e["event"] == "queue.removed"]
        self.assertEqual([e["reason"] for e in removed], ["expired"])
        self.assertEqual(self.files(), ["control", "corrupt"])

    def test_delay_notice_once(self) -> None:
        """One delay notice at 4 h, recorded so that it is not sent again."""
        self.outbound.policy = deferred
        service = self.start()
        self.successResultOf(self.submit(service))
        self.reactor.pump([600.0] * int(4 * HOUR / 600 - 1))
        self.assertEqual(self.notices, [])
        self.reactor.advance(600)
        self.assertEqual(len(self.notices), 1)
        msg = self.notice()
        self.assertEqual(msg["Subject"], "Delayed Mail (still being retried)")
        self.assertEqual(msg.get_payload()[1].get_payload()[1]["Action"], "delayed")
        self.assertTrue(self.envelope()["delay_notified"])
        self.stop(service)
        self.start()
        self.reactor.pump([HOUR] * 20)
        self.assertEqual(len(self.notices), 1)


class ControlTests(ServiceTestCase):
    def test_retry_request(self) -> None:
        """A retry request in control/ makes the entry due within a second, then goes away."""
        self.outbound.policy = deferred
        service = self.start()
        self.successResultOf(self.submit(service))
        self.reactor.advance(10)
        request = service.spool.write_request("retry", "q1")
        self.assertEqual(len(self.outbound.calls), 1)
        self.reactor.advance(1)
        self.assertEqual(len(self.outbound.calls), 2)
        self.assertFalse(request.exists())
        self.assertEqual(self.envelope()["domains"]["example.net"]["attempts"], 2)

    def test_retry_all(self) -> None:
        """C{retry.ALL} makes every entry due."""
        self.outbound.policy = deferred
        service = self.start()
        self.successResultOf(self.submit(service, submission("q1")))
        self.successResultOf(self.submit(service, submission("q2", addresses=("x@example.com",))))
        service.spool.write_request("retry", "ALL")
        self.reactor.advance(1)
        self.assertEqual(len(self.outbound.calls), 4)

    def test_delete_request_while_in_flight(self) -> None:
        """
        A delete request removes the entry without a notice, even while an attempt is in
        flight; that attempt's result does not bring it back.
        """
        self.outbound.policy = None
        service = self.start()
        self.successResultOf(self.submit(service))
        request = service.spool.write_request("delete", "q1")
        with capturedLogs() as events:
            self.reactor.advance(1)
        self.assertFalse(request.exists())
        self.assertEqual(self.files(), ["control", "corrupt"])
        self.assertEqual(
            [(e["event"], e["reason"]) for e in events], [("queue.removed", "deleted")]
        )
        self.outbound.finish(failed)
        self.assertEqual(self.files(), ["control", "corrupt"])
        self.assertEqual(self.notices, [])
        self.reactor.advance(DAY)
        self.assertEqual(len(self.outbound.calls), 1)

    def test_delete_unknown(self) -> None:
        """A request for an unknown entry is consumed and changes nothing."""
        service = self.start()
        request = service.spool.write_request("delete", "nope")
        self.reactor.advance(1)
        self.assertFalse(request.exists())

    def test_delete_api(self) -> None:
        """C{delete} fires with whether there was such an entry."""
        self.outbound.policy = deferred
        service = self.start()
        self.successResultOf(self.submit(service))
        self.assertTrue(self.successResultOf(service.delete("q1")))
        self.assertFalse(self.successResultOf(service.delete("q1")))
        self.reactor.advance(DAY)
        self.assertEqual(len(self.outbound.calls), 1)


class RealThreadPoolTests(TestCase):
    """The service on the real reactor and a real thread pool."""

    async def test_submit_deliver_remove(self) -> None:
        """A submission is written by the pool, delivered, recorded and removed."""
        from twisted.internet import reactor

        pool = ThreadPool(minthreads=1, maxthreads=4, name="test-queue")
        pool.start()
        self.addCleanup(pool.stop)
        root = Path(self.mktemp())
        outbound = FakeOutbound()
        service = QueueService(
            root,
            QueueConfig(),
            outbound,
            lambda i, r, m: succeed(None),
            "mail.example.org",
            cast(Any, reactor),
            pool,
        )
        service.startService()
        self.addCleanup(lambda: service.stopService() if service.running else None)
        body = MessageBody()
        body.append(BODY)
        await service.submit(submission(received=cast(Any, reactor).seconds()), PREFIX, body)
        # Durable when submit fired: still on disk, or already handed on (only after the write).
        self.assertTrue((root / "q1.msg").exists() or outbound.calls)
        for _ in range(500):
            if service.entry("q1") is None:
                break
            await deferLater(cast(Any, reactor), 0.01, lambda: None)
        self.assertIsNone(service.entry("q1"))
        self.assertEqual(len(outbound.calls), 1)
        self.assertFalse((root / "q1.env").exists())
        self.assertFalse((root / "q1.msg").exists())
        await service.stopService()
