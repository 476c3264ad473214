#!/usr/bin/env python3
"""
IMAP download benchmark: how fast one session takes a whole mailbox out of a server.

Modes (--modes, comma separated; default bulk,each):

  bulk   LOGIN, EXAMINE INBOX (read-only: no flag changes), one "FETCH 1:* (BODY.PEEK[])",
         LOGOUT: what a fast synchronising client does
  each   the same with one "FETCH n (BODY.PEEK[])" per message, sent after the answer to the
         previous one has been read: round-trip bound, what a naive client does

The mailbox is filled by writing maildir files directly (tmp/, then rename into new/):
--messages (2000) messages of --size (5120) octets, CRLF line endings, realistic headers (the
messages of bench/pop3_retr.py). When run as root the files get the owner of the maildir. Then
--warmup (1) runs make the server look at the mailbox (the cold figure: reported, not in the
median) before --runs (3) measured runs per mode.

Measured per run (FETCH phase: from the first FETCH sent to the last tagged OK read):

  msg/s, MB/s     FETCH responses (with their literal) and literal octets received per second
                  of FETCH phase (MB = 10^6 octets)
  checks          the number of FETCH responses against EXISTS and the number written, every
                  literal's size against the size written; --verify also compares every
                  message's content with what was written (costs client CPU)
  server CPU      utime+stime (children included) of the server's process trees from
                  /proc/PID/stat over the FETCH phase (server_cpu_s, and per 1000 messages)
                  and over the whole session (server_session_cpu_s)
  server memory   peak RSS of the process trees (sampled every --sample-interval, 20 ms) and
                  peak PSS (every --pss-interval, 0.5 s) over the session; for multi-process
                  servers (Dovecot: one process per session) compare PSS
  client CPU      the client thread's CPU time over the FETCH phase (it shares the cores with
                  the server)

The client is a raw socket client (TCP_NODELAY, 256 KiB reads, responses framed by their CRLF
and their {n} literals found in the buffer): imaplib copies every line and literal several
times and would make the figure the client's.

Two ways to use it:

  * our server (default): the script makes a temporary directory with a TOML configuration
    (one IMAP listener on 127.0.0.1, tls = "none", allow_plaintext_auth = true), adds the
    account bench-fetch@example.test with the `mailserver` command, fills its maildir under
    <data_dir>/mail/, starts `twistd -n mailserver --config ...`, waits for the greeting, runs
    the benchmark and always stops the server (SIGTERM, then SIGKILL after a bounded wait):

        bench/imap_fetch.py
        bench/imap_fetch.py --modes bulk --runs 5 --results bench/results/imap.jsonl

  * a running server, for example Dovecot of the Postfix + Dovecot reference stack:

        . "$WORKDIR/ref/ref.env"
        bench/imap_fetch.py --target 127.0.0.1:$IMAP_PORT --user bob@example.test \\
            --password password --maildir "$MAILDIR_FMT" --pid "$DOVECOT_PID" --name dovecot \\
            --results bench/results/imap-dovecot.jsonl

    --maildir may contain %u (local part), %d (domain), %a (address); --pid takes one or
    more root PIDs (space or comma separated, repeatable) whose whole trees are measured.
    The maildir is emptied (new/ cur/ tmp/ and Dovecot's index files) and refilled, and
    emptied at the end (--keep-mailbox keeps it): only point it at an idle test mailbox.
    --no-fill uses the mailbox as it is (no size or content checks).

Side by side: --compare FILE (repeatable) reads the summary lines of another server from a
--results file of an earlier invocation (e.g. Dovecot's, just before) and adds them to the
table, with our msg/s as a fraction of theirs (the target is >= 0.5 x Dovecot in both modes).

Every run prints one JSON line, every mode a summary line with medians, and a table is printed
at the end. Requirements: Linux (/proc), Python >= 3.11, the project installed (for our
server). Only 127.0.0.1 is ever contacted; every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from pop3_retr import (
    Mailbox,
    Meter,
    client_cpu,
    cpu_delta,
    cpu_mark,
    no_server_figures,
)
from smtp_accept import Output, command, filesystem_of, free_port, median

PASSWORD = "bench-password-1"
DOMAIN = "example.test"
TWISTD_MAIN = "from twisted.scripts.twistd import run\nrun()\n"
MODES = ("bulk", "each")
RECV = 256 * 1024
MAX_LINE = 1024 * 1024  # response text (without literals) longer than this: framing lost

# ----------------------------------------------------------------------------- client


class IMAPError(Exception):
    """The server answered NO/BAD, or something that is not IMAP."""


def quoted(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


class Client:
    """
    A raw IMAP client on a blocking socket. L{response} reads one whole response (its text
    lines and the {n} literals between them) out of one buffer, without copying the literals.
    """

    def __init__(self, host: str, port: int, io_timeout: float, deadline: float) -> None:
        self.deadline = deadline
        self.sock = socket.create_connection((host, port), timeout=io_timeout)
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            self.sock.close()
            raise
        self.buf = bytearray()
        self.pos = 0
        self.tags = 0
        self.bytes_in = 0
        self.recvs = 0

    def close(self) -> None:
        self.sock.close()

    def _fill(self) -> None:
        if time.monotonic() > self.deadline:
            raise TimeoutError("run deadline")
        data = self.sock.recv(RECV)
        if not data:
            raise ConnectionError("the server closed the connection")
        self.recvs += 1
        self.bytes_in += len(data)
        self.buf += data

    def response(self) -> tuple[bytes, list[tuple[int, int]]]:
        """
        One response: (its text, the literal markers kept and the literals left out; the
        (start, end) of each literal in C{self.buf}, valid until the next call).
        """
        if self.pos > 65536:
            del self.buf[: self.pos]
            self.pos = 0
        buf = self.buf
        seg = search = self.pos
        text: list[bytes] = []
        lits: list[tuple[int, int]] = []
        while True:
            i = buf.find(b"\r\n", search)
            if i < 0:
                if len(buf) - seg > MAX_LINE:
                    raise IMAPError("response line longer than 1 MiB")
                search = max(seg, len(buf) - 1)
                self._fill()
                continue
            text.append(bytes(buf[seg:i]))
            n = -1
            if i > seg and buf[i - 1] == 0x7D:  # "}"
                j = buf.rfind(b"{", seg, i)
                digits = bytes(buf[j + 1 : i - 1]).rstrip(b"+") if j >= 0 else b""
                if digits.isdigit():
                    n = int(digits)
            if n < 0:
                self.pos = i + 2
                return b"\r\n".join(text), lits
            start = i + 2
            while len(buf) < start + n:
                self._fill()
            lits.append((start, start + n))
            seg = search = start + n

    def send(self, cmd: str) -> bytes:
        """Send C{cmd} with a new tag; the tag."""
        self.tags += 1
        tag = b"b%d" % self.tags
        self.sock.sendall(tag + b" " + cmd.encode() + b"\r\n")
        return tag

    def command(self, cmd: str) -> list[bytes]:
        """Send a command and read up to its tagged OK; the untagged responses' text."""
        tag = self.send(cmd)
        untagged = []
        while True:
            text, _ = self.response()
            if text.startswith(tag + b" "):
                if text[len(tag) + 1 :].startswith(b"OK"):
                    return untagged
                raise IMAPError(f"{cmd.split()[0]}: {text[:200].decode(errors='replace')}")
            untagged.append(text)


