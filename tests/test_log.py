"""Tests for L{mailserver.log}: events carry fixed names and fields, and no secret."""

from __future__ import annotations

import io
import json
import time

from twisted.logger import (
    Logger,
    LogLevel,
    capturedLogs,
    eventFromJSON,
    formatEvent,
    jsonFileLogObserver,
)
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from mailserver import log


class EventTests(SynchronousTestCase):
    def test_message_accepted_fields(self) -> None:
        """message.accepted carries session, peer, msgid, sender, recipients and size."""
        with capturedLogs() as events:
            log.message_accepted("s1", "192.0.2.1", "m1", "a@b.example", ["x@y", "z@y"], 42)
        [e] = events
        self.assertEqual(e["event"], "message.accepted")
        self.assertEqual(
            (e["session"], e["peer"], e["msgid"], e["sender"], e["recipients"], e["size"]),
            ("s1", "192.0.2.1", "m1", "a@b.example", ["x@y", "z@y"], 42),
        )
        self.assertEqual(e["log_level"], LogLevel.info)

    def test_observer_writes_json_lines_off_a_terminal(self) -> None:
        """Off a terminal the observer writes one JSON object per line."""
        out = io.StringIO()
        self.patch(log.sys, "stdout", out)
        self.patch(log.os, "environ", {})
        observer = log.observer()
        with capturedLogs() as events:
            log.delivered("m1", "alice@example.org", "f1", 10)
            log.smtp_rejected("s1", "192.0.2.1", "RCPT", 550, "No such user here")
        for e in events:
            observer(e)
        log.drain()
        lines = out.getvalue().strip("\n").split("\n")
        self.assertEqual(len(lines), 2)
        record = json.loads(lines[0].lstrip("\x1e"))
        self.assertEqual(record["event"], "message.delivered")
        self.assertEqual(record["account"], "alice@example.org")

    def test_json_lines_are_twisteds_lines(self) -> None:
        """
        Our events' JSON lines carry what Twisted's jsonFileLogObserver writes (less the
        flattened copy of the fields), in the same order, and read back into the same text.
        """
        with capturedLogs() as events:
            log.delivery_attempt("q1", "x@y.example", "mx[192.0.2.7]", "deferred", 451, "busy", 9.5)
            log.message_accepted("s1", "192.0.2.1", "m1", "a@b.example", ["x@y", "z@y"], 42)
        for event in events:
            ours, theirs = io.StringIO(), io.StringIO()
            log.JSONLines(ours)(event)
            jsonFileLogObserver(theirs)(event)
            self.assertTrue(ours.getvalue().startswith("\x1e"))
            self.assertTrue(ours.getvalue().endswith("\n"))
            expected = json.loads(theirs.getvalue().lstrip("\x1e"))
            del expected["log_flattened"]
            got = json.loads(ours.getvalue().lstrip("\x1e"))
            got.pop("log_flattened", None)  # there when another observer flattened the event
            self.assertEqual(list(got.items()), list(expected.items()))
            self.assertEqual(
                formatEvent(eventFromJSON(ours.getvalue().lstrip("\x1e"))), formatEvent(event)
            )

    def test_json_lines_of_other_events_go_the_usual_way(self) -> None:
        """An event with a failure, or a value JSON cannot carry, is written by Twisted's code."""
        out = io.StringIO()
        observer = log.JSONLines(out)
        with capturedLogs() as events:
            log.queue_error(Failure(ZeroDivisionError("no")), "q1", "testing")
            Logger().info("odd {x}", event="odd", x=object())
        for event in events:
            observer(event)
        lines = [json.loads(line.lstrip("\x1e")) for line in out.getvalue().split("\n") if line]
        self.assertEqual([line["event"] for line in lines], ["queue.error", "odd"])
        self.assertIn("log_failure", lines[0])
        self.assertIn("log_flattened", lines[1])
        self.flushLoggedErrors(ZeroDivisionError)

    def test_observer_text_when_forced(self) -> None:
        """MAILSERVER_LOG_FORMAT=text gives readable lines with the peer first."""
        out = io.StringIO()
        self.patch(log.sys, "stdout", out)
        self.patch(log.os, "environ", {"MAILSERVER_LOG_FORMAT": "text"})
        observer = log.observer()
        with capturedLogs() as events:
            log.smtp_rejected("s1", "192.0.2.9", "RCPT", 550, "No such user here")
        for e in events:
            observer(e)
        self.assertIn("[192.0.2.9] session=s1 RCPT rejected: 550 No such user here", out.getvalue())


class BatchedWriterTests(SynchronousTestCase):
    def test_lines_leave_together_on_drain(self) -> None:
        """Writes and the observer's flushes cost nothing; drain writes them all at once."""
        out = io.StringIO()
        writer = log.BatchedWriter(out, start=False)
        writer.write("one\n")
        writer.flush()
        writer.write("two\n")
        self.assertEqual(out.getvalue(), "")
        writer.drain()
        self.assertEqual(out.getvalue(), "one\ntwo\n")
        writer.drain()
        self.assertEqual(out.getvalue(), "one\ntwo\n")

    def test_thread_drains_within_interval(self) -> None:
        """Left alone, collected lines reach the stream within a few intervals."""
        out = io.StringIO()
        writer = log.BatchedWriter(out, interval=0.01)
        self.addCleanup(writer._stopped.set)
        writer.write("line\n")
        for _ in range(200):
            if out.getvalue():
                break
            time.sleep(0.01)
        self.assertEqual(out.getvalue(), "line\n")
