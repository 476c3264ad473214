"""Tests for L{mailserver.config}."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from mailserver import config as c

MINIMAL = """
[server]
hostname = "mx.example.org"
data_dir = "data"

[[listener]]
kind = "smtp"
endpoint = "tcp:25"
"""

EXAMPLE = Path(__file__).parent.parent / "etc" / "mailserver.toml"


class ParseTests(SynchronousTestCase):
    def test_minimal_file_gets_every_default(self) -> None:
        """A file with only the required parts gets the documented defaults."""
        cfg = c.parse(MINIMAL, source="m.toml", base_dir=Path("/srv/mail"))
        self.assertEqual(cfg.server.hostname, "mx.example.org")
        self.assertEqual(cfg.server.data_dir, Path("/srv/mail/data"))
        self.assertEqual(cfg.limits, c.LimitsConfig())
        self.assertEqual(cfg.limits.message_size, 25 * 1024 * 1024)
        self.assertEqual(cfg.listeners, (c.ListenerConfig(kind="smtp", endpoint="tcp:25"),))
        self.assertEqual(cfg.listeners[0].tls, "starttls")

    def test_sizes_and_durations_with_units(self) -> None:
        """Sizes and durations accept units and plain numbers."""
        cfg = c.parse(
            MINIMAL
            + '[limits]\nmessage_size = "10MiB"\nsmtp_line_length = 1000\n'
            + 'smtp_idle_timeout = "2m"\n'
        )
        self.assertEqual(cfg.limits.message_size, 10 * 1024 * 1024)
        self.assertEqual(cfg.limits.smtp_line_length, 1000)
        self.assertEqual(cfg.limits.smtp_idle_timeout, 120.0)
        self.assertEqual(c.parse_size("4 KiB"), 4096)
        self.assertEqual(c.parse_size("1MB"), 1_000_000)
        self.assertEqual(c.parse_duration("300ms"), 0.3)
        self.assertEqual(c.parse_duration(5), 5.0)

    def test_unknown_key_names_the_key_and_file(self) -> None:
        """An unknown key is an error naming the file and the key's path."""
        with self.assertRaises(c.ConfigError) as e:
            c.parse(MINIMAL + "[limits]\nmesage_size = 5\n", source="/etc/m.toml")
        self.assertEqual(e.exception.errors, ["/etc/m.toml: limits.mesage_size: unknown key"])

    def test_all_errors_reported_together(self) -> None:
        """Several problems in one file are all reported, each with its path."""
        text = """
[server]
hostname = ""
io_threads = 0
[bogus]
[[listener]]
kind = "gopher"
endpoint = "tcp:70"
tls = "maybe"
[limits]
message_size = "lots"
smtp_line_length = 100
"""
        with self.assertRaises(c.ConfigError) as e:
            c.parse(text, source="f.toml")
        keys = sorted(err.split(": ")[1] for err in e.exception.errors)
        self.assertEqual(
            keys,
            [
                "bogus",
                "limits.message_size",
                "listener[0].kind",
                "listener[0].tls",
                "server.hostname",
                "server.io_threads",
            ],
        )

    def test_line_length_below_rfc_minimum_refused(self) -> None:
        """smtp_line_length under RFC 5321's 512 octets is refused."""
        with self.assertRaises(c.ConfigError) as e:
            c.parse(MINIMAL + "[limits]\nsmtp_line_length = 100\n")
        self.assertIn("limits.smtp_line_length", e.exception.errors[0])

    def test_listener_needs_kind_and_endpoint(self) -> None:
        """A listener without kind or endpoint is refused, naming the missing key."""
        with self.assertRaises(c.ConfigError) as e:
            c.parse('[server]\nhostname = "h"\n[[listener]]\ntls = "none"\n')
        self.assertEqual(
            sorted(e.exception.errors),
            ["<string>: listener[0].endpoint: required", "<string>: listener[0].kind: required"],
        )

    def test_no_listener_refused(self) -> None:
        """A configuration that listens nowhere is refused."""
        with self.assertRaises(c.ConfigError):
            c.parse('[server]\nhostname = "h"\n')

    def test_tls_cert_without_key_refused(self) -> None:
        """cert and key go together."""
        with self.assertRaises(c.ConfigError) as e:
            c.parse(MINIMAL + '[tls]\ncert = "/etc/c.pem"\n')
        self.assertIn("tls", e.exception.errors[0])

    def test_wrong_types_refused(self) -> None:
        """A string where a number belongs, or a bool for a size, is refused."""
        for bad in ('recipients = "many"', "message_size = true", "connections = -1"):
            with self.assertRaises(c.ConfigError, msg=bad):
                c.parse(MINIMAL + f"[limits]\n{bad}\n")

    def test_invalid_toml_names_file(self) -> None:
        """A TOML syntax error names the file."""
        with self.assertRaises(c.ConfigError) as e:
            c.parse("[server\n", source="x.toml")
        self.assertTrue(e.exception.errors[0].startswith("x.toml: not valid TOML"))

    def test_load_missing_file(self) -> None:
        """A file that cannot be read is a ConfigError naming it."""
        with self.assertRaises(c.ConfigError) as e:
            c.load("/nonexistent/mailserver.toml")
        self.assertIn("/nonexistent/mailserver.toml", e.exception.errors[0])

    def test_load_relative_paths_from_file_directory(self) -> None:
        """Relative paths in a file are taken relative to the file's directory."""
        d = Path(self.mktemp()).absolute()
        d.mkdir(parents=True)
        (d / "m.toml").write_text(MINIMAL)
        self.assertEqual(c.load(d / "m.toml").server.data_dir, d / "data")