def login(c: Client, user: str, password: str) -> int:
    """Greeting, LOGIN, EXAMINE INBOX; the number of messages (EXISTS)."""
    greeting, _ = c.response()
    if not greeting.startswith(b"* OK"):
        raise IMAPError(f"greeting: {greeting[:200].decode(errors='replace')}")
    c.command(f"LOGIN {quoted(user)} {quoted(password)}")
    exists = None
    for text in c.command("EXAMINE INBOX"):
        words = text.split()
        if len(words) == 3 and words[2].upper() == b"EXISTS" and words[1].isdigit():
            exists = int(words[1])
    if exists is None:
        raise IMAPError("EXAMINE INBOX: no EXISTS")
    return exists


class FetchCheck:
    """Counts FETCH responses and their literals, checks sizes (and contents)."""

    def __init__(self, size: int | None, digests: Counter[bytes] | None) -> None:
        self.size = size
        self.digests = digests
        self.seen: Counter[bytes] = Counter()
        self.fetched = 0
        self.octets = 0
        self.wrong_size = 0
        self.problems: list[str] = []

    def add(self, c: Client, text: bytes, lits: list[tuple[int, int]]) -> None:
        words = text.split(b" ", 3)
        if len(words) < 3 or words[0] != b"*" or words[2].upper() != b"FETCH":
            return
        if len(lits) != 1:
            if len(self.problems) < 5:
                self.problems.append(f"FETCH {words[1].decode()}: {len(lits)} literals")
            return
        start, end = lits[0]
        self.fetched += 1
        self.octets += end - start
        if self.size is not None and end - start != self.size:
            self.wrong_size += 1
            if len(self.problems) < 5:
                self.problems.append(
                    f"FETCH {words[1].decode()}: {end - start} octets, {self.size} written"
                )
        if self.digests is not None:
            self.seen[hashlib.sha1(memoryview(c.buf)[start:end]).digest()] += 1

    def result(self) -> dict[str, object]:
        out: dict[str, object] = {
            "fetched": self.fetched,
            "octets": self.octets,
            "size_mismatches": self.wrong_size,
        }
        if self.digests is not None:
            d = self.digests
            out["content_mismatches"] = sum((self.seen - d).values()) + sum(
                (d - self.seen).values()
            )
            if out["content_mismatches"] and len(self.problems) < 5:
                self.problems.append(f"{out['content_mismatches']} messages differ from the files")
        return out


