#!/usr/bin/env python3
"""
Relay benchmark: how fast a server takes submitted mail in and hands it on to the next hop.

N (2000) messages of SIZE (5120) octets of body, one recipient each (user<i>@sink.test), are
submitted over SESSIONS (10) persistent SMTP sessions (EHLO, for our server AUTH PLAIN, then per
message MAIL/RCPT/DATA pipelined and the message after the 354) to the server, which relays them
to a sink MX of this script on 127.0.0.1. Per run and server:

  accept rate     N / time from the first message sent to the last 250 the client got
  relay rate      N / time from the first message sent to the last message's final 250 at the
                  sink (end to end: the figure to compare; a server with a queue answers 250
                  before it relays)
  at the sink     messages that arrived, each one exactly once: lost (never arrived within
                  --run-timeout), duplicates (arrived more than once), corrupt (body changed
                  on the way), stale (of an earlier run, arriving late); they are told apart
                  by their Message-ID <relay.RUN-TOKEN.i@client.perf.test> and the SHA-1 of
                  their body, and a run waits (bounded) until the sink has all N, so the
                  server's queue is empty before the next run
  server CPU      utime+stime of the server's process tree (children included) from
                  /proc/PID/stat, from the first message sent until the last one is at the
                  sink, and per 1000 messages; the session set-up (connect, EHLO and AUTH: 10
                  argon2id checks for our server) is measured apart (server_setup_cpu_s) and
                  is not in the rates: every session is set up before the first message is sent
  server memory   peak VmRSS of the process tree every 20 ms, peak PSS every 0.5 s (from
                  smaps_rollup: the figure to compare for Postfix, a process per stage), from
                  the first message sent until the last one is at the sink; the session set-up
                  apart (setup_peak_rss_mb: our argon2id checks use memory for a moment)
  load generator  its own CPU seconds; the sink's CPU seconds (both share the cores)

The sink is an asyncio SMTP server (ESMTP, PIPELINING, 8BITMIME; accepts every message, keeps
nothing but its Message-ID, body digest and the time of its final 250), a child process of its
own so that its CPU is apart; one sink serves both servers, the runs take turns.

The servers:

  * ours, always (unless --no-ours): a temporary directory with a TOML configuration (domain
    example.test, a "submission" listener on 127.0.0.1 with tls = "none" and
    allow_plaintext_auth = true, a [[route]] of sink.test to [127.0.0.1]:SINKPORT with
    tls = "none", the queue's defaults), the account alice@example.test made with the
    `mailserver` command, `twistd -n mailserver --config ...` started as a child process and
    always stopped at the end (SIGTERM, then SIGKILL after a bounded wait). Every session logs in
    (AUTH PLAIN over plaintext) before MAIL FROM:<alice@example.test>.
  * Postfix, with --reference DIR (the directory of the team's reference-start.sh and
    reference-stop.sh; needs root): started in a temporary WORKDIR with RELAYHOST pointing at
    the sink and free ports, always stopped (CLEAN=1 reference-stop.sh) at the end. Postfix
    relays from 127.0.0.0/8 (mynetworks) without AUTH, on its SMTP port; its tree is the
    Postfix master's (Dovecot is started by the script but takes no part).

Runs are interleaved (ours, Postfix, ours, Postfix, ...), --runs (2) of each; every run prints
one JSON line, every server a summary line with medians, and a table is printed at the end with
our relay rate as a fraction of Postfix's (the target is >= 1, with nothing lost):

    bench/relay.py                                      # ours only
    bench/relay.py --reference PATH/TO/perf --runs 3    # ours and Postfix, side by side
    bench/relay.py --reference PATH/TO/perf --no-ours   # Postfix only

Requirements: Linux (/proc), Python >= 3.11, the project installed (for our server). Only
127.0.0.1 is ever contacted; every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import re
import resource
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from _common import (
    DOMAIN,
    PASSWORD,
    Output,
    OwnServer,
    RunningLoad,
    Sampler,
    add_sampling_args,
    add_server_args,
    exit_on_signals,
    fmt,
    free_port,
    host_busy_since,
    host_cpu_snapshot,
    machine,
    median,
    new_parser,
    read_line,
    smtp_body,
    start_client,
    tree_cpu_s,
    wait_greeting,
)

SINK_DOMAIN = "sink.test"
SBIN = "/usr/sbin:/sbin"  # where Postfix's commands are when not on PATH (as reference-start.sh)
USER = f"alice@{DOMAIN}"
MSGID = re.compile(rb"(?im)^message-id:[ \t]*<relay\.([0-9a-z]+)\.(\d+)@")

# ----------------------------------------------------------------------------- the sink MX


class SinkState:
    """What the sink saw in the current run (C{token}); the sink's answer to "status"."""

    def __init__(self) -> None:
        self.token = b""
        self.digest = b""
        self.reset(b"", b"")

    def reset(self, token: bytes, digest: bytes) -> None:
        self.token = token
        self.digest = digest
        self.seen: set[int] = set()
        self.received = self.duplicates = self.stale = self.corrupt = self.unparsed = 0
        self.rcpts = 0
        self.t_first: float | None = None
        self.t_last: float | None = None
        self.sessions = 0
        self.open = 0
        self.peak_open = 0

    def record(self, data: bytes, rcpts: int) -> None:
        """One message, its final 250 being sent now."""
        now = time.monotonic()
        self.received += 1
        self.rcpts += rcpts
        sep = data.find(b"\r\n\r\n")
        m = MSGID.search(data, 0, sep if sep >= 0 else len(data))
        if m is None:
            self.unparsed += 1
            return
        if m.group(1) != self.token:
            self.stale += 1
            return
        i = int(m.group(2))
        if i in self.seen:
            self.duplicates += 1
            return
        self.seen.add(i)
        body = (b"\r\n" + data[sep + 4 :]).replace(b"\r\n..", b"\r\n.")[2:] if sep >= 0 else b""
        if hashlib.sha1(body).digest() != self.digest:
            self.corrupt += 1
        if self.t_first is None:
            self.t_first = now
        self.t_last = now

    def status(self) -> dict[str, object]:
        return {
            "token": self.token.decode(),
            "unique": len(self.seen),
            "received": self.received,
            "duplicates": self.duplicates,
            "stale": self.stale,
            "corrupt": self.corrupt,
            "unparsed": self.unparsed,
            "rcpts": self.rcpts,
            "t_first": self.t_first,
            "t_last": self.t_last,
            "sessions": self.sessions,
            "peak_sessions": self.peak_open,
        }


