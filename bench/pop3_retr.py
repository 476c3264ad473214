#!/usr/bin/env python3
"""
POP3 download benchmark: how fast one session takes a whole mailbox out of a server.

Modes (--modes, comma separated; default sequential,pipelined):

  sequential  one session: USER/PASS, STAT, LIST, then RETR 1..N one command at a time (send
              "RETR n", read the whole answer, next: what poplib and most clients do), QUIT
  pipelined   the same with --window (50) RETR commands outstanding (RFC 2449 PIPELINING: the
              client sends the next commands while answers are still arriving)
  big         RETR of one --big-size (20 MiB) message: the growth of the server's RSS from
              just before the RETR to its peak during it (target < 5 MB). The client reads at
              --big-read-rate (10 MB/s; 0 = as fast as it can) with a 256 KiB receive buffer,
              so a server that does not stop reading the file while the client is slow has to
              hold the message in memory
  stat100k    USER, PASS, STAT, QUIT on a --stat-messages (100,000) message mailbox with a warm
              index (the first, cold, login is a warm-up run): PASS+STAT time, the time a client
              waits for the mailbox to be listed (target < 0.5 s; a POP3 server opens the
              mailbox at PASS, or at the first command that needs it: Dovecot at STAT),
              and PASS and STAT apart (PASS includes the password check: argon2id for our
              server, about 0.1 s; {PLAIN} in the reference stack's passwd-file)

The mailbox of each mode is filled by writing maildir files directly (tmp/, then rename into
new/): sequential and pipelined share --messages (2000) messages of --size (5120) octets,
CRLF line endings, realistic headers (Return-Path, Received, Date, From, To, Subject,
Message-ID, MIME), some bodies with lines that need dot-stuffing. When run as root the files
get the owner of the maildir. Then --warmup (1) runs make the server look at the mailbox
(the cold figure: reported, not in the median) before --runs (3) measured runs.

Measured per run (RETR phase: from the first RETR sent to the last answer read):

  msg/s, MB/s     messages and octets received (after un-dot-stuffing; MB = 10^6 octets)
                  per second of RETR phase
  checks          the count against STAT and the number of messages written, every message's
                  octets against what LIST announced, the total against STAT's octets;
                  --verify also compares every message's content with what was written
                  (costs client CPU)
  server CPU      utime+stime (children included) of the server's process trees from
                  /proc/PID/stat, over the RETR phase (server_cpu_s, and per 1000 messages)
                  and over the whole session (server_session_cpu_s)
  server memory   peak RSS of the process trees (sampled every --sample-interval, 20 ms) and
                  peak PSS (every --pss-interval, 0.5 s) over the session; for multi-process
                  servers (Dovecot: one process per session) compare PSS
  client CPU      the client thread's CPU time (user+system, and system alone) over the RETR
                  phase (it shares the cores with the server)

The client is a raw socket client (TCP_NODELAY, 256 KiB reads, each multi-line answer framed
by finding CRLF.CRLF in the buffer): with poplib (one readline per line) the client uses as
much CPU as a fast server, and the figure would be the client's.

Two ways to use it:

  * our server (default): the script makes a temporary directory with a TOML configuration
    (one POP3 listener on 127.0.0.1, tls = "none", allow_plaintext_auth = true), adds one
    account per mailbox (bench-retr, bench-big, bench-stat @example.test) with the
    `mailserver` command, fills their maildirs under <data_dir>/mail/, starts
    `twistd -n mailserver --config ...`, waits for the greeting, runs the benchmark and
    always stops the server (SIGTERM, then SIGKILL after a bounded wait):

        bench/pop3_retr.py
        bench/pop3_retr.py --modes sequential,pipelined,big,stat100k --runs 3

  * a running server, for example Dovecot of the Postfix + Dovecot reference stack:

        . "$WORKDIR/ref/ref.env"
        bench/pop3_retr.py --target 127.0.0.1:$POP3_PORT --user bob@example.test \\
            --password password --maildir "$MAILDIR_FMT" --pid "$DOVECOT_PID" --name dovecot

    --maildir may contain %u (local part), %d (domain), %a (address); --pid takes one or
    more root PIDs (space or comma separated, repeatable) whose whole trees are measured.
    The maildir is emptied (new/ cur/ tmp/ and Dovecot's index files) and refilled before a
    mode that needs other contents, and emptied at the end (--keep-mailbox keeps it): only
    point it at an idle test mailbox. --no-fill uses the mailbox as it is (no content
    checks against what was written; the modes then all use it).

Every run prints one JSON line, every mode a summary line with medians, and tables are
printed at the end. Requirements: Linux (/proc), Python >= 3.11, the project installed (for
our server). Only 127.0.0.1 is ever contacted; every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from collections import Counter

from _common import (
    DOMAIN,
    DOWNLOAD_TABLE_HEAD,
    PASSWORD,
    RECV,
    Mailbox,
    Meter,
    Output,
    OwnServer,
    ProtocolError,
    RawClient,
    add_download_args,
    check_download_args,
    client_cpu,
    cpu_delta,
    cpu_mark,
    download_row,
    end_session,
    existing_filesystem_of,
    exit_on_signals,
    expand_maildir,
    fmt,
    free_port,
    machine,
    new_parser,
    no_server_figures,
    parse_modes,
    parse_pids,
    parse_target,
    run_mode,
    summary_of_runs,
    tree_rss_kb,
    wait_greeting,
)

MODES = ("sequential", "pipelined", "big", "stat100k")
MIB = 1024 * 1024

# ----------------------------------------------------------------------------- client


class POP3Error(ProtocolError):
    """The server answered -ERR, or something that is not POP3."""


class Client(RawClient):
    """
    A raw POP3 client on a blocking socket. Answers are read from one buffer; a multi-line
    answer is framed by finding CRLF.CRLF from its status line's CRLF. Commands queued with
    L{queue} are sent before the client would block in recv (and in batches of C{batch}).
    """

    def __init__(
        self,
        host: str,
        port: int,
        io_timeout: float,
        deadline: float,
        rcvbuf: int = 0,
        read_rate: float = 0,
    ) -> None:
        super().__init__(host, port, io_timeout, deadline, rcvbuf)
        self.pending: list[bytes] = []
        self.batch = 1
        self.read_rate = read_rate  # octets/s, 0: unlimited
        self.t_read0 = 0.0

    def queue(self, cmd: bytes) -> None:
        self.pending.append(cmd)
        if len(self.pending) >= self.batch:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.sock.sendall(b"".join(self.pending))
            self.pending.clear()

    def _fill(self) -> None:
        self.flush()
        super()._fill()

    def pace(self, now: float) -> None:
        if self.read_rate:
            if not self.t_read0:
                self.t_read0 = now
            ahead = self.t_read0 + self.bytes_in / self.read_rate - now
            if ahead > 0:
                time.sleep(min(ahead, max(0.0, self.deadline - now)))

    def _compact(self) -> None:
        if self.pos > 65536:
            del self.buf[: self.pos]
            self.pos = 0

    def line(self) -> bytes:
        """One line (a status line), without its CRLF."""
        self._compact()
        start = self.pos
        while True:
            i = self.buf.find(b"\r\n", start)
            if i >= 0:
                line = bytes(self.buf[self.pos : i])
                self.pos = i + 2
                return line
            if len(self.buf) - self.pos > 65536:
                raise POP3Error("status line longer than 64 KiB")
            start = max(self.pos, len(self.buf) - 1)
            self._fill()

    def ok(self, what: str) -> bytes:
        line = self.line()
        if not line.startswith(b"+OK"):
            raise POP3Error(f"{what}: {line[:200].decode(errors='replace')}")
        return line

    def command(self, cmd: str) -> bytes:
        """Send a command with a one-line answer; the +OK line."""
        self.sock.sendall(cmd.encode() + b"\r\n")
        return self.ok(cmd.split()[0])

    def multiline(self) -> tuple[bytes, int, int, int]:
        """
        One answer that is multi-line when it is +OK: (status line, octets after
        un-dot-stuffing, start, end of the stuffed data in C{self.buf}, valid until the next
        call). A -ERR answer is one line: (status line, -1, 0, 0).
        """
        self._compact()
        start = self.pos
        search = start
        while True:
            i = self.buf.find(b"\r\n", search)
            if i >= 0:
                break
            if len(self.buf) - start > 65536:
                raise POP3Error("status line longer than 64 KiB")
            search = max(start, len(self.buf) - 1)
            self._fill()
        status = bytes(self.buf[start:i])
        if not status.startswith(b"+OK"):
            self.pos = i + 2
            return status, -1, 0, 0
        search = i
        while True:
            j = self.buf.find(b"\r\n.\r\n", search)
            if j >= 0:
                break
            search = max(i, len(self.buf) - 4)
            self._fill()
        stuffed = self.buf.count(b"\r\n..", i, j + 3)
        self.pos = j + 5
        return status, (j - i) - stuffed, i + 2, j + 2

    def unstuffed(self, start: int, end: int) -> bytes:
        return (b"\r\n" + bytes(self.buf[start:end])).replace(b"\r\n..", b"\r\n.")[2:]


def login(c: Client, user: str, password: str) -> tuple[float, float]:
    """Greeting, USER, PASS; (greeting+USER seconds, PASS seconds)."""
    t0 = time.perf_counter()
    c.ok("greeting")
    c.command(f"USER {user}")
    t1 = time.perf_counter()
    c.command(f"PASS {password}")
    return t1 - t0, time.perf_counter() - t1


def stat(c: Client) -> tuple[int, int]:
    words = c.command("STAT").split()
    try:
        return int(words[1]), int(words[2])
    except (IndexError, ValueError):
        raise POP3Error(f"STAT: {b' '.join(words)[:200]!r}")


def list_sizes(c: Client, count: int) -> list[int]:
    """LIST: sizes[n - 1] is what LIST announces for message n (-1: not listed)."""
    c.sock.sendall(b"LIST\r\n")
    status, _, start, end = c.multiline()
    if not status.startswith(b"+OK"):
        raise POP3Error(f"LIST: {status[:200]!r}")
    sizes = [-1] * count
    for line in bytes(c.buf[start:end]).split(b"\r\n")[: count + 1]:
        words = line.split()
        if len(words) >= 2 and words[0].isdigit() and words[1].isdigit():
            n = int(words[0])
            if 1 <= n <= count:
                sizes[n - 1] = int(words[1])
    return sizes


def retr_all(
    c: Client, count: int, window: int, sizes: list[int], digests: Counter[bytes] | None
) -> dict[str, object]:
    """RETR 1..count with C{window} commands outstanding; what was received and checked."""
    octets = 0
    ok = errs = wrong_size = 0
    problems: list[str] = []
    seen: Counter[bytes] = Counter()
    c.batch = max(1, window // 4)
    sent = 0
    while sent < min(window, count):
        sent += 1
        c.pending.append(b"RETR %d\r\n" % sent)
    c.flush()
    for n in range(1, count + 1):
        status, got, start, end = c.multiline()
        if sent < count:
            sent += 1
            c.queue(b"RETR %d\r\n" % sent)
        if got < 0:
            if not status.startswith(b"-ERR"):
                raise POP3Error(
                    f"RETR {n}: answer is neither +OK nor -ERR (framing lost): "
                    f"{status[:80].decode(errors='replace')!r}"
                    + (f"; before: {'; '.join(problems)}" if problems else "")
                )
            errs += 1
            if len(problems) < 5:
                problems.append(f"RETR {n}: {status[:120].decode(errors='replace')}")
            continue
        ok += 1
        octets += got
        if got != sizes[n - 1]:
            wrong_size += 1
            if len(problems) < 5:
                problems.append(f"RETR {n}: {got} octets, LIST said {sizes[n - 1]}")
        if digests is not None:
            seen[hashlib.sha1(c.unstuffed(start, end)).digest()] += 1
    c.flush()
    out: dict[str, object] = {
        "retrieved": ok,
        "octets": octets,
        "retr_errors": errs,
        "size_mismatches": wrong_size,
    }
    if digests is not None:
        out["content_mismatches"] = sum((seen - digests).values()) + sum((digests - seen).values())
        if out["content_mismatches"] and len(problems) < 5:
            problems.append(f"{out['content_mismatches']} messages differ from what was written")
    if problems:
        out["problems"] = problems
    return out


# ----------------------------------------------------------------------------- one run


def run_retr(args, host, port, mbx, roots, mode, run, warmup, name) -> dict:
    """One session of mode sequential, pipelined or big."""
    big = mode == "big"
    window = args.window if mode == "pipelined" else 1
    res: dict[str, object] = {
        "bench": "pop3-retr",
        "server": name,
        "mode": mode,
        "window": window,
        "run": run,
        "warmup": warmup,
    }
    expect = mbx.contents[0] if mbx.contents else None
    deadline = time.monotonic() + args.run_timeout
    interval = min(args.sample_interval, 0.005) if big else args.sample_interval
    meter = Meter(roots, args, interval)
    if not big:
        meter.start()
    session0 = cpu_mark(roots)
    c = None
    try:
        rate = args.big_read_rate * 1e6 if big else 0
        c = Client(host, port, args.io_timeout, deadline, RECV if rate else 0, rate)
        t0 = time.perf_counter()
        _, pass_s = login(c, args.user_for(mbx), args.password)
        count, total = stat(c)
        t_stat = time.perf_counter()
        res.update({"messages": count, "mailbox_octets": total, "login_s": round(pass_s, 4)})
        if count > args.max_messages:
            raise POP3Error(f"STAT says {count} messages, more than --max-messages")
        sizes = list_sizes(c, count)
        res["list_s"] = round(time.perf_counter() - t_stat, 4)
        if big:
            time.sleep(0.05)
            res["server_rss_before_retr_mb"] = round(tree_rss_kb(roots) / 1024, 1)
            meter.start()
        a = cpu_mark(roots)
        t1 = time.perf_counter()
        digests = mbx.digests if args.verify and mbx.contents else None
        got = retr_all(c, count, window, sizes, digests)
        t2 = time.perf_counter()
        b = cpu_mark(roots)
        if big:
            res.update(meter.stop())
            meter = None
        c.command("QUIT")
        t3 = time.perf_counter()
        dt = t2 - t1
        res.update(got)
        res.update(
            {
                "retr_s": round(dt, 4),
                "total_s": round(t3 - t0, 4),
                "msg_per_s": round(count / dt, 1) if count and dt > 0 else None,
                "mb_per_s": round(got["octets"] / 1e6 / dt, 2) if dt > 0 else None,
                "client_recvs": c.recvs,
            }
        )
        res.update(cpu_delta(a, b, "server"))
        res.update(client_cpu(a, b))
        res["server_cpu_s_per_1000_msgs"] = (
            round(res["server_cpu_s"] * 1000 / count, 3) if count else None
        )
        problems = list(got.pop("problems", []))
        if expect is not None and count != expect:
            problems.insert(0, f"STAT says {count} messages, {expect} were written")
        if got["retrieved"] != count:
            problems.append(f"retrieved {got['retrieved']}/{count}")
        if got["octets"] != total:
            problems.append(f"received {got['octets']} octets, STAT said {total}")
        if problems:
            res["error"] = "; ".join(problems)
    except (OSError, POP3Error, TimeoutError) as e:
        res["error"] = f"{type(e).__name__}: {e}"
    finally:
        end_session(res, c, roots, session0)
    if meter is not None and meter.sampler.is_alive():
        res.update(meter.stop())
    if big:
        res["big_read_rate_mb_per_s"] = args.big_read_rate or None
        if roots and "server_peak_rss_mb" in res and "server_rss_before_retr_mb" in res:
            growth = res["server_peak_rss_mb"] - res["server_rss_before_retr_mb"]
            res["server_rss_growth_mb"] = round(growth, 1)
            res["target_rss_growth_lt_5mb"] = growth < 5
    return no_server_figures(res, roots)


def run_stat(args, host, port, mbx, roots, run, warmup, name) -> dict:
    """One session of mode stat100k: USER, PASS, STAT, QUIT."""
    res: dict[str, object] = {
        "bench": "pop3-retr",
        "server": name,
        "mode": "stat100k",
        "run": run,
        "warmup": warmup,
    }
    expect = mbx.contents[0] if mbx.contents else None
    meter = Meter(roots, args, args.sample_interval).start()
    a = cpu_mark(roots)
    c = None
    try:
        c = Client(host, port, args.io_timeout, time.monotonic() + args.run_timeout)
        _, pass_s = login(c, args.user_for(mbx), args.password)
        t1 = time.perf_counter()
        count, total = stat(c)
        stat_s = time.perf_counter() - t1
        c.command("QUIT")
        res.update(
            {
                "messages": count,
                "mailbox_octets": total,
                "pass_s": round(pass_s, 4),
                "stat_s": round(stat_s, 4),
                "pass_stat_s": round(pass_s + stat_s, 4),
                "target_pass_stat_lt_0_5s": (pass_s + stat_s) < 0.5,
            }
        )
        if expect is not None and count != expect:
            res["error"] = f"STAT says {count} messages, {expect} were written"
    except (OSError, POP3Error, TimeoutError) as e:
        res["error"] = f"{type(e).__name__}: {e}"
    finally:
        if c is not None:
            c.close()
    time.sleep(0.05)
    b = cpu_mark(roots)
    res.update(cpu_delta(a, b, "server"))
    res.update(client_cpu(a, b))
    res.update(meter.stop())
    return no_server_figures(res, roots)


# ----------------------------------------------------------------------------- the benchmark


def contents_for(args: argparse.Namespace, mode: str) -> tuple[str, int, int]:
    """(mailbox kind, messages, octets each) that C{mode} needs."""
    if mode == "big":
        return "big", 1, args.big_size
    if mode == "stat100k":
        return "stat", args.stat_messages, args.stat_size
    return "retr", args.messages, args.size


def summarize(mode: str, name: str, results: list[dict]) -> dict:
    cold = "pass_stat_s" if mode == "stat100k" else "msg_per_s"
    s, med, top = summary_of_runs("pop3-retr", mode, name, results, cold)
    measured = [r for r in results if not r["warmup"]]
    if mode == "stat100k":
        s["median_pass_stat_s"] = med("pass_stat_s")
        s["median_stat_s"] = med("stat_s")
        s["all_pass_stat_s"] = [r.get("pass_stat_s") for r in measured]
        s["target_pass_stat_lt_0_5s"] = (
            s["median_pass_stat_s"] < 0.5 if s["median_pass_stat_s"] is not None else None
        )
    else:
        s["window"] = results[0]["window"] if results else None
        s["median_msg_per_s"] = med("msg_per_s")
        s["median_mb_per_s"] = med("mb_per_s")
        s["all_msg_per_s"] = [r.get("msg_per_s") for r in measured]
        s["median_server_cpu_s_per_1000_msgs"] = med("server_cpu_s_per_1000_msgs")
        s["median_server_session_cpu_s"] = med("server_session_cpu_s")
    if mode == "big":
        s["median_server_rss_before_retr_mb"] = med("server_rss_before_retr_mb")
        s["max_server_rss_growth_mb"] = top("server_rss_growth_mb")
        s["big_read_rate_mb_per_s"] = results[0].get("big_read_rate_mb_per_s") if results else None
        g = s["max_server_rss_growth_mb"]
        s["target_rss_growth_lt_5mb"] = g < 5 if g is not None else None
    return s


def tables(summaries: list[dict]) -> str:
    out = []
    retr = [s for s in summaries if s["mode"] in ("sequential", "pipelined")]
    if retr:
        out += DOWNLOAD_TABLE_HEAD
        for s in retr:
            mode = "sequential" if s["mode"] == "sequential" else f"pipelined ({s['window']})"
            out.append(download_row(s, mode))
    for s in summaries:
        if s["mode"] == "big":
            rate = s["big_read_rate_mb_per_s"]
            out += [
                "",
                "| server | RETR of one message | client reads at | RSS before MB | "
                "peak RSS MB | **RSS growth MB** (target < 5) | MB/s | server CPU s | ok runs |",
                "|" + "---|" * 9,
                f"| {s['server']} | {s.get('size_mib', '?')} MiB | "
                f"{fmt(rate, '{:g} MB/s') if rate else 'full speed'} | "
                f"{fmt(s['median_server_rss_before_retr_mb'], '{:.1f}')} | "
                f"{fmt(s['max_server_peak_rss_mb'], '{:.1f}')} | "
                f"**{fmt(s['max_server_rss_growth_mb'], '{:.1f}')}** | "
                f"{fmt(s['median_mb_per_s'], '{:.1f}')} | "
                f"{fmt(s['median_server_cpu_s'], '{:.2f}')} | {s['ok_runs']}/{s['runs']} |",
            ]
        if s["mode"] == "stat100k":
            out += [
                "",
                "| server | messages | cold PASS+STAT s | **PASS+STAT s** (target < 0.5) | "
                "each run | STAT alone s | server CPU s | peak RSS MB | peak PSS MB | ok runs |",
                "|" + "---|" * 10,
                f"| {s['server']} | {fmt(s['messages'])} | "
                f"{', '.join(fmt(x, '{:.3f}') for x in s['cold']) or '—'} | "
                f"**{fmt(s['median_pass_stat_s'], '{:.3f}')}** | "
                f"{', '.join(fmt(x, '{:.3f}') for x in s['all_pass_stat_s'])} | "
                f"{fmt(s['median_stat_s'], '{:.4f}')} | "
                f"{fmt(s['median_server_cpu_s'], '{:.2f}')} | "
                f"{fmt(s['max_server_peak_rss_mb'], '{:.1f}')} | "
                f"{fmt(s['max_server_peak_pss_mb'], '{:.1f}')} | {s['ok_runs']}/{s['runs']} |",
            ]
    return "\n".join(out)


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = new_parser(__doc__)
    ap.add_argument(
        "--modes",
        default="sequential,pipelined",
        help="comma separated, run in the order given: "
        + ", ".join(MODES)
        + " (sequential,pipelined)",
    )
    ap.add_argument("-n", "--messages", type=int, default=2000, help="mailbox size (2000)")
    ap.add_argument("--size", type=int, default=5120, help="octets per message (5120)")
    ap.add_argument("--window", type=int, default=50, help="pipelined: RETRs outstanding (50)")
    ap.add_argument("--big-size", type=int, default=20 * MIB, help="big: octets (20 MiB)")
    ap.add_argument(
        "--big-read-rate",
        type=float,
        default=10,
        help="big: client reads at most this many MB/s, 0 = as fast as it can (10)",
    )
    ap.add_argument(
        "--stat-messages", type=int, default=100_000, help="stat100k: messages (100000)"
    )
    ap.add_argument("--stat-size", type=int, default=5120, help="stat100k: octets (5120)")
    add_download_args(ap, "refuse a bigger STAT (1000000)")
    args = ap.parse_args(argv)
    args.modes = parse_modes(ap, args.modes, MODES)
    check_download_args(ap, args)
    if min(args.messages, args.size, args.window, args.big_size, args.stat_messages) < 1:
        ap.error("sizes, counts and --window must be positive")
    if max(args.messages, args.stat_messages) > args.max_messages:
        ap.error("more messages than --max-messages")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    exit_on_signals()
    out = Output(args.results)
    server: OwnServer | None = None
    summaries: list[dict] = []
    mailboxes: dict[str, Mailbox] = {}
    try:
        kinds = {contents_for(args, m)[0]: contents_for(args, m) for m in args.modes}
        if args.target:
            host, port = parse_target(args.target)
            shared = Mailbox(args.user, expand_maildir(args.maildir or "", args.user))
            mailboxes = {k: shared for k in kinds}
            roots = parse_pids(args.pid)
            name = args.name or f"{host}:{port}"
            args.user_for = lambda mbx: args.user
            if not wait_greeting(host, port, None, 10, "pop3"):
                sys.exit(f"no POP3 server answers on {host}:{port}")
        else:
            args.password = PASSWORD
            args.user_for = lambda mbx: mbx.account
            listener = ("pop3", args.port or free_port(), "none", True)
            server = OwnServer(args, "pop3-retr.", [listener])
            server.write_config()
            accounts = [f"bench-{k}@{DOMAIN}" for k in kinds]
            how = server.add_users(accounts)
            print(f"# accounts {', '.join(accounts)} added with {how}", file=sys.stderr)
            for k, a in zip(kinds, accounts, strict=True):
                mailboxes[k] = Mailbox(a, server.maildir(a))
            for k, (_, count, size) in kinds.items():  # before the server starts: cold
                mailboxes[k].fill_and_say(count, size, args.verify)
            server.start()
            host, port = "127.0.0.1", server.port
            roots = [server.pid]
            name = args.name or "mailserver"
        some = next(iter(mailboxes.values())).path
        out.emit(
            {
                "bench": "pop3-retr",
                "header": True,
                "server": name,
                "target": f"{host}:{port}",
                "server_pids": roots,
                "maildir_fs": existing_filesystem_of(some),
                "modes": args.modes,
                "messages": args.messages,
                "size": args.size,
                "window": args.window,
                "big_size": args.big_size,
                "big_read_rate_mb_per_s": args.big_read_rate,
                "stat_messages": args.stat_messages,
                "runs": args.runs,
                "warmup": args.warmup,
                "verify": args.verify,
                "client": "raw socket (TCP_NODELAY, 256 KiB reads)",
                **machine(),
            }
        )
        for mode in args.modes:
            kind, count, size = contents_for(args, mode)
            mbx = mailboxes[kind]
            if args.fill and mbx.contents != (count, size):
                mbx.fill_and_say(count, size, args.verify)

            def one(run: int, warm: bool, mode: str = mode, mbx: Mailbox = mbx) -> dict:
                if mode == "stat100k":
                    return run_stat(args, host, port, mbx, roots, run, warm, name)
                return run_retr(args, host, port, mbx, roots, mode, run, warm, name)

            results = run_mode(args, out, server, one)
            s = summarize(mode, name, results)
            if mode == "big":
                s["size_mib"] = round(args.big_size / MIB, 1)
            out.emit(s)
            summaries.append(s)
    finally:
        if server is not None:
            server.stop()
        elif args.fill and not args.keep_mailbox:
            for mbx in {id(m): m for m in mailboxes.values()}.values():
                if mbx.contents is not None:
                    mbx.clear()
    if summaries:
        print("\n" + tables(summaries), flush=True)
    return 0 if all(s["ok_runs"] == s["runs"] for s in summaries) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