def fetch_bulk(c: Client, count: int, check: FetchCheck) -> None:
    tag = c.send("FETCH 1:* (BODY.PEEK[])")
    while True:
        text, lits = c.response()
        if text.startswith(tag + b" "):
            if not text[len(tag) + 1 :].startswith(b"OK"):
                raise IMAPError(f"FETCH: {text[:200].decode(errors='replace')}")
            return
        check.add(c, text, lits)


def fetch_each(c: Client, count: int, check: FetchCheck) -> None:
    for n in range(1, count + 1):
        tag = c.send(f"FETCH {n} (BODY.PEEK[])")
        while True:
            text, lits = c.response()
            if text.startswith(tag + b" "):
                if not text[len(tag) + 1 :].startswith(b"OK"):
                    raise IMAPError(f"FETCH {n}: {text[:200].decode(errors='replace')}")
                break
            check.add(c, text, lits)


# ----------------------------------------------------------------------------- one run


def run_fetch(args, host, port, mbx, roots, mode, run, warmup, name) -> dict:
    """One session: LOGIN, EXAMINE, the FETCH phase of C{mode}, LOGOUT."""
    res: dict[str, object] = {
        "bench": "imap-fetch",
        "server": name,
        "mode": mode,
        "run": run,
        "warmup": warmup,
    }
    expect = mbx.contents[0] if mbx.contents else None
    deadline = time.monotonic() + args.run_timeout
    meter = Meter(roots, args, args.sample_interval).start()
    session0 = cpu_mark(roots)
    c = None
    try:
        c = Client(host, port, args.io_timeout, deadline)
        t0 = time.perf_counter()
        count = login(c, args.user_for(mbx), args.password)
        t1 = time.perf_counter()
        res.update({"messages": count, "login_examine_s": round(t1 - t0, 4)})
        if count > args.max_messages:
            raise IMAPError(f"EXISTS says {count} messages, more than --max-messages")
        size = mbx.contents[1] if mbx.contents else None
        check = FetchCheck(size, mbx.digests if args.verify and mbx.contents else None)
        a = cpu_mark(roots)
        t2 = time.perf_counter()
        if count:
            (fetch_bulk if mode == "bulk" else fetch_each)(c, count, check)
        t3 = time.perf_counter()
        b = cpu_mark(roots)
        c.command("LOGOUT")
        t4 = time.perf_counter()
        got = check.result()
        dt = t3 - t2
        res.update(got)
        res.update(
            {
                "fetch_s": round(dt, 4),
                "total_s": round(t4 - t0, 4),
                "msg_per_s": round(check.fetched / dt, 1) if check.fetched and dt > 0 else None,
                "mb_per_s": round(check.octets / 1e6 / dt, 2) if dt > 0 else None,
                "client_recvs": c.recvs,
            }
        )
        res.update(cpu_delta(a, b, "server"))
        res.update(client_cpu(a, b))
        res["server_cpu_s_per_1000_msgs"] = (
            round(res["server_cpu_s"] * 1000 / count, 3) if count else None
        )
        problems = list(check.problems)
        if expect is not None and count != expect:
            problems.insert(0, f"EXISTS says {count} messages, {expect} were written")
        if check.fetched != count:
            problems.append(f"fetched {check.fetched}/{count}")
        if problems:
            res["error"] = "; ".join(problems)
    except (OSError, IMAPError, TimeoutError) as e:
        res["error"] = f"{type(e).__name__}: {e}"
    finally:
        if c is not None:
            c.close()
    time.sleep(0.05)  # let a per-session server process exit and be reaped
    res.update(cpu_delta(session0, cpu_mark(roots), "server_session"))
    res.update(meter.stop())
    return no_server_figures(res, roots)