class SinkSession(asyncio.Protocol):
    """One SMTP session at the sink: commands are answered in order, pipelined or not."""

    MAX_LINE = 8192
    MAX_MESSAGE = 64 * 1024 * 1024
    EHLO = (
        b"250-sink.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SIZE 67108864\r\n"
        b"250 ENHANCEDSTATUSCODES\r\n"
    )
    SIMPLE = {b"EHLO": EHLO, b"HELO": b"250 sink.test\r\n", b"NOOP": b"250 2.0.0 Ok\r\n"}

    def __init__(self, state: SinkState) -> None:
        self.state = state
        self.buf = bytearray()
        self.in_data = False
        self.scan = 0
        self.mail = False
        self.rcpts = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.state.sessions += 1
        self.state.open += 1
        self.state.peak_open = max(self.state.peak_open, self.state.open)
        transport.write(b"220 sink.test ESMTP bench sink\r\n")

    def connection_lost(self, exc: Exception | None) -> None:
        self.state.open -= 1

    def data_received(self, data: bytes) -> None:
        self.buf += data
        out: list[bytes] = []
        closing = False
        while not closing:
            if self.in_data:
                # the buffer starts with the CRLF of the DATA line: "\r\n.\r\n" ends the message
                j = self.buf.find(b"\r\n.\r\n", max(0, self.scan - 4))
                if j < 0:
                    self.scan = len(self.buf)
                    if len(self.buf) > self.MAX_MESSAGE:
                        out.append(b"552 5.3.4 too big\r\n")
                        closing = True
                    break
                self.state.record(bytes(self.buf[2 : j + 2]), self.rcpts)
                del self.buf[: j + 5]
                self.in_data = False
                self.mail = False
                self.rcpts = 0
                out.append(b"250 2.0.0 Ok: queued\r\n")
                continue
            i = self.buf.find(b"\r\n")
            if i < 0:
                if len(self.buf) > self.MAX_LINE:
                    out.append(b"500 5.5.0 line too long\r\n")
                    closing = True
                break
            line = bytes(self.buf[:i])
            del self.buf[: i + 2]
            reply, closing = self.command(line)
            out.append(reply)
        if out:
            self.transport.write(b"".join(out))
        if closing:
            self.transport.close()

    def command(self, line: bytes) -> tuple[bytes, bool]:
        """The reply to one command line, and whether to close after it."""
        verb = line[:4].upper()
        if verb in self.SIMPLE:
            return self.SIMPLE[verb], False
        if verb in (b"MAIL", b"RSET"):
            self.mail = verb == b"MAIL"
            self.rcpts = 0
            return (b"250 2.1.0 Ok\r\n" if self.mail else b"250 2.0.0 Ok\r\n"), False
        if verb == b"RCPT":
            if not self.mail:
                return b"503 5.5.1 MAIL first\r\n", False
            self.rcpts += 1
            return b"250 2.1.5 Ok\r\n", False
        if verb == b"DATA":
            if not self.rcpts:
                return b"503 5.5.1 RCPT first\r\n", False
            self.in_data = True
            self.buf[0:0] = b"\r\n"
            self.scan = 0
            return b"354 End data with <CR><LF>.<CR><LF>\r\n", False
        if verb == b"QUIT":
            return b"221 2.0.0 Bye\r\n", True
        return b"502 5.5.2 not implemented\r\n", False


