"""Tests for L{mailserver.iopool}: jobs run in the pool's threads and their results come back."""

from __future__ import annotations

import threading

from twisted.internet import reactor
from twisted.internet.threads import deferToThreadPool
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailserver.iopool import IOPool


class IOPoolTests(TestCase):
    def setUp(self) -> None:
        self.pool = IOPool(3, "test-io")
        self.pool.start()
        self.addCleanup(self.pool.stop)

    async def test_result_comes_back_to_the_reactor(self) -> None:
        """deferToThreadPool gets the job's value, computed off the reactor thread."""
        main = threading.get_ident()
        value = await deferToThreadPool(
            reactor, self.pool, lambda x: (x * 2, threading.get_ident()), 21
        )
        self.assertEqual(value[0], 42)
        self.assertNotEqual(value[1], main)

    async def test_exception_becomes_a_failure(self) -> None:
        """A job that raises fails its Deferred with that exception."""

        def boom() -> None:
            raise OSError("disk gone")

        with self.assertRaises(OSError) as cm:
            await deferToThreadPool(reactor, self.pool, boom)
        self.assertEqual(str(cm.exception), "disk gone")

    async def test_jobs_run_in_parallel(self) -> None:
        """Up to C{size} jobs run at once: three jobs that wait for each other all finish."""
        barrier = threading.Barrier(3, timeout=10)
        results = [deferToThreadPool(reactor, self.pool, barrier.wait) for _ in range(3)]
        self.assertEqual(sorted([await d for d in results]), [0, 1, 2])


class LifecycleTests(SynchronousTestCase):
    def test_jobs_before_start_run_after_it_and_stop_waits_for_them(self) -> None:
        """Jobs queued before start run once started; stop returns after they are done."""
        pool = IOPool(2, "test-io")
        done: list[int] = []
        lock = threading.Lock()

        def job(i: int) -> None:
            with lock:
                done.append(i)

        for i in range(20):
            pool.callInThread(job, i)
        self.assertEqual(done, [])
        pool.start()
        pool.stop()
        self.assertEqual(sorted(done), list(range(20)))
        self.assertEqual([t for t in threading.enumerate() if t.name.startswith("test-io")], [])

    def test_results_reach_the_callback(self) -> None:
        """callInThreadWithCallback reports (True, value) or (False, failure)."""
        pool = IOPool(1, "test-io")
        seen: list[tuple[bool, object]] = []
        pool.callInThreadWithCallback(lambda ok, r: seen.append((ok, r)), lambda: 7)
        pool.callInThreadWithCallback(lambda ok, r: seen.append((ok, r)), lambda: 1 // 0)
        pool.start()
        pool.stop()
        self.assertEqual(seen[0], (True, 7))
        ok, failure = seen[1]
        self.assertFalse(ok)
        self.assertTrue(failure.check(ZeroDivisionError))  # type: ignore[attr-defined]

    def test_failing_result_callback_leaves_the_thread_working(self) -> None:
        """A result callback that raises is logged; the pool's one thread runs the next job."""
        pool = IOPool(1, "test-io")
        seen: list[object] = []

        def bad(ok: bool, result: object) -> None:
            raise RuntimeError("callback broke")

        pool.callInThreadWithCallback(bad, lambda: 1)
        pool.callInThreadWithCallback(lambda ok, r: seen.append(r), lambda: 2)
        pool.start()
        pool.stop()
        self.assertEqual(seen, [2])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