# ----------------------------------------------------------------------------- our server


def wait_imap(host: str, port: int, proc: subprocess.Popen | None, seconds: float) -> bool:
    """Wait (bounded) until the port answers with an IMAP greeting."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with socket.create_connection((host, port), timeout=2) as s:
                s.settimeout(5)
                greeting = s.recv(4096)
                s.sendall(b"z LOGOUT\r\n")
                if greeting.startswith(b"* OK"):
                    return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


def raise_nofile(want: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE towards C{want} (at most the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


class OwnServer:
    """
    Our server in a temporary directory, started as a child process: IMAP listeners only
    (C{listeners}: (port, tls) pairs), the given [limits].
    """

    def __init__(
        self,
        args: argparse.Namespace,
        prefix: str,
        listeners: list[tuple[int, str]],
        limits: dict[str, int] | None = None,
        nofile: int = 0,
    ) -> None:
        self.args = args
        self.dir = Path(tempfile.mkdtemp(prefix=prefix, dir=args.work_dir))
        self.data = self.dir / "data"
        self.cfg = self.dir / "mailserver.toml"
        self.log = self.dir / "server.log"
        self.listeners = listeners
        self.limits = limits or {"connections": 1000, "connections_per_ip": 1000}
        self.nofile = nofile
        self.port = listeners[0][0]
        self.proc: subprocess.Popen | None = None

    def write_config(self) -> None:
        limits = "".join(f"{k} = {v}\n" for k, v in self.limits.items())
        listeners = "".join(
            f"""
[[listener]]
kind = "imap"
endpoint = "tcp:{port}:interface=127.0.0.1"
tls = "{tls}"
allow_plaintext_auth = true
"""
            for port, tls in self.listeners
        )
        self.cfg.write_text(
            f"""# written by bench/{Path(sys.argv[0]).name}
[server]
hostname = "mx.{DOMAIN}"
data_dir = "{self.data}"
domain = "{DOMAIN}"
io_threads = {self.args.io_threads}
shutdown_grace = "5s"

