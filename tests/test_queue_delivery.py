"""
Tests for L{mailserver.queue.delivery.Outbound}: real connections on loopback to SMTP sinks
(L{tests.netsim}) found through a real DNS server on loopback. MX hosts are 127.0.0.2,
127.0.0.3, ... all on one port, given to L{Outbound} as its MX port; a "down" host is an
address where nothing listens on that port.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SkipTest, TestCase
from zope.interface.verify import verifyObject

from mailserver.config import QueueConfig, RelayConfig, RouteConfig
from mailserver.dns import Resolver
from mailserver.interfaces import IOutbound
from mailserver.queue.delivery import Outbound
from mailserver.queue.model import Outgoing, QueuedRecipient, RcptResult
from tests.netsim import (
    Sink,
    SinkBehaviour,
    TestCA,
    start_dns,
    start_sink,
    start_sinks,
)

reactor: Any = _reactor


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


BODY = b"From: <sender@here.test>\r\nSubject: test\r\n\r\nHello.\r\n"
MX1, MX2, MX3, DOWN = "127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.9"


class OutboundTestCase(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.dir.mkdir()
        self.count = 0
        self.dns = start_dns(
            reactor,
            {
                "example.test": {"MX": [(10, "mx1.example.test"), (20, "mx2.example.test")]},
                "mx1.example.test": {"A": [MX1]},
                "mx2.example.test": {"A": [MX2]},
                "mx3.example.test": {"A": [MX3]},
                "down.example.test": {"A": [DOWN]},
                "plain.test": {"A": [MX1]},
                "nomail.test": {"TXT": ["no records for mail"]},
                "null.test": {"MX": [(0, ".")]},
                "broken.test": {"SERVFAIL": True},
                "smtp.relay.test": {"A": ["127.0.0.5"]},
            },
        )
        self.addCleanup(self.dns.stop)

    def sinks(self, **behaviours: SinkBehaviour | None) -> tuple[int, dict[str, Sink]]:
        """Sinks on the addresses named mx1, mx2, mx3 (all on one port)."""
        names = {"mx1": MX1, "mx2": MX2, "mx3": MX3}
        port, started = start_sinks(reactor, {names[k]: v for k, v in behaviours.items()})
        for sink in started.values():
            self.addCleanup(sink.stop)
        return port, {k: started[names[k]] for k in behaviours}

    def outbound(self, port: int, **kw: Any) -> Outbound:
        resolver = Resolver(reactor, [self.dns.nameserver], timeout=5)
        queue = kw.pop("queue", QueueConfig(mx_port=port, connect_timeout=5, command_timeout=10))
        outbound = Outbound(reactor, resolver, queue, "mail.here.test", **kw)
        self.addCleanup(outbound.close_idle)
        return outbound

    def message(
        self, *rcpts: str, body: bytes = BODY, sender: str = "sender@here.test", **kw: Any
    ) -> Outgoing:
        self.count += 1
        path = self.dir / f"msg{self.count}"
        path.write_bytes(body)
        return Outgoing(
            queue_id=f"q{self.count}",
            sender=sender,
            recipients=tuple(QueuedRecipient(r) for r in rcpts or ("alice@example.test",)),
            path=path,
            size=len(body),
            **kw,
        )

    def outcomes(self, results: list[list[RcptResult]]) -> list[list[tuple[str, str]]]:
        return [[(r.address, r.outcome) for r in message] for message in results]


class MXTests(OutboundTestCase):
    async def test_interface(self) -> None:
        verifyObject(IOutbound, self.outbound(25))

    async def test_preferred_mx(self) -> None:
        """The lowest preference takes the mail; the message arrives byte for byte."""
        port, s = self.sinks(mx1=None, mx2=None)
        results = await self.outbound(port).send("example.test", [self.message()])
        self.assertEqual(self.outcomes(results), [[("alice@example.test", "sent")]])
        self.assertEqual(results[0][0].host, f"mx1.example.test[{MX1}]")
        self.assertEqual(results[0][0].code, 250)
        self.assertEqual(len(s["mx1"].messages), 1)
        self.assertEqual(s["mx2"].connections, 0)
        got = s["mx1"].messages[0]
        self.assertEqual(got.data, BODY)
        self.assertEqual(got.mail_from, "sender@here.test")
        self.assertEqual(got.recipients, ["alice@example.test"])
        self.assertEqual(got.helo, "mail.here.test")
        self.assertTrue(results[0][0].dsn_relayed)

    async def test_fallback_when_first_down(self) -> None:
        """The first MX does not answer on the port: the next one takes the mail."""
        self.dns.set("mx1.example.test", "A", [DOWN])
        port, s = self.sinks(mx2=None)
        results = await self.outbound(port).send("example.test", [self.message()])
        self.assertEqual(self.outcomes(results), [[("alice@example.test", "sent")]])
        self.assertEqual(results[0][0].host, f"mx2.example.test[{MX2}]")
        self.assertEqual(len(s["mx2"].messages), 1)

    async def test_fallback_after_421_greeting(self) -> None:
        port, s = self.sinks(mx1=SinkBehaviour(greeting=421), mx2=None)
        results = await self.outbound(port).send("example.test", [self.message()])
        self.assertEqual(results[0][0].outcome, "sent")
        self.assertEqual(s["mx1"].connections, 1)
        self.assertEqual(len(s["mx2"].messages), 1)

    async def test_refused_greeting_everywhere(self) -> None:
        """554 greetings everywhere: deferred (the reply in the text, code 0), host named."""
        port, s = self.sinks(mx1=SinkBehaviour(greeting=554), mx2=SinkBehaviour(greeting=554))
        results = await self.outbound(port).send("example.test", [self.message()])
        r = results[0][0]
        self.assertEqual((r.outcome, r.code, r.host), ("deferred", 0, f"mx2.example.test[{MX2}]"))
        self.assertIn("greeting: 554", r.text)
        self.assertEqual((s["mx1"].connections, s["mx2"].connections), (1, 1))

    async def test_fallback_when_mx_host_unknown(self) -> None:
        """An MX host whose name does not exist is skipped."""
        self.dns.set("example.test", "MX", [(5, "gone.example.test"), (10, "mx2.example.test")])
        port, s = self.sinks(mx2=None)
        results = await self.outbound(port).send("example.test", [self.message()])
        self.assertEqual(results[0][0].outcome, "sent")

    async def test_all_down(self) -> None:
        """No MX answers: everyone deferred with the last host and the reason."""
        self.dns.set("mx1.example.test", "A", [DOWN])
        self.dns.set("mx2.example.test", "A", ["127.0.0.10"])
        port, _ = self.sinks(mx3=None)  # something on the port elsewhere, to have a port
        results = await self.outbound(port).send(
            "example.test", [self.message("a@example.test", "b@example.test"), self.message()]
        )
        self.assertEqual(
            [[r.outcome for r in m] for m in results], [["deferred", "deferred"], ["deferred"]]
        )
        text = results[0][0].text
        self.assertIn("mx2.example.test[127.0.0.10]", text)
        self.assertIn("connection refused", text)
        self.assertTrue(text.startswith("4.4.1 "))

    async def test_ipv6_after_ipv4(self) -> None:
        """A host's IPv4 addresses are tried first, then its IPv6 ones."""
        if not _ipv6_loopback():
            raise SkipTest("no IPv6 loopback here")
        self.dns.set("mx1.example.test", "A", [DOWN])
        self.dns.set("mx1.example.test", "AAAA", ["::1"])
        port, s = self.sinks(mx2=None)
        sink = start_sink(reactor, interface="::1", port=port)
        self.addCleanup(sink.stop)
        results = await self.outbound(port).send("example.test", [self.message()])
        self.assertEqual(results[0][0].outcome, "sent")
        self.assertEqual(results[0][0].host, "mx1.example.test[::1]")
        self.assertEqual(len(sink.messages), 1)
        self.assertEqual(s["mx2"].connections, 0)

    async def test_equal_preference_randomised(self) -> None:
        """MX hosts of equal preference share the mail (seeded random source)."""
        self.dns.set("example.test", "MX", [(10, "mx1.example.test"), (10, "mx2.example.test")])
        port, s = self.sinks(mx1=None, mx2=None)
        # Without the connection cache: each send chooses again.
        queue = QueueConfig(
            mx_port=port, connect_timeout=5, command_timeout=10, connection_cache_time=0
        )
        outbound = self.outbound(port, rng=random.Random(7), queue=queue)
        for _ in range(12):
            await outbound.send("example.test", [self.message()])
            if s["mx1"].messages and s["mx2"].messages:
                break
        self.assertTrue(s["mx1"].messages)
        self.assertTrue(s["mx2"].messages)

    async def test_random_source_injected(self) -> None:
        class Reverse(random.Random):
            def shuffle(self, x: Any) -> None:  # type: ignore[override]
                x.reverse()

        self.dns.set("example.test", "MX", [(10, "mx1.example.test"), (10, "mx2.example.test")])
        port, s = self.sinks(mx1=None, mx2=None)
        results = await self.outbound(port, rng=Reverse()).send("example.test", [self.message()])
        self.assertEqual(results[0][0].host, f"mx2.example.test[{MX2}]")

    async def test_no_mx_uses_address(self) -> None:
        """No MX record: the domain's own A record (RFC 5321 §5.1)."""
        port, s = self.sinks(mx1=None)
        results = await self.outbound(port).send("plain.test", [self.message("x@plain.test")])
        self.assertEqual(self.outcomes(results), [[("x@plain.test", "sent")]])
        self.assertEqual(results[0][0].host, f"plain.test[{MX1}]")
        self.assertEqual(s["mx1"].messages[0].recipients, ["x@plain.test"])

    async def test_no_mx_no_address(self) -> None:
        results = await self.outbound(2525).send("nomail.test", [self.message("x@nomail.test")])
        self.assertEqual(results[0][0].outcome, "failed")
        self.assertTrue(results[0][0].text.startswith("5.1.2 "))

    async def test_null_mx(self) -> None:
        """A null MX bounces at once with 556 5.1.10 (RFC 7505); nobody is contacted."""
        port, s = self.sinks(mx1=None)
        results = await self.outbound(port).send(
            "null.test", [self.message("a@null.test", "b@null.test")]
        )
        self.assertEqual([(r.outcome, r.code) for r in results[0]], [("failed", 556)] * 2)
        self.assertTrue(results[0][0].text.startswith("5.1.10 "))
        self.assertEqual(s["mx1"].connections, 0)

    async def test_nxdomain(self) -> None:
        results = await self.outbound(2525).send("nowhere.test", [self.message("a@nowhere.test")])
        self.assertEqual(results[0][0].outcome, "failed")
        self.assertTrue(results[0][0].text.startswith("5.1.2 "))
        self.assertIn("domain not found", results[0][0].text)

    async def test_dns_temporary(self) -> None:
        results = await self.outbound(2525).send("broken.test", [self.message("a@broken.test")])
        self.assertEqual(results[0][0].outcome, "deferred")
        self.assertEqual(results[0][0].code, 0)
        self.assertTrue(results[0][0].text.startswith("4.4.3 "))


