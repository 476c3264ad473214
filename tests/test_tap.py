"""Tests for the twistd plugin (L{mailserver.tap}) and its discovery."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
from twisted.trial.unittest import SynchronousTestCase

from mailserver import tap


class PluginTests(SynchronousTestCase):
    def test_plugin_is_discovered(self) -> None:
        """Twisted's plugin system finds the `mailserver` service maker."""
        makers = {m.tapname: m for m in getPlugins(IServiceMaker)}
        self.assertIn("mailserver", makers)
        self.assertIs(makers["mailserver"].options, tap.Options)

    def test_twistd_lists_the_plugin(self) -> None:
        """`twistd mailserver --help` works in a fresh process (an installed plugin)."""
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                "from twisted.scripts.twistd import run; run()",
                "mailserver",
                "--help",
            ],
            capture_output=True,
            timeout=60,
        )
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertIn(b"--config", out.stdout)


class MakeServiceTests(SynchronousTestCase):
    def test_bad_config_exits_78_with_key_named(self) -> None:
        """A configuration error ends start-up with exit status 78 and names the key."""
        d = Path(self.mktemp())
        d.mkdir()
        path = d / "bad.toml"
        path.write_text(
            '[server]\nhostname = "h"\nfoo = 1\n[[listener]]\nkind="smtp"\nendpoint="tcp:0"\n'
        )
        options = tap.Options()
        options.parseOptions(["--config", str(path)])
        with self.assertRaises(SystemExit) as e:
            tap.makeService(options)
        self.assertEqual(e.exception.code, 78)