async def _sink(port: int) -> None:
    loop = asyncio.get_running_loop()
    state = SinkState()
    server = await loop.create_server(
        lambda: SinkSession(state), "127.0.0.1", port, backlog=1024, reuse_address=True
    )
    print(json.dumps({"port": server.sockets[0].getsockname()[1]}), flush=True)
    done = loop.create_future()
    pending = bytearray()

    def control() -> None:
        """Commands on stdin: "run TOKEN SIZE", "status", "quit"; one JSON line each."""
        data = os.read(0, 4096)
        if not data:
            if not done.done():
                done.set_result(None)
            return
        pending.extend(data)
        while (i := pending.find(b"\n")) >= 0:
            words = bytes(pending[:i]).split()
            del pending[: i + 1]
            if words[:1] == [b"run"] and len(words) == 3:
                state.reset(words[1], hashlib.sha1(smtp_body(int(words[2]))).digest())
                print(json.dumps({"ok": True}), flush=True)
            elif words[:1] == [b"status"]:
                print(json.dumps(state.status()), flush=True)
            elif words[:1] == [b"quit"] and not done.done():
                done.set_result(None)

    loop.add_reader(0, control)
    try:
        await done
    finally:
        loop.remove_reader(0)
        server.close()


def sink_main(argv: list[str]) -> int:
    port = int(argv[0]) if argv else 0
    asyncio.run(_sink(port))
    return 0


class Sink:
    """The sink MX as a child process, and its control channel."""

    def __init__(self, errfile: Path) -> None:
        cmd = [sys.executable, os.path.abspath(__file__), "--internal-sink"]
        err = open(errfile, "wb")
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
        err.close()
        self.errfile = errfile
        line = read_line(self.p, 30)
        if not line:
            self.stop()
            raise RuntimeError("the sink did not start: " + errfile.read_text(errors="replace"))
        self.port = int(json.loads(line)["port"])

    @property
    def pid(self) -> int:
        return self.p.pid

    def ask(self, cmd: str, timeout: float = 10) -> dict:
        assert self.p.stdin
        self.p.stdin.write(cmd.encode() + b"\n")
        self.p.stdin.flush()
        line = read_line(self.p, timeout)
        if not line:
            raise RuntimeError(f"the sink did not answer {cmd!r}")
        return json.loads(line)

    def stop(self) -> None:
        if self.p.poll() is None:
            try:
                assert self.p.stdin
                self.p.stdin.write(b"quit\n")
                self.p.stdin.flush()
                self.p.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                self.p.kill()
                self.p.wait(10)