class ReplyTests(OutboundTestCase):
    async def test_4xx_deferred_then_sent(self) -> None:
        port, s = self.sinks(mx1=SinkBehaviour(temp_fail=1, temp_fail_at="rcpt"))
        outbound = self.outbound(port)
        first = await outbound.send("example.test", [self.message()])
        self.assertEqual([(r.outcome, r.code) for r in first[0]], [("deferred", 451)])
        self.assertEqual(s["mx1"].messages, [])
        second = await outbound.send("example.test", [self.message()])
        self.assertEqual(second[0][0].outcome, "sent")
        self.assertEqual(len(s["mx1"].messages), 1)

    async def test_4xx_after_data(self) -> None:
        port, s = self.sinks(mx1=SinkBehaviour(temp_fail=1, temp_fail_at="data"))
        results = await self.outbound(port).send(
            "example.test", [self.message("a@example.test", "b@example.test"), self.message()]
        )
        self.assertEqual(
            [[(r.outcome, r.code) for r in m] for m in results],
            [[("deferred", 451), ("deferred", 451)], [("sent", 250)]],
        )
        self.assertEqual(s["mx1"].connections, 1)

    async def test_5xx_per_recipient(self) -> None:
        port, s = self.sinks(mx1=SinkBehaviour(reject=frozenset({"bob@example.test"})))
        results = await self.outbound(port).send(
            "example.test", [self.message("alice@example.test", "bob@example.test")]
        )
        self.assertEqual(
            [(r.address, r.outcome, r.code, r.text) for r in results[0]],
            [
                ("alice@example.test", "sent", 250, "2.0.0 message accepted"),
                ("bob@example.test", "failed", 550, "5.1.1 no such user"),
            ],
        )
        self.assertEqual(s["mx1"].messages[0].recipients, ["alice@example.test"])

    async def test_mail_refused(self) -> None:
        port, _ = self.sinks(mx1=SinkBehaviour(mail_reply="550 5.7.1 not from you"))
        results = await self.outbound(port).send(
            "example.test", [self.message("a@example.test", "b@example.test")]
        )
        self.assertEqual([(r.outcome, r.code) for r in results[0]], [("failed", 550)] * 2)

    async def test_drop_mid_data(self) -> None:
        """The connection dies in DATA: that message deferred; a new one carries the rest."""
        port, s = self.sinks(mx1=SinkBehaviour(drop_in_data=1))
        results = await self.outbound(port).send(
            "example.test", [self.message("a@example.test"), self.message("b@example.test")]
        )
        self.assertEqual(
            self.outcomes(results), [[("a@example.test", "deferred")], [("b@example.test", "sent")]]
        )
        self.assertIn(f"mx1.example.test[{MX1}]", results[0][0].text)
        self.assertEqual([m.recipients for m in s["mx1"].messages], [["b@example.test"]])
        self.assertEqual(s["mx1"].connections, 2)

    async def test_drop_every_time_is_bounded(self) -> None:
        """A host that always drops: a bounded number of connections, then deferred."""
        port, s = self.sinks(mx1=SinkBehaviour(drop_in_data=100))
        messages = [self.message() for _ in range(6)]
        results = await self.outbound(port).send("example.test", messages)
        self.assertEqual([m[0].outcome for m in results], ["deferred"] * 6)
        self.assertLessEqual(s["mx1"].connections, 3)

    async def test_connection_reuse(self) -> None:
        port, s = self.sinks(mx1=None)
        messages = [self.message(f"u{i}@example.test") for i in range(3)]
        results = await self.outbound(port).send("example.test", messages)
        self.assertEqual([m[0].outcome for m in results], ["sent"] * 3)
        self.assertEqual(s["mx1"].connections, 1)
        self.assertEqual(
            [m.recipients[0] for m in s["mx1"].messages],
            ["u0@example.test", "u1@example.test", "u2@example.test"],
        )

    async def test_messages_per_connection(self) -> None:
        port, s = self.sinks(mx1=None)
        queue = QueueConfig(
            mx_port=port, connect_timeout=5, command_timeout=10, messages_per_connection=2
        )
        results = await self.outbound(port, queue=queue).send(
            "example.test", [self.message() for _ in range(3)]
        )
        self.assertEqual([m[0].outcome for m in results], ["sent"] * 3)
        self.assertEqual(s["mx1"].connections, 2)

    async def test_no_pipelining_peer(self) -> None:
        port, s = self.sinks(
            mx1=SinkBehaviour(pipelining=False, reject=frozenset({"b@example.test"}))
        )
        results = await self.outbound(port).send(
            "example.test", [self.message("a@example.test", "b@example.test", "c@example.test")]
        )
        self.assertEqual([r.outcome for r in results[0]], ["sent", "failed", "sent"])

    async def test_helo_only_peer(self) -> None:
        """A peer that refuses EHLO gets HELO and no ESMTP parameter."""
        port, s = self.sinks(mx1=SinkBehaviour(ehlo=False))
        results = await self.outbound(port).send(
            "example.test", [self.message(eight_bit=True, envid="x", ret="HDRS")]
        )
        self.assertEqual(results[0][0].outcome, "sent")
        self.assertEqual(s["mx1"].messages[0].mail_params, {})
        self.assertFalse(results[0][0].dsn_relayed)

    async def test_smtputf8_to_peer_without(self) -> None:
        """RFC 6531 §3.4: a message needing SMTPUTF8 fails (5.6.7) at a hop without it."""
        port, s = self.sinks(mx1=SinkBehaviour(smtputf8=False))
        results = await self.outbound(port).send(
            "example.test", [self.message("ü@example.test", smtputf8=True)]
        )
        self.assertEqual(results[0][0].outcome, "failed")
        self.assertTrue(results[0][0].text.startswith("5.6.7 "))
        self.assertEqual(s["mx1"].messages, [])
        self.assertNotIn("MAIL", " ".join(s["mx1"].commands))

    async def test_smtputf8_to_peer_with(self) -> None:
        port, s = self.sinks(mx1=None)
        results = await self.outbound(port).send(
            "example.test", [self.message("ü@example.test", sender="jörg@here.test", smtputf8=True)]
        )
        self.assertEqual(results[0][0].outcome, "sent")
        got = s["mx1"].messages[0]
        self.assertEqual((got.mail_from, got.recipients), ("jörg@here.test", ["ü@example.test"]))
        self.assertIn("SMTPUTF8", got.mail_params)

    async def test_dsn_parameters_arrive(self) -> None:
        port, s = self.sinks(mx1=None)
        msg = Outgoing(
            queue_id="q",
            sender="s@here.test",
            recipients=(
                QueuedRecipient(
                    "a@example.test", frozenset({"SUCCESS"}), "rfc822;a+b@example.test"
                ),
            ),
            path=self.message().path,
            size=len(BODY),
            envid="env 1",
            ret="HDRS",
            eight_bit=True,
        )
        await self.outbound(port).send("example.test", [msg])
        got = s["mx1"].messages[0]
        self.assertEqual(
            got.mail_params,
            {"SIZE": str(len(BODY)), "BODY": "8BITMIME", "RET": "HDRS", "ENVID": "env+201"},
        )
        self.assertEqual(
            got.rcpts[0][1], {"NOTIFY": "SUCCESS", "ORCPT": "rfc822;a+2Bb@example.test"}
        )

    async def test_canonical_and_stuffed_on_the_wire(self) -> None:
        """Bare LFs arrive as CRLF; dot lines are stuffed on the wire and come back intact."""
        port, s = self.sinks(mx1=None)
        body = b"Subject: x\n\n.leading dot\n.\nlast line without end"
        await self.outbound(port).send("example.test", [self.message(body=body)])
        got = s["mx1"].messages[0]
        self.assertEqual(
            got.data, b"Subject: x\r\n\r\n.leading dot\r\n.\r\nlast line without end\r\n"
        )
        self.assertIn(b"\r\n..leading dot\r\n..\r\n", got.raw)

    async def test_large_message(self) -> None:
        """A message over 256 KiB is streamed and arrives whole."""
        port, s = self.sinks(mx1=None)
        body = b"".join(b"line %06d %s\r\n" % (i, b"x" * 60) for i in range(20000))
        results = await self.outbound(port).send("example.test", [self.message(body=body)])
        self.assertEqual(results[0][0].outcome, "sent")
        self.assertEqual(s["mx1"].messages[0].data, body)

    async def test_size_limit_of_peer(self) -> None:
        port, s = self.sinks(mx1=SinkBehaviour(size=10))
        results = await self.outbound(port).send("example.test", [self.message()])
        self.assertEqual(results[0][0].outcome, "failed")
        self.assertTrue(results[0][0].text.startswith("5.3.4 "))