class POP3AndAuthLimitsTests(SynchronousTestCase):
    """The [limits] keys of POP3 and of login throttling, and the pop3 listener kind."""

    def test_defaults(self) -> None:
        """Without the keys, the defaults of DESIGN.md §5 and RFC 1939 apply."""
        limits = c.parse(MINIMAL).limits
        self.assertEqual(limits.pop3_line_length, 1024)
        self.assertEqual(limits.pop3_idle_timeout, 600.0)
        self.assertEqual(limits.pop3_errors, 10)
        self.assertEqual(limits.auth_failures, 5)
        self.assertEqual(limits.auth_window, 600.0)
        self.assertEqual(limits.auth_failure_delay, 2.0)

    def test_keys_parse_with_units(self) -> None:
        """Sizes and durations take units; counts are whole numbers."""
        limits = c.parse(
            MINIMAL
            + "[limits]\n"
            + 'pop3_line_length = "2KiB"\n'
            + 'pop3_idle_timeout = "15m"\n'
            + "pop3_errors = 3\n"
            + "auth_failures = 7\n"
            + 'auth_window = "1h"\n'
            + 'auth_failure_delay = "500ms"\n'
        ).limits
        self.assertEqual(limits.pop3_line_length, 2048)
        self.assertEqual(limits.pop3_idle_timeout, 900.0)
        self.assertEqual(limits.pop3_errors, 3)
        self.assertEqual(limits.auth_failures, 7)
        self.assertEqual(limits.auth_window, 3600.0)
        self.assertEqual(limits.auth_failure_delay, 0.5)

    def test_no_failure_delay_allowed(self) -> None:
        """A failure delay of zero is a choice, not an error."""
        self.assertEqual(
            c.parse(MINIMAL + '[limits]\nauth_failure_delay = "0s"\n').limits.auth_failure_delay,
            0.0,
        )

    def test_bad_values_refused_with_their_path(self) -> None:
        """Each bad value is refused, and the error names the key's path."""
        cases = {
            "pop3_line_length": ['"lots"', "0", "true"],
            "pop3_idle_timeout": ['"soon"', "0", '"-5s"', "-1"],
            "pop3_errors": ["0", '"ten"', "1.5"],
            "auth_failures": ["0", "-3", '"five"', "false"],
            "auth_window": ["0", '"forever"', "-1"],
            "auth_failure_delay": ['"slow"', "-2", "true"],
        }
        for key, values in cases.items():
            for bad in values:
                with self.assertRaises(c.ConfigError, msg=f"{key} = {bad}") as e:
                    c.parse(MINIMAL + f"[limits]\n{key} = {bad}\n", source="f.toml")
                self.assertEqual(len(e.exception.errors), 1, e.exception.errors)
                self.assertTrue(
                    e.exception.errors[0].startswith(f"f.toml: limits.{key}: "),
                    e.exception.errors[0],
                )

    def test_pop3_line_length_below_rfc_minimum_refused(self) -> None:
        """pop3_line_length under RFC 2449's 255 octets is refused; 255 itself is fine."""
        with self.assertRaises(c.ConfigError) as e:
            c.parse(MINIMAL + "[limits]\npop3_line_length = 254\n", source="f.toml")
        self.assertEqual(len(e.exception.errors), 1)
        self.assertTrue(e.exception.errors[0].startswith("f.toml: limits.pop3_line_length: "))
        limits = c.parse(MINIMAL + "[limits]\npop3_line_length = 255\n").limits
        self.assertEqual(limits.pop3_line_length, 255)

    def test_pop3_listener(self) -> None:
        """A listener of kind pop3 is accepted with each TLS mode and plaintext auth."""
        cfg = c.parse(
            MINIMAL
            + '[[listener]]\nkind = "pop3"\nendpoint = "tcp:995"\ntls = "implicit"\n'
            + '[[listener]]\nkind = "pop3"\nendpoint = "tcp:110"\n'
            + "allow_plaintext_auth = true\n"
        )
        self.assertEqual(
            cfg.listeners[1:],
            (
                c.ListenerConfig(kind="pop3", endpoint="tcp:995", tls="implicit"),
                c.ListenerConfig(
                    kind="pop3", endpoint="tcp:110", tls="starttls", allow_plaintext_auth=True
                ),
            ),
        )

    def test_unknown_listener_kind_refused(self) -> None:
        """A kind that does not exist (yet) is refused, naming the listener."""
        with self.assertRaises(c.ConfigError) as e:
            c.parse(MINIMAL + '[[listener]]\nkind = "pop2"\nendpoint = "tcp:109"\n')
        self.assertEqual(len(e.exception.errors), 1)
        self.assertIn("listener[1].kind", e.exception.errors[0])

    def test_imap_limits(self) -> None:
        """The IMAP limits parse with units and refuse a line limit below 1000."""
        cfg = c.parse(
            MINIMAL
            + '[limits]\nimap_line_length = "8KiB"\nimap_idle_timeout = "31m"\nimap_errors = 3\n'
        )
        self.assertEqual(
            (cfg.limits.imap_line_length, cfg.limits.imap_idle_timeout, cfg.limits.imap_errors),
            (8192, 1860.0, 3),
        )
        with self.assertRaises(c.ConfigError) as e:
            c.parse(MINIMAL + "[limits]\nimap_line_length = 100\n")
        self.assertIn("limits.imap_line_length", e.exception.errors[0])

    def test_render_round_trips_new_keys(self) -> None:
        """`config check` prints the new keys in a form that parses back to the same values."""
        cfg = c.parse(
            MINIMAL
            + '[[listener]]\nkind = "pop3"\nendpoint = "tcp:995"\ntls = "implicit"\n'
            + '[limits]\nauth_failure_delay = "250ms"\npop3_errors = 4\nauth_window = "1h"\n',
            base_dir=Path("/srv"),
        )
        text = c.render(cfg)
        self.assertIn("auth_failure_delay = 0.25\n", text)
        self.assertIn('kind = "pop3"\n', text)
        again = c.parse(text, base_dir=Path("/elsewhere"))
        self.assertEqual(dataclasses.replace(again, source=cfg.source), cfg)


class OutboundConfigTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        """No [dns], [relay], [queue], [[route]]: resolv.conf, no smarthost, the DESIGN backoff."""
        cfg = c.parse(MINIMAL)
        self.assertEqual(cfg.dns.nameservers, ())
        self.assertEqual(cfg.relay.host, "")
        self.assertEqual(cfg.routes, ())
        self.assertEqual(cfg.queue.retry, (60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0))
        self.assertEqual(cfg.queue.expire, 5 * 86400.0)
        self.assertEqual(cfg.queue.delay_notice, 4 * 3600.0)
        self.assertEqual(cfg.queue.mx_port, 25)

    def test_sections_parse(self) -> None:
        """Name servers with ports, routes (domain lower-cased), smarthost, queue durations."""
        cfg = c.parse(
            MINIMAL
            + """
[dns]
nameservers = ["127.0.0.1:5353", "[::1]:53", "192.0.2.53"]
timeout = "3s"

[[route]]
domain = "Partner.Example."
host = "[127.0.0.1]:2526"
tls = "none"

[relay]
host = "[smtp.provider.example]:587"
user = "me"
password_file = "relay-password"

[queue]
retry = ["30s", "2m"]
expire = "1d"
delay_notice = 0
connections_per_domain = 3
mx_port = 2525
""",
            base_dir=Path("/srv"),
        )
        self.assertEqual(cfg.dns.nameservers, ("127.0.0.1:5353", "[::1]:53", "192.0.2.53"))
        self.assertEqual(cfg.dns.timeout, 3.0)
        self.assertEqual(
            cfg.routes, (c.RouteConfig("partner.example", "[127.0.0.1]:2526", "none"),)
        )
        self.assertEqual(cfg.relay.password_file, Path("/srv/relay-password"))
        self.assertEqual(cfg.queue.retry, (30.0, 120.0))
        self.assertEqual(cfg.queue.expire, 86400.0)
        self.assertEqual(cfg.queue.delay_notice, 0.0)
        self.assertEqual(cfg.queue.connections_per_domain, 3)
        self.assertEqual(cfg.queue.mx_port, 2525)
        again = c.parse(c.render(cfg), base_dir=Path("/elsewhere"))
        self.assertEqual(dataclasses.replace(again, source=cfg.source), cfg)

    def test_bad_values_refused(self) -> None:
        """Bad hops, name servers, routes twice, a user without a password file: all named."""
        with self.assertRaises(c.ConfigError) as caught:
            c.parse(
                MINIMAL
                + """
[dns]
nameservers = ["ns.example.org"]

[[route]]
domain = "a.example"
host = "[127.0.0.1"

[[route]]
domain = "c.example"
host = "x:99999"

[[route]]
domain = "b.example"
host = "y"

[[route]]
domain = "B.example"
host = "z"

[relay]
user = "me"
tls = "maybe"

[queue]
retry = []
mx_port = 70000
"""
            )
        text = "\n".join(caught.exception.errors)
        for key in (
            "dns.nameservers",
            "route[0].host",
            "route[1].host",
            "route[3].domain",
            "relay.tls",
            "queue.retry",
            "queue.mx_port",
        ):
            self.assertIn(key, text)
        self.assertNotIn("route[2]", text)
        self.assertNotIn("relay.user", text)


