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
import os
import sys
import time
from collections import Counter
from collections.abc import Callable

from _common import (
    DOMAIN,
    DOWNLOAD_TABLE_HEAD,
    PASSWORD,
    Mailbox,
    Meter,
    Output,
    OwnServer,
    ProtocolError,
    RawClient,
    add_compare_arg,
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
    free_port,
    load_compare,
    machine,
    new_parser,
    no_server_figures,
    parse_modes,
    parse_pids,
    parse_target,
    quoted,
    run_mode,
    summary_of_runs,
    wait_greeting,
)

MODES = ("bulk", "each")
MAX_LINE = 1024 * 1024  # response text (without literals) longer than this: framing lost

# ----------------------------------------------------------------------------- client


class IMAPError(ProtocolError):
    """The server answered NO/BAD, or something that is not IMAP."""


class Client(RawClient):
    """
    A raw IMAP client on a blocking socket. L{response} reads one whole response (its text
    lines and the {n} literals between them) out of one buffer, without copying the literals.
    """

    def __init__(self, host: str, port: int, io_timeout: float, deadline: float) -> None:
        super().__init__(host, port, io_timeout, deadline)
        self.tags = 0

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


def fetch_answers(c: Client, tag: bytes, what: str, check: FetchCheck) -> None:
    """The untagged FETCH responses up to the tagged OK of C{tag} (the command C{what})."""
    while True:
        text, lits = c.response()
        if text.startswith(tag + b" "):
            if not text[len(tag) + 1 :].startswith(b"OK"):
                raise IMAPError(f"{what}: {text[:200].decode(errors='replace')}")
            return
        check.add(c, text, lits)


def fetch_bulk(c: Client, count: int, check: FetchCheck) -> None:
    fetch_answers(c, c.send("FETCH 1:* (BODY.PEEK[])"), "FETCH", check)


def fetch_each(c: Client, count: int, check: FetchCheck) -> None:
    for n in range(1, count + 1):
        fetch_answers(c, c.send(f"FETCH {n} (BODY.PEEK[])"), f"FETCH {n}", check)


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
        end_session(res, c, roots, session0)
    res.update(meter.stop())
    return no_server_figures(res, roots)


# ----------------------------------------------------------------------------- the benchmark


def summarize(mode: str, name: str, results: list[dict]) -> dict:
    s, med, _ = summary_of_runs("imap-fetch", mode, name, results)
    measured = [r for r in results if not r["warmup"]]
    s.update(
        {
            "median_msg_per_s": med("msg_per_s"),
            "median_mb_per_s": med("mb_per_s"),
            "all_msg_per_s": [r.get("msg_per_s") for r in measured],
            "median_server_cpu_s_per_1000_msgs": med("server_cpu_s_per_1000_msgs"),
            "median_server_main_thread_cpu_s": med("server_main_thread_cpu_s"),
            "median_server_session_cpu_s": med("server_session_cpu_s"),
        }
    )
    return s


def tables(summaries: list[dict], others: list[dict]) -> str:
    out = list(DOWNLOAD_TABLE_HEAD)
    for s in others + summaries:
        out.append(download_row(s, s["mode"]))
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
    ap = new_parser(__doc__)
    ap.add_argument(
        "--modes",
        default="bulk,each",
        help="comma separated, run in the order given: " + ", ".join(MODES) + " (bulk,each)",
    )
    ap.add_argument("-n", "--messages", type=int, default=2000, help="mailbox size (2000)")
    ap.add_argument("--size", type=int, default=5120, help="octets per message (5120)")
    add_download_args(ap, "refuse a bigger EXISTS (1000000)")
    add_compare_arg(ap, "summaries")
    args = ap.parse_args(argv)
    args.modes = parse_modes(ap, args.modes, MODES)
    check_download_args(ap, args)
    if min(args.messages, args.size) < 1 or args.messages > args.max_messages:
        ap.error("--messages and --size must be positive, --messages <= --max-messages")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    exit_on_signals()
    out = Output(args.results)
    others = load_compare(args.compare, "imap-fetch")
    server: OwnServer | None = None
    mbx: Mailbox | None = None
    summaries: list[dict] = []
    user_for: Callable[[Mailbox], str]
    try:
        if args.target:
            host, port = parse_target(args.target)
            mbx = Mailbox(args.user, expand_maildir(args.maildir or "", args.user))
            roots = parse_pids(args.pid)
            name = args.name or f"{host}:{port}"
            if not wait_greeting(host, port, None, 10, "imap"):
                sys.exit(f"no IMAP server answers on {host}:{port}")
            if args.fill:
                mbx.fill_and_say(args.messages, args.size, args.verify)
        else:
            args.password = PASSWORD
            listener = ("imap", args.port or free_port(), "none", True)
            server = OwnServer(args, "imap-fetch.", [listener])
            server.write_config()
            account = f"bench-fetch@{DOMAIN}"
            how = server.add_users([account])
            print(f"# account {account} added with {how}", file=sys.stderr)
            mbx = Mailbox(account, server.maildir(account))
            mbx.fill_and_say(args.messages, args.size, args.verify)  # before the start: cold
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
                "maildir_fs": existing_filesystem_of(mbx.path),
                "modes": args.modes,
                "messages": args.messages,
                "size": args.size,
                "filled": args.fill,
                "runs": args.runs,
                "warmup": args.warmup,
                "verify": args.verify,
                "client": "raw socket (TCP_NODELAY, 256 KiB reads)",
                "loadavg": os.getloadavg(),
                **machine(),
            }
        )
        for mode in args.modes:

            def one(run: int, warm: bool, mode: str = mode) -> dict:
                return run_fetch(args, host, port, mbx, roots, mode, run, warm, name)

            results = run_mode(args, out, server, one)
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