class RouteAndRelayTests(OutboundTestCase):
    async def test_route_to_address(self) -> None:
        """A [[route]] to [127.0.0.1]:port: no DNS at all."""
        sink = start_sink(reactor, interface="127.0.0.1")
        self.addCleanup(sink.stop)
        routes = [RouteConfig(domain="partner.test", host=f"[127.0.0.1]:{sink.port}")]
        results = await self.outbound(2525, routes=routes).send(
            "partner.test", [self.message("p@partner.test")]
        )
        self.assertEqual(results[0][0].outcome, "sent")
        self.assertEqual(results[0][0].host, "127.0.0.1[127.0.0.1]")
        self.assertEqual(sink.messages[0].recipients, ["p@partner.test"])
        self.assertEqual(self.dns.queries, [])

    async def test_opportunistic_tls_to_mx(self) -> None:
        """STARTTLS offered by an MX: used, whatever its certificate."""
        unknown_ca = TestCA("nobody trusts me")
        tls = unknown_ca.server_tls(self.dir / "mx1", ["mx1.example.test"])
        port, s = self.sinks(mx1=SinkBehaviour(tls=tls))
        results = await self.outbound(port).send("example.test", [self.message()])
        self.assertEqual(results[0][0].outcome, "sent")
        self.assertTrue(s["mx1"].messages[0].tls)

    def relay_sink(self, ca: TestCA, **kw: Any) -> Sink:
        tls = ca.server_tls(self.dir / "relay", ["smtp.relay.test"])
        behaviour = SinkBehaviour(tls=tls, auth=("relayuser", "s3cret"), auth_required=True, **kw)
        sink = start_sink(reactor, behaviour, interface="127.0.0.5")
        self.addCleanup(sink.stop)
        return sink

    def relay(self, sink: Sink, tls: str = "starttls") -> RelayConfig:
        password = self.dir / "relay-password"
        password.write_text("s3cret\n")
        return RelayConfig(
            host=f"[smtp.relay.test]:{sink.port}", tls=tls, user="relayuser", password_file=password
        )

    async def test_smarthost_auth_over_verified_starttls(self) -> None:
        ca = TestCA()
        sink = self.relay_sink(ca)
        outbound = self.outbound(2525, relay=self.relay(sink), trust_root=ca.trust_root())
        results = await outbound.send("far.example", [self.message("x@far.example")])
        self.assertEqual(results[0][0].outcome, "sent")
        self.assertEqual(results[0][0].host, "smtp.relay.test[127.0.0.5]")
        got = sink.messages[0]
        self.assertTrue(got.tls)
        self.assertEqual(got.auth, "relayuser")
        self.assertEqual(
            sink.commands[:4],
            ["EHLO mail.here.test", "STARTTLS", "EHLO mail.here.test", "AUTH (hidden)"],
        )
        self.assertEqual(got.data, BODY)
        self.assertNotIn(("far.example", "MX"), self.dns.queries)

    async def test_smarthost_untrusted_certificate(self) -> None:
        """Required TLS and a certificate from a CA we do not trust: deferred, nothing sent."""
        sink = self.relay_sink(TestCA("someone else"))
        outbound = self.outbound(2525, relay=self.relay(sink), trust_root=TestCA().trust_root())
        results = await outbound.send("far.example", [self.message("x@far.example")])
        self.assertEqual(results[0][0].outcome, "deferred")
        self.assertIn("TLS", results[0][0].text)
        self.assertIn("smtp.relay.test[127.0.0.5]", results[0][0].text)
        self.assertEqual(sink.messages, [])
        self.assertNotIn("AUTH (hidden)", sink.commands)

    async def test_smarthost_wrong_name(self) -> None:
        """A certificate of our CA for another name fails verification."""
        ca = TestCA()
        tls = ca.server_tls(self.dir / "other", ["other.relay.test"])
        sink = start_sink(
            reactor, SinkBehaviour(tls=tls, auth=("relayuser", "s3cret")), "127.0.0.5"
        )
        self.addCleanup(sink.stop)
        outbound = self.outbound(2525, relay=self.relay(sink), trust_root=ca.trust_root())
        results = await outbound.send("far.example", [self.message("x@far.example")])
        self.assertEqual(results[0][0].outcome, "deferred")
        self.assertEqual(sink.messages, [])

    async def test_smarthost_tls_not_offered(self) -> None:
        sink = start_sink(reactor, SinkBehaviour(auth=("relayuser", "s3cret")), "127.0.0.5")
        self.addCleanup(sink.stop)
        outbound = self.outbound(2525, relay=self.relay(sink), trust_root=TestCA().trust_root())
        results = await outbound.send("far.example", [self.message("x@far.example")])
        self.assertEqual(results[0][0].outcome, "deferred")
        self.assertIn("TLS required but not offered", results[0][0].text)
        self.assertEqual(sink.messages, [])
        self.assertNotIn("AUTH (hidden)", sink.commands)

    async def test_route_implicit_tls(self) -> None:
        ca = TestCA()
        tls = ca.server_tls(self.dir / "implicit", ["127.0.0.1"])
        sink = start_sink(reactor, SinkBehaviour(tls=tls, implicit_tls=True), "127.0.0.1")
        self.addCleanup(sink.stop)
        routes = [RouteConfig("partner.test", f"[127.0.0.1]:{sink.port}", tls="implicit")]
        outbound = self.outbound(2525, routes=routes, trust_root=ca.trust_root())
        results = await outbound.send("partner.test", [self.message("p@partner.test")])
        self.assertEqual(results[0][0].outcome, "sent")
        self.assertTrue(sink.messages[0].tls)

    async def test_route_beats_relay(self) -> None:
        sink = start_sink(reactor, interface="127.0.0.1")
        self.addCleanup(sink.stop)
        routes = [RouteConfig("partner.test", f"[127.0.0.1]:{sink.port}")]
        relay = RelayConfig(host="[127.0.0.1]:1")
        results = await self.outbound(2525, routes=routes, relay=relay).send(
            "partner.test", [self.message("p@partner.test")]
        )
        self.assertEqual(results[0][0].outcome, "sent")