class EmbeddedDefaultTests(SynchronousTestCase):
    def test_embedded_default(self) -> None:
        """No file: domain localhost, data under ./var, every protocol on high loopback ports."""
        cwd = Path(self.mktemp()).absolute()
        cfg = c.embedded_default(cwd)
        self.assertEqual(cfg.server.domain, "localhost")
        self.assertEqual(cfg.server.data_dir, cwd / "var")
        self.assertEqual(
            [(lst.kind, lst.endpoint, lst.tls) for lst in cfg.listeners],
            [
                ("smtp", "tcp:2525:interface=127.0.0.1", "starttls"),
                ("submission", "tcp:2587:interface=127.0.0.1", "starttls"),
                ("submission", "tcp:2465:interface=127.0.0.1", "implicit"),
                ("pop3", "tcp:2110:interface=127.0.0.1", "starttls"),
                ("pop3", "tcp:2995:interface=127.0.0.1", "implicit"),
                ("imap", "tcp:2143:interface=127.0.0.1", "starttls"),
                ("imap", "tcp:2993:interface=127.0.0.1", "implicit"),
            ],
        )

    def test_embedded_default_renders_and_parses_back(self) -> None:
        """The embedded default, pop3 listeners included, survives `config check`'s output."""
        cfg = c.embedded_default(Path(self.mktemp()).absolute())
        again = c.parse(c.render(cfg), base_dir=Path(self.mktemp()).absolute())
        self.assertEqual(dataclasses.replace(again, source=cfg.source), cfg)

    def test_render_round_trips(self) -> None:
        """What `config check` prints parses back to the same configuration."""
        cfg = c.parse(MINIMAL + "[limits]\nrecipients = 7\n", base_dir=Path("/srv"))
        again = c.parse(c.render(cfg), base_dir=Path("/elsewhere"))
        self.assertEqual(dataclasses.replace(again, source=cfg.source), cfg)


class ExampleFileTests(SynchronousTestCase):
    def test_example_config_is_valid_and_shows_the_defaults(self) -> None:
        """etc/mailserver.toml parses, and the values it shows are the real defaults."""
        cfg = c.load(EXAMPLE)
        self.assertEqual(cfg.limits, c.LimitsConfig())
        self.assertEqual(cfg.queue, c.QueueConfig())
        self.assertEqual(cfg.dns, c.DNSConfig())
        defaults = c.ServerConfig()
        self.assertEqual(cfg.server.io_threads, defaults.io_threads)
        self.assertEqual(cfg.server.shutdown_grace, defaults.shutdown_grace)

    def test_example_config_documents_every_option(self) -> None:
        """Every key of every section appears in etc/mailserver.toml."""
        text = EXAMPLE.read_text()
        for cls in (
            c.ServerConfig,
            c.TLSConfig,
            c.ListenerConfig,
            c.LimitsConfig,
            c.DNSConfig,
            c.RouteConfig,
            c.RelayConfig,
            c.QueueConfig,
        ):
            for f in dataclasses.fields(cls):
                self.assertIn(f"{f.name} ", text, f"{cls.__name__}.{f.name} not documented")
