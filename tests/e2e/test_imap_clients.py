"""
End to end with a third-party IMAP client: mbsync (isync) syncing several folders both ways
between our server (IMAPS, self-signed certificate) and a local Maildir, as a user's laptop
would: first download, flag changes each way, deletions each way (expunge propagation), and
new local messages and folders uploaded (APPEND, CREATE) byte for byte.
"""

from __future__ import annotations

import imaplib
import os
import re
import shutil
import smtplib
import subprocess
from pathlib import Path

from twisted.trial.unittest import TestCase

from tests.e2e.support import DOMAIN, PASSWORD, Running, client_tls_context, in_thread, start_server

LISTENERS = """
[[listener]]
kind = "smtp"
endpoint = "tcp:0:interface=127.0.0.1"
tls = "none"

[[listener]]
kind = "imap"
endpoint = "tcp:0:interface=127.0.0.1"
tls = "implicit"
"""

ALICE = f"alice@{DOMAIN}"


def message(subject: str, body: str = "Hello.") -> bytes:
    return (
        f"From: Bob <bob@sender.example>\r\nTo: {ALICE}\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject.replace(' ', '.')}@sender.example>\r\n\r\n{body}\r\n"
    ).encode()


def imap(port: int) -> imaplib.IMAP4_SSL:
    m = imaplib.IMAP4_SSL("127.0.0.1", port, ssl_context=client_tls_context(), timeout=10)
    m.login(ALICE, PASSWORD)
    return m


def maildir_files(folder: Path) -> dict[str, bytes]:
    """The messages of one maildir folder: base name -> content."""
    out = {}
    for sub in ("new", "cur"):
        d = folder / sub
        for name in sorted(os.listdir(d)) if d.is_dir() else []:
            out[name.split(":")[0]] = (d / name).read_bytes()
    return out


def maildir_names(folder: Path) -> list[str]:
    """Every file name (with its info part) in C{new/} and C{cur/}."""
    return sorted(
        name
        for sub in ("new", "cur")
        if (folder / sub).is_dir()
        for name in os.listdir(folder / sub)
    )


def without_tuid(data: bytes) -> bytes:
    """C{data} without the C{X-TUID:} header mbsync adds to every message it copies."""
    return re.sub(rb"(?m)^X-TUID: [^\r\n]*\r?\n", b"", data, count=1)


def subjects(folder: Path) -> list[str]:
    """The Subject of every message of a maildir folder, sorted."""
    out = []
    for data in maildir_files(folder).values():
        for line in data.replace(b"\r\n", b"\n").split(b"\n"):
            if line.startswith(b"Subject: "):
                out.append(line[9:].decode())
                break
    return sorted(out)