class _SplitReactor:
    """The real reactor for connections, a L{Clock} for time (timers we can advance)."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def callLater(self, delay: float, f: Any, *args: Any, **kw: Any) -> Any:
        return self.clock.callLater(delay, f, *args, **kw)

    def seconds(self) -> float:
        return self.clock.seconds()

    def __getattr__(self, name: str) -> Any:
        return getattr(reactor, name)


async def _until(predicate: Any, seconds: float = 5.0) -> None:
    """Wait (bounded, real time) for C{predicate} to hold."""
    for _ in range(int(seconds / 0.01)):
        if predicate():
            return
        await deferLater(reactor, 0.01, lambda: None)
    raise AssertionError("condition not met in time")


class ConnectionCacheTests(OutboundTestCase):
    """A connection left idle by one send serves the next send for the same domain."""

    def queue(self, port: int, **kw: Any) -> QueueConfig:
        return QueueConfig(mx_port=port, connect_timeout=5, command_timeout=10, **kw)

    async def test_sequential_sends_share_one_connection(self) -> None:
        port, s = self.sinks(mx1=None)
        outbound = self.outbound(port)
        first = await outbound.send("example.test", [self.message("a@example.test")])
        self.assertEqual(outbound.idle_connections, 1)
        mx_queries = len(self.dns.queries)
        second = await outbound.send("example.test", [self.message("b@example.test")])
        self.assertEqual([first[0][0].outcome, second[0][0].outcome], ["sent", "sent"])
        self.assertEqual(s["mx1"].connections, 1)
        self.assertEqual(
            [m.recipients for m in s["mx1"].messages], [["a@example.test"], ["b@example.test"]]
        )
        self.assertEqual(len(self.dns.queries), mx_queries)  # no look-up for a cache hit
        self.assertNotIn("QUIT", s["mx1"].commands)
        self.assertNotIn("RSET", s["mx1"].commands)
        self.assertEqual(outbound.idle_connections, 1)

    async def test_idle_connection_closed_after_cache_time(self) -> None:
        """QUIT after connection_cache_time idle (the clock given to Outbound)."""
        port, s = self.sinks(mx1=None)
        clock = Clock()
        resolver = Resolver(reactor, [self.dns.nameserver], timeout=5)
        queue = self.queue(port, connection_cache_time=2.0)
        outbound = Outbound(_SplitReactor(clock), resolver, queue, "mail.here.test")
        self.addCleanup(outbound.close_idle)
        await outbound.send("example.test", [self.message()])
        self.assertEqual(outbound.idle_connections, 1)
        clock.advance(1.9)
        await deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(outbound.idle_connections, 1)
        self.assertNotIn("QUIT", s["mx1"].commands)
        clock.advance(0.2)
        self.assertEqual(outbound.idle_connections, 0)
        await outbound.close_idle()  # waits for the QUIT in progress
        self.assertEqual(s["mx1"].commands[-1], "QUIT")
        await _until(lambda: not s["mx1"]._open)
        await outbound.send("example.test", [self.message()])
        self.assertEqual(s["mx1"].connections, 2)

    async def test_idle_connection_closed_in_real_time(self) -> None:
        port, s = self.sinks(mx1=None)
        outbound = self.outbound(port, queue=self.queue(port, connection_cache_time=0.1))
        await outbound.send("example.test", [self.message()])
        await _until(lambda: outbound.idle_connections == 0 and not s["mx1"]._open)
        self.assertEqual(s["mx1"].commands[-1], "QUIT")

    async def test_peer_closes_idle_connection(self) -> None:
        """The peer closes the idle connection: out of the cache; the next send reconnects."""
        port, s = self.sinks(mx1=None)
        outbound = self.outbound(port)
        await outbound.send("example.test", [self.message()])
        for proto in list(s["mx1"]._open):
            proto.transport.write(b"421 4.4.2 sink.test idle too long\r\n")
            proto.transport.loseConnection()
        await _until(lambda: outbound.idle_connections == 0)
        results = await outbound.send("example.test", [self.message()])
        self.assertEqual(results[0][0].outcome, "sent")
        self.assertEqual(s["mx1"].connections, 2)
        self.assertEqual(len(s["mx1"].messages), 2)

    async def test_stale_cached_connection_is_not_a_deferral(self) -> None:
        """
        The peer drops the cached connection just as it is reused (no reply to MAIL): the
        message goes on a new connection, not deferred.
        """
        port, s = self.sinks(mx1=None)
        outbound = self.outbound(port)
        await outbound.send("example.test", [self.message("a@example.test")])
        self.assertEqual(outbound.idle_connections, 1)
        # In the same turn: the client cannot have seen it before it sends MAIL.
        for proto in list(s["mx1"]._open):
            proto.transport.abortConnection()
        messages = [self.message("b@example.test"), self.message("c@example.test")]
        results = await outbound.send("example.test", messages)
        self.assertEqual(
            self.outcomes(results), [[("b@example.test", "sent")], [("c@example.test", "sent")]]
        )
        self.assertEqual(s["mx1"].connections, 2)
        self.assertEqual(
            [m.recipients[0] for m in s["mx1"].messages],
            ["a@example.test", "b@example.test", "c@example.test"],
        )

    async def test_lost_after_mail_reply_on_reused_connection_defers(self) -> None:
        """
        Lost after MAIL was answered (lock-step, lost in DATA): the connection was alive, so
        that message is deferred as ever, not sent again.
        """
        port, s = self.sinks(mx1=SinkBehaviour(pipelining=False))
        outbound = self.outbound(port)
        await outbound.send("example.test", [self.message()])
        behaviour = SinkBehaviour(pipelining=False, drop_in_data=2)  # counts all transactions
        s["mx1"].behaviour = behaviour
        for proto in s["mx1"]._open:
            proto.b = behaviour
        results = await outbound.send("example.test", [self.message("b@example.test")])
        self.assertEqual(self.outcomes(results), [[("b@example.test", "deferred")]])
        self.assertEqual(s["mx1"].connections, 1)

    async def test_not_kept_after_a_deferral(self) -> None:
        """A host that said "later" is not kept: the retry connects (and looks up) afresh."""
        port, s = self.sinks(mx1=SinkBehaviour(temp_fail=1))
        outbound = self.outbound(port)
        results = await outbound.send("example.test", [self.message()])
        self.assertEqual(results[0][0].outcome, "deferred")
        self.assertEqual(outbound.idle_connections, 0)
        results = await outbound.send("example.test", [self.message()])
        self.assertEqual(results[0][0].outcome, "sent")
        self.assertEqual(s["mx1"].connections, 2)
        self.assertEqual(outbound.idle_connections, 1)

    async def test_messages_per_connection_across_sends(self) -> None:
        port, s = self.sinks(mx1=None)
        outbound = self.outbound(port, queue=self.queue(port, messages_per_connection=3))
        for _ in range(2):
            results = await outbound.send("example.test", [self.message()])
            self.assertEqual(results[0][0].outcome, "sent")
        results = await outbound.send("example.test", [self.message(), self.message()])
        self.assertEqual([m[0].outcome for m in results], ["sent", "sent"])
        # 3 on the first connection (QUIT when full), the 4th on a second one, kept.
        self.assertEqual(s["mx1"].connections, 2)
        self.assertEqual(s["mx1"].commands.count("QUIT"), 1)
        self.assertEqual(outbound.idle_connections, 1)
        for _ in range(2):
            await outbound.send("example.test", [self.message()])
        self.assertEqual(s["mx1"].connections, 2)
        self.assertEqual(outbound.idle_connections, 0)  # full again: closed, not kept
        self.assertEqual(len(s["mx1"].messages), 6)

    async def test_domains_do_not_share(self) -> None:
        """Another domain with the very same MX host gets its own connection."""
        self.dns.set("other.test", "MX", [(10, "mx1.example.test")])
        port, s = self.sinks(mx1=None)
        outbound = self.outbound(port)
        await outbound.send("example.test", [self.message("a@example.test")])
        results = await outbound.send("other.test", [self.message("b@other.test")])
        self.assertEqual(results[0][0].outcome, "sent")
        self.assertEqual(s["mx1"].connections, 2)
        self.assertEqual(outbound.idle_connections, 2)
        await outbound.send("other.test", [self.message("c@other.test")])
        await outbound.send("example.test", [self.message("d@example.test")])
        self.assertEqual(s["mx1"].connections, 2)

    async def test_bounded_per_domain(self) -> None:
        """Concurrent sends: at most connections_per_domain kept; the others QUIT."""
        port, s = self.sinks(mx1=None)
        outbound = self.outbound(port, queue=self.queue(port, connections_per_domain=2))
        sends = [outbound.send("example.test", [self.message()]) for _ in range(3)]
        for d in sends:
            results = await d
            self.assertEqual(results[0][0].outcome, "sent")
        self.assertEqual(s["mx1"].connections, 3)
        self.assertEqual(outbound.idle_connections, 2)
        self.assertEqual(s["mx1"].commands.count("QUIT"), 1)

    async def test_cache_off(self) -> None:
        port, s = self.sinks(mx1=None)
        outbound = self.outbound(port, queue=self.queue(port, connection_cache_time=0))
        for _ in range(2):
            await outbound.send("example.test", [self.message()])
        self.assertEqual(s["mx1"].connections, 2)
        self.assertEqual(outbound.idle_connections, 0)

    async def test_close_idle_closes_all(self) -> None:
        self.dns.set("other.test", "MX", [(10, "mx2.example.test")])
        port, s = self.sinks(mx1=None, mx2=None)
        outbound = self.outbound(port)
        await outbound.send("example.test", [self.message("a@example.test")])
        await outbound.send("other.test", [self.message("b@other.test")])
        self.assertEqual(outbound.idle_connections, 2)
        await outbound.close_idle()
        self.assertEqual(outbound.idle_connections, 0)
        self.assertEqual(s["mx1"].commands[-1], "QUIT")
        self.assertEqual(s["mx2"].commands[-1], "QUIT")
        await _until(lambda: not s["mx1"]._open and not s["mx2"]._open)
        await outbound.close_idle()  # nothing left: fires at once
