#!/usr/bin/env python3
"""
Summarise a profile of the server taken under load (see `smtp_accept.py --profile`).

    bench/profile_summary.py prof.out --messages 4000            # cProfile (pstats) file
    bench/profile_summary.py pyspy.txt --messages 4000 --rate 200  # py-spy `--format raw`

Prints the top --top (25) functions by cumulative time and by self time. With --messages (how
many messages the server took in while it was profiled) each row also gets the cost per message,
in microseconds.

cProfile: exact call counts, but its own overhead inflates functions that are called often
(roughly 1 µs per call), so take "per call" figures of tiny functions as upper bounds.
py-spy: samples (--rate per second) of the stacks of all threads that were running, no
overhead in the server; "self" = samples where the function was the innermost frame, "cum" =
samples where it was anywhere on the stack (counted once per stack). Stdlib only.
"""

from __future__ import annotations

import argparse
import io
import pstats
import sys
from collections import Counter


def short(path: str, keep: int = 3) -> str:
    parts = path.replace("\\", "/").split("/")
    for marker in ("site-packages", "lib"):
        if marker in parts:
            i = len(parts) - 1 - parts[::-1].index(marker)
            if i + 1 < len(parts):
                return "/".join(parts[i + 1 :])
    return "/".join(parts[-keep:])


def cprofile_report(path: str, top: int, messages: int | None) -> None:
    st = pstats.Stats(path, stream=io.StringIO())
    rows = []
    total = st.total_tt  # type: ignore[attr-defined]
    for (file, line, func), (cc, nc, tt, ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
        rows.append((f"{short(file)}:{line}({func})", nc, cc, tt, ct))
    print(f"cProfile {path}: total {total:.3f} s of profiled CPU time, {len(rows)} functions")
    if messages:
        print(
            f"messages: {messages}  => {total / messages * 1e6:.0f} µs per message "
            "(profiled, with cProfile overhead)"
        )
    for title, idx in (("cumulative", 4), ("self (tottime)", 3)):
        print(f"\n## top {top} by {title}\n")
        hdr = "| # | function | calls | self s | cum s | self µs/call | cum µs/call |"
        if messages:
            hdr += " calls/msg | self µs/msg | cum µs/msg |"
        print(hdr)
        print("|" + "---|" * (hdr.count("|") - 1))
        for i, (name, nc, cc, tt, ct) in enumerate(
            sorted(rows, key=lambda r: r[idx], reverse=True)[:top], 1
        ):
            calls = f"{nc}" if nc == cc else f"{nc}/{cc}"
            line = (
                f"| {i} | `{name}` | {calls} | {tt:.3f} | {ct:.3f} | "
                f"{tt / nc * 1e6:.1f} | {ct / nc * 1e6:.1f} |"
            )
            if messages:
                line += (
                    f" {nc / messages:.2f} | {tt / messages * 1e6:.1f} | "
                    f"{ct / messages * 1e6:.1f} |"
                )
            print(line)


def pyspy_report(path: str, top: int, messages: int | None, rate: float) -> None:
    self_c: Counter[str] = Counter()
    cum_c: Counter[str] = Counter()
    total = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for n_line, line in enumerate(f):
            if n_line > 10_000_000:
                break
            line = line.rstrip("\n")
            stack, _, count_s = line.rpartition(" ")
            if not stack or not count_s.isdigit():
                continue
            count = int(count_s)
            frames = [fr for fr in stack.split(";") if fr]
            if not frames:
                continue
            total += count
            self_c[frames[-1]] += count
            for fr in set(frames):
                cum_c[fr] += count
    secs = total / rate
    print(f"py-spy {path}: {total} samples at {rate:g}/s = {secs:.2f} s of active thread time")
    if messages:
        per_msg = secs / messages * 1e6
        print(f"messages: {messages}  => {per_msg:.0f} µs of sampled thread time per message")
    for title, counter in (("cumulative", cum_c), ("self", self_c)):
        print(f"\n## top {top} by {title}\n")
        hdr = "| # | function (file:line) | samples | % of samples | s |"
        if messages:
            hdr += " µs/msg |"
        print(hdr)
        print("|" + "---|" * (hdr.count("|") - 1))
        for i, (fr, c) in enumerate(counter.most_common(top), 1):
            line = f"| {i} | `{fr}` | {c} | {100 * c / total:.1f} | {c / rate:.3f} |"
            if messages:
                line += f" {c / rate / messages * 1e6:.1f} |"
            print(line)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("profile", help="a cProfile output file or a py-spy --format raw file")
    ap.add_argument("--messages", type=int, help="messages taken in while profiled")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--rate", type=float, default=200, help="py-spy sampling rate (200)")
    args = ap.parse_args(argv)
    try:
        pstats.Stats(args.profile, stream=io.StringIO())
        is_cprofile = True
    except Exception:  # not a marshalled pstats file: a py-spy raw (collapsed stacks) file
        is_cprofile = False
    if is_cprofile:
        cprofile_report(args.profile, args.top, args.messages)
    else:
        pyspy_report(args.profile, args.top, args.messages, args.rate)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