[limits]
{limits}{listeners}""",
            encoding="utf-8",
        )

    def add_users(self, accounts: list[str], cheap_hash: bool = False) -> str:
        """
        Create the domain and the accounts with the `mailserver` command; with C{cheap_hash}
        the accounts are added through the directory API with a cheap argon2id hash (t=1,
        m=1 MiB: a login costs about 1 ms instead of a quarter of a second), the domain still
        with the command.
        """
        cli = command("mailserver", "mailserver.cli")
        cfg = ["--config", str(self.cfg)]
        steps = [(cli + ["domain", "add", DOMAIN] + cfg, None)]
        if not cheap_hash:
            for a in accounts:
                steps.append((cli + ["user", "add", a, "--password-stdin"] + cfg, PASSWORD + "\n"))
        how = "mailserver CLI"
        try:
            for cmd, stdin in steps:
                r = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=60)
                if r.returncode != 0:
                    raise RuntimeError(f"{shlex.join(cmd)}: {r.stderr.strip()}")
            if not cheap_hash:
                return how
        except (OSError, RuntimeError, subprocess.TimeoutExpired) as e:
            print(f"# mailserver CLI failed ({e}); using the Python API", file=sys.stderr)
            how = "mailserver.directory API"
        from argon2 import PasswordHasher  # the project's dependency

        from mailserver.directory import SQLiteDirectory  # the project, installed

        db = self.data / "db"
        db.mkdir(mode=0o700, parents=True, exist_ok=True)
        hasher = (
            PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1) if cheap_hash else None
        )
        directory = SQLiteDirectory(db / "directory.sqlite", DOMAIN, hasher=hasher)
        try:
            if not directory.is_local_domain(DOMAIN):
                directory.add_domain(DOMAIN)
            for a in accounts:
                if not directory.user_exists(a):
                    directory.add_user(a, PASSWORD)
        finally:
            directory.close()
        if cheap_hash:
            how += " (domain), directory API with a cheap argon2id hash t=1 m=1MiB (accounts)"
        return how

    def maildir(self, account: str) -> Path:
        local, _, domain = account.rpartition("@")
        return self.data / "mail" / domain / local

    def command(self) -> list[str]:
        twistd_args = [
            "-n",
            "--pidfile=",
            f"--logfile={self.log}",
            "mailserver",
            "--config",
            str(self.cfg),
        ]
        if self.args.twistd:
            return shlex.split(self.args.twistd) + twistd_args
        twistd = shutil.which("twistd")
        return ([twistd] if twistd else [sys.executable, "-c", TWISTD_MAIN]) + twistd_args

    def _preexec(self) -> None:
        if self.nofile:
            raise_nofile(self.nofile)

    def start(self) -> None:
        cmd = self.command()
        print(f"# our server: {shlex.join(cmd)}", file=sys.stderr)
        self.proc = subprocess.Popen(
            cmd,
            cwd=self.dir,
            stdin=subprocess.DEVNULL,
            stdout=open(self.dir / "server.out", "wb"),
            stderr=subprocess.STDOUT,
            preexec_fn=self._preexec if self.nofile else None,
        )
        if not wait_imap("127.0.0.1", self.port, self.proc, self.args.start_timeout):
            tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            out = (self.dir / "server.out").read_text(errors="replace")[-2000:]
            self.stop()
            raise RuntimeError(f"server did not answer on port {self.port}\n{tail}\n{out}")

    @property
    def pid(self) -> int:
        assert self.proc
        return self.proc.pid

    def stop(self) -> None:
        p = self.proc
        if p is not None and p.poll() is None:
            p.terminate()
            try:
                p.wait(self.args.stop_timeout)
            except subprocess.TimeoutExpired:
                print(
                    f"# server {p.pid} still running after {self.args.stop_timeout}s: SIGKILL",
                    file=sys.stderr,
                )
                p.kill()
                p.wait(10)
        if self.args.keep_dir:
            print(f"# kept the server directory {self.dir}", file=sys.stderr)
        else:
            shutil.rmtree(self.dir, ignore_errors=True)


def add_server_args(ap: argparse.ArgumentParser) -> None:
    """Options about starting our server (shared with bench/idle_hold.py)."""
    ap.add_argument("--io-threads", type=int, default=8, help="our server's io_threads (8)")
    ap.add_argument(
        "--twistd",
        help="command that runs twistd (default: twistd from PATH, "
        "else python running twisted.scripts.twistd)",
    )
    ap.add_argument(
        "--work-dir",
        help="where our server's temporary directory goes "
        "(default: $TMPDIR): this is the file system measured",
    )
    ap.add_argument("--keep-dir", action="store_true", help="keep our server's directory")
    ap.add_argument("--start-timeout", type=float, default=60)
    ap.add_argument("--stop-timeout", type=float, default=20)


def load_compare(paths: list[str], bench: str) -> list[dict]:
    """The summary lines of C{bench} in the --results files C{paths} (the last per key)."""
    found: dict[tuple, dict] = {}
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    obj = json.loads(line)
                except ValueError:
                    continue
                if obj.get("bench") == bench and obj.get("summary"):
                    key = (obj.get("server"), obj.get("mode"), obj.get("variant"), obj.get("conns"))
                    found[key] = obj
    return list(found.values())


# ----------------------------------------------------------------------------- the benchmark


def summarize(mode: str, name: str, results: list[dict]) -> dict:
    measured = [r for r in results if not r["warmup"]]
    ok = [r for r in measured if "error" not in r]

    def med(key: str) -> float | None:
        return median([r.get(key) for r in measured])

    def top(key: str) -> float | None:
        return max([r[key] for r in measured if r.get(key) is not None], default=None)

    return {
        "bench": "imap-fetch",
        "summary": True,
        "server": name,
        "mode": mode,
        "messages": median([r.get("messages") for r in results]),
        "runs": len(measured),
        "ok_runs": len(ok),
        "cold": [r.get("msg_per_s") for r in results if r["warmup"]],
        "median_msg_per_s": med("msg_per_s"),
        "median_mb_per_s": med("mb_per_s"),
        "all_msg_per_s": [r.get("msg_per_s") for r in measured],
        "median_server_cpu_s": med("server_cpu_s"),
        "median_server_cpu_s_per_1000_msgs": med("server_cpu_s_per_1000_msgs"),
        "median_server_main_thread_cpu_s": med("server_main_thread_cpu_s"),
        "median_server_session_cpu_s": med("server_session_cpu_s"),
        "median_client_cpu_s": med("client_cpu_s"),
        "max_server_peak_rss_mb": top("server_peak_rss_mb"),
        "max_server_peak_pss_mb": top("server_peak_pss_mb"),
        "median_host_cpu_busy": med("host_cpu_busy"),
    }


def _f(v, fmt="{:.0f}") -> str:
    return "—" if v is None else fmt.format(v)


def tables(summaries: list[dict], others: list[dict]) -> str:
    out = [
        "| server | mode | msgs | **msg/s** | MB/s | msg/s, each run | cold msg/s | "
        "server CPU s (per 1000 msgs) | client CPU s | peak RSS MB | peak PSS MB | ok runs |",
        "|" + "---|" * 12,
    ]
    for s in others + summaries:
        out.append(
            f"| {s['server']} | {s['mode']} | {_f(s['messages'])} | "
            f"**{_f(s['median_msg_per_s'])}** | {_f(s['median_mb_per_s'], '{:.1f}')} | "
            f"{', '.join(_f(x) for x in s['all_msg_per_s'])} | "
            f"{', '.join(_f(x) for x in s['cold']) or '—'} | "
            f"{_f(s['median_server_cpu_s'], '{:.2f}')} "
            f"({_f(s['median_server_cpu_s_per_1000_msgs'], '{:.3f}')}) | "
            f"{_f(s['median_client_cpu_s'], '{:.2f}')} | "
            f"{_f(s['max_server_peak_rss_mb'], '{:.1f}')} | "
            f"{_f(s['max_server_peak_pss_mb'], '{:.1f}')} | {s['ok_runs']}/{s['runs']} |"
        )
    pairs = []
    for s in summaries:
        for o in others:
            if o["mode"] == s["mode"] and o["median_msg_per_s"] and s["median_msg_per_s"]:
                ratio = s["median_msg_per_s"] / o["median_msg_per_s"]
                pairs.append(
                    f"| {s['server']} / {o['server']} | {s['mode']} | **{ratio:.3f}** | "
                    f"{'yes' if ratio >= 0.5 else 'no'} |"
                )
    if pairs:
        out += ["", "| msg/s ratio | mode | **ratio** | target >= 0.5 |", "|---|---|---|---|"]
        out += pairs
    return "\n".join(out)


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--modes",
        default="bulk,each",
        help="comma separated, run in the order given: " + ", ".join(MODES) + " (bulk,each)",
    )
    ap.add_argument("-n", "--messages", type=int, default=2000, help="mailbox size (2000)")
    ap.add_argument("--size", type=int, default=5120, help="octets per message (5120)")
    ap.add_argument("--runs", type=int, default=3, help="measured runs per mode; median (3)")
    ap.add_argument("--warmup", type=int, default=1, help="cold runs before, not in median (1)")
    ap.add_argument("--run-timeout", type=float, default=300, help="seconds per run at most (300)")
    ap.add_argument("--io-timeout", type=float, default=60, help="seconds per socket read (60)")
    ap.add_argument("--settle", type=float, default=0.5, help="pause between runs, s (0.5)")
    ap.add_argument(
        "--verify",
        action="store_true",
        help="also compare every message's content with what was written (client CPU)",
    )
    ap.add_argument(
        "--max-messages", type=int, default=1_000_000, help="refuse a bigger EXISTS (1000000)"
    )
    ap.add_argument(
        "--target", metavar="HOST:PORT", help="measure this running server instead of starting ours"
    )
    ap.add_argument("--user", help="with --target: the account (e.g. bob@example.test)")
    ap.add_argument("--password", help="with --target: its password")
    ap.add_argument("--maildir", help="with --target: the account's maildir (%%u %%d %%a)")
    ap.add_argument(
        "--pid",
        action="append",
        default=[],
        help="with --target: root PID(s) of the server (trees summed)",
    )
    ap.add_argument("--name", help="server label (default: mailserver, or HOST:PORT)")
    ap.add_argument(
        "--no-fill",
        dest="fill",
        action="store_false",
        help="with --target: use the mailbox as it is (not emptied, not filled)",
    )
    ap.add_argument(
        "--keep-mailbox", action="store_true", help="with --target: do not empty it at the end"
    )
    ap.add_argument("--port", type=int, default=0, help="our server's port (default: a free one)")
    add_server_args(ap)
    ap.add_argument("--sample-interval", type=float, default=0.02, help="RSS sampling, s (0.02)")
    ap.add_argument("--pss-interval", type=float, default=0.5, help="PSS sampling, s; 0 = off")
    ap.add_argument("--results", help="also append every JSON line to this file")
    ap.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="FILE",
        help="--results file of another server's run: its summaries go in the table (repeatable)",
    )
    args = ap.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in args.modes:
        if m not in MODES:
            ap.error(f"unknown mode {m}")
    if args.target and not (args.user and args.password is not None):
        ap.error("--target needs --user and --password")
    if args.target and args.fill and not args.maildir:
        ap.error("--target needs --maildir (or --no-fill)")
    if not args.target and (args.user or args.maildir or args.pid or not args.fill):
        ap.error("--user, --maildir, --pid and --no-fill go with --target")
    if args.verify and not args.fill:
        ap.error("--verify needs the mailbox filled by this script")
    if min(args.messages, args.size) < 1 or args.messages > args.max_messages:
        ap.error("--messages and --size must be positive, --messages <= --max-messages")
    if args.runs < 1 or args.warmup < 0 or args.run_timeout <= 0 or args.io_timeout <= 0:
        ap.error("--runs must be positive, --warmup not negative, timeouts positive")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)

    def _exit(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)
    signal.signal(signal.SIGHUP, _exit)

    out = Output(args.results)
    others = load_compare(args.compare, "imap-fetch")
    server: OwnServer | None = None
    mbx: Mailbox | None = None
    summaries: list[dict] = []
    user_for: Callable[[Mailbox], str]
    try:
        if args.target:
            host, _, port_s = args.target.rpartition(":")
            if host not in ("", "127.0.0.1", "localhost"):
                sys.exit("only 127.0.0.1 may be a target")
            host, port = "127.0.0.1", int(port_s)
            local, _, domain = args.user.rpartition("@")
            md = (args.maildir or "").replace("%u", local).replace("%d", domain)
            mbx = Mailbox(args.user, Path(md.replace("%a", args.user)))
            roots = [int(x) for p in args.pid for x in p.replace(",", " ").split()]
            name = args.name or f"{host}:{port}"
            if not wait_imap(host, port, None, 10):
                sys.exit(f"no IMAP server answers on {host}:{port}")
            if args.fill:
                secs = mbx.fill(args.messages, args.size, args.verify)
                print(
                    f"# filled {mbx.path}: {args.messages} x {args.size} in {secs:.1f}s",
                    file=sys.stderr,
                )
        else:
            args.password = PASSWORD
            server = OwnServer(args, "imap-fetch.", [(args.port or free_port(), "none")])
            server.write_config()
            account = f"bench-fetch@{DOMAIN}"
            how = server.add_users([account])
            print(f"# account {account} added with {how}", file=sys.stderr)
            mbx = Mailbox(account, server.maildir(account))
            secs = mbx.fill(args.messages, args.size, args.verify)  # before the start: cold
            print(
                f"# filled {mbx.path}: {args.messages} x {args.size} in {secs:.1f}s",
                file=sys.stderr,
            )
            server.start()
            host, port = "127.0.0.1", server.port
            roots = [server.pid]
            name = args.name or "mailserver"
        user_for = (lambda m: args.user) if args.target else (lambda m: m.account)
        args.user_for = user_for
        out.emit(
            {
                "bench": "imap-fetch",
                "header": True,
                "server": name,
                "target": f"{host}:{port}",
                "server_pids": roots,
                "maildir_fs": filesystem_of(
                    next((p for p in (mbx.path, *mbx.path.parents) if p.exists()), Path.cwd())
                ),
                "modes": args.modes,
                "messages": args.messages,
                "size": args.size,
                "filled": args.fill,
                "runs": args.runs,
                "warmup": args.warmup,
                "verify": args.verify,
                "client": "raw socket (TCP_NODELAY, 256 KiB reads)",
                "python": platform.python_version(),
                "kernel": platform.release(),
                "cpus": os.cpu_count(),
                "loadavg": os.getloadavg(),
                "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
        )
        for mode in args.modes:
            results = []
            warmups = args.warmup
            for r in range(warmups + args.runs):
                warm = r < warmups
                res = run_fetch(args, host, port, mbx, roots, mode, r - warmups, warm, name)
                out.emit(res)
                results.append(res)
                if server and server.proc and server.proc.poll() is not None:
                    raise RuntimeError("our server exited during the run; log: " + str(server.log))
                time.sleep(args.settle)
            s = summarize(mode, name, results)
            out.emit(s)
            summaries.append(s)
    finally:
        if server is not None:
            server.stop()
        elif args.target and args.fill and not args.keep_mailbox and mbx is not None:
            if mbx.contents is not None:
                mbx.clear()
    if summaries:
        print(
            "\n" + tables(summaries, [o for o in others if o["server"] != summaries[0]["server"]])
        )
    return 0 if all(s["ok_runs"] == s["runs"] for s in summaries) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