# ----------------------------------------------------------------------------- the servers


@dataclass
class Target:
    """A server under test: where to submit, its process tree, whether sessions log in."""

    name: str
    port: int
    roots: list[int]
    auth: list[str] | None
    check: Callable[[], None] | None = None  # raises if the server died


def own_server(args: argparse.Namespace, sink_port: int) -> OwnServer:
    route = f"""
[[route]]
domain = "{SINK_DOMAIN}"
host = "[127.0.0.1]:{sink_port}"
tls = "none"
"""
    listener = ("submission", args.port or free_port(), "none", True)
    server = OwnServer(args, "relay.", [listener], DOMAIN, extra=route + (args.extra_config or ""))
    server.write_config()
    how = server.add_users([USER])
    server.start(f"  (user {USER} added with {how})")
    return server


class Reference:
    """Postfix (+ Dovecot) of the team's reference-start.sh, relaying to the sink."""

    def __init__(self, perf_dir: Path, sink_port: int, args: argparse.Namespace) -> None:
        self.start_script = perf_dir / "reference-start.sh"
        self.stop_script = perf_dir / "reference-stop.sh"
        for s in (self.start_script, self.stop_script):
            if not os.access(s, os.X_OK):
                raise RuntimeError(f"{s}: not found or not executable")
        self.workdir = Path(tempfile.mkdtemp(prefix="relay-ref.", dir=args.work_dir))
        self.port = free_port()
        self.env = dict(
            os.environ,
            WORKDIR=str(self.workdir),
            RELAYHOST=f"[127.0.0.1]:{sink_port}",
            SMTP_PORT=str(self.port),
            POP3_PORT=str(free_port()),
            IMAP_PORT=str(free_port()),
        )
        self.ref: dict[str, str] = {}
        self.started = False

    def _script(self, script: Path, env: dict[str, str], log: Path) -> int:
        """Run a reference script, its output to C{log} (a file: the daemons it starts keep
        their inherited descriptors open, a pipe would never reach EOF); its exit code."""
        with open(log, "ab") as f:
            try:
                return subprocess.run(
                    [str(script)],
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=f,
                    stderr=f,
                    timeout=180,
                ).returncode
            except subprocess.TimeoutExpired:
                return -1

    def start(self) -> int:
        """Start it; the Postfix master's PID."""
        self.started = True
        log = self.workdir / "reference-start.log"
        if self._script(self.start_script, self.env, log) != 0:
            raise RuntimeError(f"reference-start.sh failed: {log.read_text()[-1500:]}")
        env_file = self.workdir / "ref" / "ref.env"
        for line in env_file.read_text().splitlines():
            words = shlex.split(line, comments=True)
            if len(words) == 2 and words[0] == "export" and "=" in words[1]:
                k, _, v = words[1].partition("=")
                self.ref[k] = v
        print(f"# reference: {log.read_text().strip().splitlines()[-3]}", file=sys.stderr)
        self.fix_transport()
        if not wait_greeting("127.0.0.1", self.port, None, 30):
            raise RuntimeError(f"Postfix does not answer on port {self.port}")
        return int(self.ref["POSTFIX_PID"])

    def fix_transport(self) -> None:
        """
        reference-start.sh writes default_transport = smtp[127.0.0.1]:PORT when RELAYHOST is
        set (its ${RELAYHOST:-...} expands to RELAYHOST itself), a transport that does not
        exist: every relayed message is deferred ("mail transport unavailable"). The relay
        transport is plain "smtp" (to relayhost): set it in this private instance and reload.
        """
        conf = self.workdir / "ref" / "postfix" / "conf"
        bin_dir = os.environ.get("POSTFIX_BIN_DIR")
        postconf, postfix = (
            (str(Path(bin_dir) / b) if bin_dir else shutil.which(b) or shutil.which(b, path=SBIN))
            for b in ("postconf", "postfix")
        )
        if not postconf or not postfix:
            raise RuntimeError("postconf / postfix not found")
        now = subprocess.run(
            [postconf, "-c", str(conf), "-h", "default_transport"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
        if now != "smtp":
            print(f"# reference: default_transport was {now!r}, set to 'smtp'", file=sys.stderr)
            for cmd in (
                [postconf, "-c", str(conf), "-e", "default_transport=smtp"],
                [postfix, "-c", str(conf), "reload"],
            ):
                subprocess.run(
                    cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=60, check=True
                )
            time.sleep(1.0)  # the reload restarts qmgr

    def stop(self) -> None:
        if self.started:
            log = self.workdir / "reference-stop.log"
            if self._script(self.stop_script, dict(self.env, CLEAN="1"), log) != 0:
                print(f"# reference-stop.sh: {log.read_text()[-500:]}", file=sys.stderr)
        shutil.rmtree(self.workdir, ignore_errors=True)


# ----------------------------------------------------------------------------- one run


def one_run(args, sink: Sink, target: Target, run: int, errfile: Path) -> dict:
    n = args.messages
    token = secrets.token_hex(6)
    sink.ask(f"run {token} {args.size}")
    spec = {
        "host": "127.0.0.1",
        "port": target.port,
        "rcpt": "user{i}@" + SINK_DOMAIN,
        "msgid": f"<relay.{token}.{{i}}@client.perf.test>",
        "subject": "perf relay",
        "messages": n,
        "size": args.size,
        "concurrency": args.sessions,
        "keepalive": True,
        "timeout": args.run_timeout,
        "barrier": True,
        "auth": target.auth,
        "sender": USER,
    }
    roots = target.roots
    sampler = Sampler(roots, args.sample_interval, args.pss_interval, args.run_timeout + 90)
    sampler.start()
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    setup0 = tree_cpu_s(roots)
    p = start_client(spec, errfile)
    assert p.stdin
    p.stdin.write(b"go\n")
    p.stdin.flush()
    up_line = read_line(p, 120)
    up = json.loads(up_line) if up_line and up_line.startswith(b"{") else {"up": None}
    setup_mem = sampler.stop()
    sampler = Sampler(roots, args.sample_interval, args.pss_interval, args.run_timeout + 90)
    sampler.start()
    cpu0 = tree_cpu_s(roots)
    sink_cpu0 = tree_cpu_s([sink.pid])
    busy0 = host_cpu_snapshot()
    t0 = time.monotonic()
    try:
        p.stdin.write(b"send\n")
        p.stdin.flush()
    except OSError:
        pass
    load = RunningLoad(p, t0, errfile, builtin=True)
    deadline = t0 + args.run_timeout
    expected = n
    polls = 0
    while time.monotonic() < deadline and polls < args.run_timeout * 100:
        polls += 1
        if load.done() and expected == n:
            stats = _client_stats(load)
            expected = int(stats.get("ok", 0))
            if load.p.returncode != 0:  # it gave up: what it got accepted may still arrive
                deadline = min(deadline, (load.t_exit or t0) + args.drain_timeout)
        status = sink.ask("status")
        if load.done() and status["unique"] >= expected:
            break
        time.sleep(0.02)
    rep = load.finish()
    cpu1 = tree_cpu_s(roots)
    host = host_busy_since(busy0)
    sink_cpu1 = tree_cpu_s([sink.pid])
    mem = sampler.stop()
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    time.sleep(args.dup_wait)  # a late duplicate would still be counted
    status = sink.ask("status")
    t_first = rep.pop("t_first", None) or t0
    t_acc = rep.pop("t_accept")
    client = rep.get("client") or {}
    ok = int(client.get("ok", 0))
    t_last = status["t_last"]
    complete = status["unique"] >= n
    cpu_total = (cpu1[0] - cpu0[0]) + (cpu1[1] - cpu0[1])
    res: dict[str, object] = {
        "bench": "relay",
        "server": target.name,
        "run": run,
        "n": n,
        "size": args.size,
        "sessions": args.sessions,
        "sessions_up": up.get("up"),
        "logins": client.get("logins", 0),
        "setup_s": up.get("setup_s"),
        "accepted": ok,
        "accept_s": round(t_acc - t_first, 3) if t_acc and ok == n else None,
        "accept_msg_per_s": round(n / (t_acc - t_first), 1) if t_acc and ok == n else None,
        "at_sink": status["unique"],
        "lost": n - status["unique"],
        "duplicates": status["duplicates"],
        "corrupt": status["corrupt"],
        "stale": status["stale"],
        "unparsed": status["unparsed"],
        "relay_s": round(t_last - t_first, 3) if complete and t_last else None,
        "relay_msg_per_s": round(n / (t_last - t_first), 1) if complete and t_last else None,
        "sink_sessions": status["sessions"],
        "sink_peak_sessions": status["peak_sessions"],
        "server_setup_cpu_s": round(sum(cpu0) - sum(setup0), 2),
        "server_cpu_s": round(cpu_total, 2),
        "server_cpu_user_s": round(cpu1[0] - cpu0[0], 2),
        "server_cpu_sys_s": round(cpu1[1] - cpu0[1], 2),
        "server_cpu_s_per_1000_msgs": round(cpu_total * 1000 / n, 3),
        "client_cpu_s": round((ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime), 2),
        "sink_cpu_s": round(sum(sink_cpu1) - sum(sink_cpu0), 2),
    }
    res.update(host)
    res.update(mem)
    res["setup_peak_rss_mb"] = setup_mem["server_peak_rss_mb"]
    res["setup_peak_pss_mb"] = setup_mem["server_peak_pss_mb"]
    res.update(rep)
    problems = []
    if ok != n:
        problems.append(f"accepted {ok}/{n}")
    if not complete:
        problems.append(f"{n - status['unique']} not at the sink within the time limit")
    for k in ("duplicates", "corrupt", "unparsed"):
        if status[k]:
            problems.append(f"{status[k]} {k}")
    if rep.get("generator_rc") != 0:
        problems.append(f"load generator exit code {rep.get('generator_rc')}")
    if problems:
        res["error"] = "; ".join(problems)
    return res


def _client_stats(load: RunningLoad) -> dict:
    """The load generator's final report, once it has exited (empty if none)."""
    try:
        return json.loads(load.stdout.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {}


# ----------------------------------------------------------------------------- the benchmark


def summarize(name: str, results: list[dict]) -> dict:
    ok = [r for r in results if "error" not in r]

    def med(key: str) -> float | None:
        return median([r.get(key) for r in results])

    def top(key: str) -> float | None:
        return max([r[key] for r in results if r.get(key) is not None], default=None)

    return {
        "bench": "relay",
        "summary": True,
        "server": name,
        "n": results[0]["n"] if results else None,
        "sessions": results[0]["sessions"] if results else None,
        "logins_per_run": results[0].get("logins") if results else None,
        "runs": len(results),
        "ok_runs": len(ok),
        "median_relay_msg_per_s": med("relay_msg_per_s"),
        "all_relay_msg_per_s": [r.get("relay_msg_per_s") for r in results],
        "median_accept_msg_per_s": med("accept_msg_per_s"),
        "median_server_cpu_s_per_1000_msgs": med("server_cpu_s_per_1000_msgs"),
        "median_server_setup_cpu_s": med("server_setup_cpu_s"),
        "max_server_peak_rss_mb": top("server_peak_rss_mb"),
        "max_server_peak_pss_mb": top("server_peak_pss_mb"),
        "max_server_peak_nproc": top("server_peak_nproc"),
        "max_setup_peak_rss_mb": top("setup_peak_rss_mb"),
        "total_lost": sum(r.get("lost") or 0 for r in results),
        "total_duplicates": sum(r.get("duplicates") or 0 for r in results),
        "total_corrupt": sum(r.get("corrupt") or 0 for r in results),
        "median_client_cpu_s": med("client_cpu_s"),
        "median_sink_cpu_s": med("sink_cpu_s"),
        "median_host_cpu_busy": med("host_cpu_busy"),
    }


def table(summaries: list[dict]) -> str:
    out = [
        "| server | logins/run | **relay msg/s** | relay, each run | accept msg/s | "
        "CPU-s/1000 msgs | setup CPU-s | peak RSS MB (setup) | peak PSS MB | procs | "
        "lost / dup / corrupt | client / sink CPU s | ok runs |",
        "|" + "---|" * 13,
    ]
    for s in summaries:
        out.append(
            f"| {s['server']} | {s['logins_per_run']} | **{fmt(s['median_relay_msg_per_s'])}** | "
            f"{', '.join(fmt(x) for x in s['all_relay_msg_per_s'])} | "
            f"{fmt(s['median_accept_msg_per_s'])} | "
            f"{fmt(s['median_server_cpu_s_per_1000_msgs'], '{:.2f}')} | "
            f"{fmt(s['median_server_setup_cpu_s'], '{:.2f}')} | "
            f"{fmt(s['max_server_peak_rss_mb'], '{:.1f}')} "
            f"({fmt(s['max_setup_peak_rss_mb'], '{:.1f}')}) | "
            f"{fmt(s['max_server_peak_pss_mb'], '{:.1f}')} | "
            f"{fmt(s['max_server_peak_nproc'])} | "
            f"{s['total_lost']} / {s['total_duplicates']} / {s['total_corrupt']} | "
            f"{fmt(s['median_client_cpu_s'], '{:.2f}')} / "
            f"{fmt(s['median_sink_cpu_s'], '{:.2f}')} | {s['ok_runs']}/{s['runs']} |"
        )
    ours = next((s for s in summaries if s["server"] == "mailserver"), None)
    ref = next((s for s in summaries if s["server"] == "postfix"), None)
    if ours and ref:
        a, b = ours["median_relay_msg_per_s"], ref["median_relay_msg_per_s"]
        pairs = [
            f"{x / y:.2f}" if x and y else "—"
            for x, y in zip(ours["all_relay_msg_per_s"], ref["all_relay_msg_per_s"], strict=False)
        ]
        ratio = a / b if a and b else None
        nothing_lost = ours["total_lost"] == 0 and ours["total_duplicates"] == 0
        met = ratio is not None and ratio >= 1 and nothing_lost and ours["ok_runs"] == ours["runs"]
        out += [
            "",
            "| relay msg/s, ours / Postfix | **median** | run by run | target >= 1, none lost |",
            "|---|---|---|---|",
            f"| mailserver / postfix | **{fmt(ratio, '{:.2f}')}** | {', '.join(pairs)} | "
            f"{'met' if met else 'not met'} |",
        ]
    return "\n".join(out)


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = new_parser(__doc__)
    ap.add_argument("-n", "--messages", type=int, default=2000, help="messages per run (2000)")
    ap.add_argument("--size", type=int, default=5120, help="body octets per message (5120)")
    ap.add_argument("--sessions", type=int, default=10, help="SMTP sessions in parallel (10)")
    ap.add_argument("--runs", type=int, default=2, help="runs per server, interleaved (2)")
    ap.add_argument("--run-timeout", type=float, default=300, help="seconds per run at most (300)")
    ap.add_argument(
        "--drain-timeout",
        type=float,
        default=60,
        help="when the client gave up: seconds to wait for what was accepted to arrive (60)",
    )
    ap.add_argument(
        "--dup-wait", type=float, default=1.0, help="seconds after a run for late duplicates (1)"
    )
    ap.add_argument("--settle", type=float, default=1.0, help="pause between runs, s (1)")
    ap.add_argument(
        "--reference",
        metavar="DIR",
        help="directory of reference-start.sh / reference-stop.sh: Postfix side by side",
    )
    ap.add_argument("--no-ours", action="store_true", help="do not measure our server")
    ap.add_argument(
        "--extra-config", metavar="TOML", help="more TOML for our server's configuration"
    )
    add_server_args(ap)
    add_sampling_args(ap)
    args = ap.parse_args(argv)
    if min(args.messages, args.size, args.sessions, args.runs) < 1 or args.run_timeout <= 0:
        ap.error("--messages, --size, --sessions, --runs and --run-timeout must be positive")
    if args.no_ours and not args.reference:
        ap.error("--no-ours needs --reference")
    if args.reference and os.geteuid() != 0:
        ap.error("--reference needs root (Postfix's reference-start.sh)")
    return args


def main(argv: list[str]) -> int:
    if argv[:1] == ["--internal-sink"]:
        return sink_main(argv[1:])
    args = parse_args(argv)
    exit_on_signals()
    out = Output(args.results)
    scratch = Path(tempfile.mkdtemp(prefix="relay-bench."))
    sink: Sink | None = None
    server: OwnServer | None = None
    ref: Reference | None = None
    targets: list[Target] = []
    summaries: list[dict] = []
    failed_start = False
    try:
        sink = Sink(scratch / "sink.err")
        print(f"# sink MX on 127.0.0.1:{sink.port} (pid {sink.pid})", file=sys.stderr)
        if not args.no_ours:
            try:
                server = own_server(args, sink.port)
                own = Target("mailserver", server.port, [server.pid], [USER, PASSWORD])
                own.check = server.check_alive
                targets.append(own)
            except (RuntimeError, OSError) as e:
                failed_start = True
                out.emit({"bench": "relay", "server": "mailserver", "error": f"start: {e}"})
        if args.reference:
            ref = Reference(Path(args.reference), sink.port, args)
            targets.append(Target("postfix", ref.port, [ref.start()], None))
        if not targets:
            return 1
        out.emit(
            {
                "bench": "relay",
                "header": True,
                "servers": [t.name for t in targets],
                "targets": {t.name: f"127.0.0.1:{t.port}" for t in targets},
                "server_pids": {t.name: t.roots for t in targets},
                "logins_per_run": {t.name: args.sessions if t.auth else 0 for t in targets},
                "sink": f"127.0.0.1:{sink.port}",
                "n": args.messages,
                "size": args.size,
                "sessions": args.sessions,
                "runs": args.runs,
                "client": "built-in asyncio client: EHLO (+ AUTH PLAIN for ours) on every "
                "session first, then MAIL/RCPT/DATA pipelined per message",
                **machine(),
            }
        )
        results: dict[str, list[dict]] = {t.name: [] for t in targets}
        for run in range(args.runs):
            for t in targets:
                res = one_run(args, sink, t, run, scratch / "client.err")
                out.emit(res)
                results[t.name].append(res)
                if t.check:
                    t.check()
                time.sleep(args.settle)
        for t in targets:
            s = summarize(t.name, results[t.name])
            out.emit(s)
            summaries.append(s)
    finally:
        if server is not None:
            server.stop()
        if ref is not None:
            ref.stop()
        if sink is not None:
            sink.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    if summaries:
        print("\n" + table(summaries), flush=True)
        notes = {
            "mailserver": f"ours: {args.sessions} sessions, each with AUTH PLAIN: "
            f"{args.sessions} logins a run (set up before the clock starts)",
            "postfix": "Postfix: no AUTH, it relays for 127.0.0.0/8",
        }
        print("\n(" + "; ".join(notes[s["server"]] for s in summaries) + ")", flush=True)
    ok = all(s["ok_runs"] == s["runs"] for s in summaries)
    return 0 if ok and not failed_start else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