class MbsyncTests(TestCase):
    """mbsync against the server: a full two-way sync of several folders, three rounds."""

    def setUp(self) -> None:
        if shutil.which("mbsync") is None:
            self.skipTest("mbsync (isync) not installed")

    def write_config(self, server: Running, local: Path) -> Path:
        cert = server.data_dir / "tls" / "cert.pem"
        assert cert.is_file(), cert
        config = local.parent / "mbsyncrc"
        # isync 1.5 renamed SSLType to TLSType (the old name still works, with a warning).
        tls_type = "TLSType" if mbsync_version() >= (1, 5) else "SSLType"
        config.write_text(
            f"""
IMAPAccount test
Host 127.0.0.1
Port {server.port("imap")}
User {ALICE}
Pass "{PASSWORD}"
{tls_type} IMAPS
CertificateFile {cert}
SystemCertificates no
Timeout 20

IMAPStore remote
Account test

MaildirStore local
Path {local}/
Inbox {local}/INBOX
SubFolders Verbatim

Channel test
Far :remote:
Near :local:
Patterns *
Create Both
Remove None
Expunge Both
SyncState *
CopyArrivalDate yes
"""
        )
        return config

    def mbsync(self, config: Path) -> str:
        out = subprocess.run(
            ["mbsync", "-c", str(config), "-V", "-a"],
            capture_output=True,
            timeout=120,
            env={**os.environ, "HOME": str(config.parent)},
        )
        text = out.stdout.decode("utf-8", "replace") + out.stderr.decode("utf-8", "replace")
        assert out.returncode == 0, text[-4000:]
        return text

    async def test_two_way_sync_of_several_folders(self) -> None:
        """
        mbsync downloads every folder byte for byte (CRLF made LF), and in later rounds a flag
        set on either side shows on the other, a message deleted on either side disappears
        from the other, and a message or folder made locally is uploaded: the server's file
        is the local one with CRLF line ends.
        """
        server = await start_server(self, listeners=LISTENERS)
        port = server.port("imap")

        def fill() -> None:
            with smtplib.SMTP("127.0.0.1", server.port("smtp"), timeout=10) as s:
                for n in range(1, 4):
                    s.sendmail("bob@sender.example", [ALICE], message(f"inbox {n}"))
            m = imap(port)
            for name in ("Work", "Work/Sub"):
                assert m.create(name)[0] == "OK"
            for n in (1, 2):
                m.append("Work", "(\\Seen)", None, message(f"work {n}"))
            m.append("Work/Sub", "(\\Flagged)", None, message("sub 1"))
            m.select("INBOX")
            m.copy("1", "Archive")
            m.logout()

        await in_thread(fill)
        root = Path(self.mktemp()).absolute()
        local = root / "mail"
        local.mkdir(parents=True)
        config = self.write_config(server, local)
        await in_thread(self.mbsync, config)

        # Round 1: everything is here, byte for byte (mbsync stores LF line ends).
        remote_root = server.maildir(ALICE)
        pairs = {
            "INBOX": remote_root,
            "Work": remote_root / ".Work",
            "Work/Sub": remote_root / ".Work.Sub",
            "Archive": remote_root / ".Archive",
        }
        for name, remote in pairs.items():
            theirs = sorted(data.replace(b"\r\n", b"\n") for data in maildir_files(remote).values())
            ours = sorted(without_tuid(data) for data in maildir_files(local / name).values())
            self.assertEqual(len(theirs), {"INBOX": 3, "Work": 2}.get(name, 1), name)
            self.assertEqual(ours, theirs, name)
        for name in ("Drafts", "Sent", "Trash", "Junk"):
            self.assertTrue((local / name / "cur").is_dir(), name)
        # Flags came down: \Seen (S) on Work's messages, \Flagged (F) in Work/Sub.
        self.assertTrue(all(":2,S" in n for n in maildir_names(local / "Work")))
        self.assertTrue(all("F" in n.split(":2,")[1] for n in maildir_names(local / "Work/Sub")))

        # Round 2: a flag each way, a deletion each way, a new local message and folder.
        def server_side() -> None:
            m = imap(port)
            m.select("INBOX")
            typ, found = m.search(None, "SUBJECT", '"inbox 1"')
            m.store(found[0].decode(), "+FLAGS", "(\\Flagged)")
            typ, found = m.search(None, "SUBJECT", '"inbox 3"')
            m.store(found[0].decode(), "+FLAGS", "(\\Deleted)")
            m.expunge()
            m.logout()

        await in_thread(server_side)
        work = local / "Work"
        [work_1] = [n for n in maildir_names(work) if b"work 1" in _read(work, n)]
        [work_2] = [n for n in maildir_names(work) if b"work 2" in _read(work, n)]
        os.rename(_path(work, work_1), work / "cur" / (work_1.split(":")[0] + ":2,FS"))
        os.unlink(_path(work, work_2))
        new_local = b"From: Alice <alice@example.test>\nSubject: written offline\n\nDraft text\n"
        (work / "new" / "1700000000.1_1.laptop").write_bytes(new_local)
        mine = local / "Mine"
        for sub in ("cur", "new", "tmp"):
            (mine / sub).mkdir(parents=True)
        (mine / "new" / "1700000001.1_1.laptop").write_bytes(
            b"Subject: in a new folder\n\nx\n" + b"y" * 5000 + b"\n"
        )
        await in_thread(self.mbsync, config)

        self.assertEqual(subjects(local / "INBOX"), ["inbox 1", "inbox 2"])
        [inbox_1] = [
            n for n in maildir_names(local / "INBOX") if b"inbox 1" in _read(local / "INBOX", n)
        ]
        self.assertIn("F", inbox_1.split(":2,")[1])

        def server_view() -> dict[str, object]:
            m = imap(port)
            out: dict[str, object] = {}
            m.select("Work")
            out["work"] = m.fetch("1:*", "(FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])")[1]
            out["list"] = m.list()[1]
            m.select("Mine")
            out["mine"] = m.fetch("1:*", "(BODY.PEEK[])")[1]
            m.logout()
            return out

        view = await in_thread(server_view)
        work_text = b" ".join(
            p if isinstance(p, bytes) else b" ".join(p)
            for p in view["work"]  # type: ignore[attr-defined]
        )
        self.assertIn(b"work 1", work_text)
        self.assertNotIn(b"work 2", work_text)
        self.assertIn(b"written offline", work_text)
        self.assertRegex(
            work_text, rb"FLAGS \([^)]*\\Flagged[^)]*\) BODY\[HEADER.FIELDS \(SUBJECT\)\] \{\d+\}"
        )
        self.assertIn(b'"Mine"', b"\n".join(view["list"]))  # type: ignore[arg-type]
        # Byte for byte: the uploaded message on the server is the local file with CRLF.
        server_work = {
            without_tuid(data)
            for data in maildir_files(remote_root / ".Work").values()
            if b"offline" in data
        }
        self.assertEqual(server_work, {new_local.replace(b"\n", b"\r\n")})
        [(_, mine_data)] = list(maildir_files(remote_root / ".Mine").items())
        self.assertEqual(
            without_tuid(mine_data),
            b"Subject: in a new folder\r\n\r\nx\r\n" + b"y" * 5000 + b"\r\n",
        )

        # Round 3: nothing changed, nothing moves; the local side is stable.
        before = {name: maildir_names(local / name) for name in ("INBOX", "Work", "Mine")}
        await in_thread(self.mbsync, config)
        after = {name: maildir_names(local / name) for name in ("INBOX", "Work", "Mine")}
        self.assertEqual(after, before)


def mbsync_version() -> tuple[int, ...]:
    out = subprocess.run(["mbsync", "--version"], capture_output=True, timeout=10)
    m = re.search(rb"(\d+)\.(\d+)", out.stdout + out.stderr)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def _path(folder: Path, name: str) -> Path:
    for sub in ("new", "cur"):
        if (folder / sub / name).exists():
            return folder / sub / name
    raise FileNotFoundError(name)


def _read(folder: Path, name: str) -> bytes:
    return _path(folder, name).read_bytes()
