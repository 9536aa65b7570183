#!/usr/bin/python3
"""Hit rate vs KV capacity from `larder replay --json` reports.

    plot_hitrate.py -o hitrate.png "DRAM only:1G=r-dram-1g.json" "DRAM+SSD:1G=r-ssd-1g.json" ...

Each argument is TIER:CAPACITY=REPORT: TIER names a series (one line per distinct tier,
e.g. "DRAM only" and "DRAM+SSD"), CAPACITY its size on the x axis (512M, 2G, 64G: binary
units; a plain number is taken as bytes), REPORT a file holding the `--json` output of one
replay. The y axis is the measured prefix hit rate (hit_rate); a horizontal dashed line marks
the offline unbounded-cache hit rate of the same requests (unbounded_hit_rate: all reports
should agree on it, a warning is printed otherwise). Reports with failed requests are
plotted but flagged on stderr. The title names the trace scale, the limit and the model.

Uses matplotlib (Debian: apt-get install python3-matplotlib) when available, else a small
built-in PNG writer (zlib only) with the same content. --table also prints the points.
"""
import argparse
import json
import math
import os
import re
import struct
import sys
import zlib

UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MB": 1 << 20, "MIB": 1 << 20,
         "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30, "T": 1 << 40, "TB": 1 << 40, "TIB": 1 << 40}


def parse_size(s):
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", s)
    if not m or m.group(2).upper() not in UNITS:
        raise ValueError(f"bad capacity {s!r} (want e.g. 512M, 2G)")
    return float(m.group(1)) * UNITS[m.group(2).upper()]


def parse_arg(a):
    m = re.fullmatch(r"(.+):([^:=]+)=(.+)", a)
    if not m:
        raise ValueError(f"bad argument {a!r}: want TIER:CAPACITY=REPORT.json")
    tier, cap, path = m.group(1).strip(), m.group(2).strip(), m.group(3)
    with open(path) as f:
        text = f.read().strip()
    # The report: the whole file, or else its last line that is a JSON object (a saved log).
    try:
        rep = json.loads(text)
    except ValueError:
        lines = [l for l in text.splitlines() if l.startswith("{")]
        if not lines:
            raise ValueError(f"{path}: no JSON report in it")
        rep = json.loads(lines[-1])
    for k in ("hit_rate", "unbounded_hit_rate"):
        if rep.get(k) is None:
            raise ValueError(f"{path}: no {k} (is it a `larder replay --json` report?)")
    return tier, cap, parse_size(cap), rep, path


def human(b):
    for u, n in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if b >= n:
            v = b / n
            return f"{v:.0f}{u}" if abs(v - round(v)) < 1e-9 else f"{v:.1f}{u}"
    return f"{b:.0f}"


def collect(args):
    series, unb, meta = {}, [], None
    for a in args:
        tier, cap, size, rep, path = parse_arg(a)
        if rep.get("failed"):
            print(f"plot_hitrate: warning: {path}: {rep['failed']} failed requests ({rep.get('first_error')})",
                  file=sys.stderr)
        series.setdefault(tier, []).append((size, rep["hit_rate"], cap))
        unb.append(rep["unbounded_hit_rate"])
        m = (rep.get("scale"), rep.get("limit"), rep.get("model"), rep.get("speed"))
        if meta is None:
            meta = m
        elif m != meta:
            print(f"plot_hitrate: warning: {path}: scale/limit/model/speed {m} differ from {meta}", file=sys.stderr)
    if max(unb) - min(unb) > 1e-9:
        print(f"plot_hitrate: warning: the reports' unbounded hit rates differ ({min(unb):.4f}..{max(unb):.4f}): "
              "not the same requests? The line shows the largest.", file=sys.stderr)
    for pts in series.values():
        pts.sort()
    scale, limit, model, speed = meta
    title = (f"Prefix hit rate vs KV capacity: trace scaled 1/{scale}"
             f"{', first %d requests' % limit if limit else ''}, speed {speed:g}x, model {model}")
    return series, max(unb), title


def plot_matplotlib(series, unbounded, title, out, xlabel):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for tier, pts in series.items():
        ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=tier)
    ax.axhline(100 * unbounded, color="gray", linestyle="--", label=f"unbounded cache ({100 * unbounded:.1f}%)")
    caps = sorted({p[0] for pts in series.values() for p in pts})
    if len(caps) > 1 and caps[-1] / max(caps[0], 1) >= 8:
        ax.set_xscale("log", base=2)
    ax.set_xticks(caps)
    ax.set_xticklabels([human(c) for c in caps])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("prefix hit rate (% of prompt tokens)")
    ax.set_ylim(0, max(5, 100 * unbounded * 1.15, *[100 * p[1] * 1.1 for pts in series.values() for p in pts]))
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)


# --- fallback: a tiny raster plot, 5x7 font, PNG via zlib --------------------------------------

FONT = {  # 5x7 glyphs, rows top to bottom, '#' = ink
    "0": "01110 10001 10011 10101 11001 10001 01110", "1": "00100 01100 00100 00100 00100 00100 01110",
    "2": "01110 10001 00001 00010 00100 01000 11111", "3": "11110 00001 00001 01110 00001 00001 11110",
    "4": "00010 00110 01010 10010 11111 00010 00010", "5": "11111 10000 11110 00001 00001 10001 01110",
    "6": "00110 01000 10000 11110 10001 10001 01110", "7": "11111 00001 00010 00100 01000 01000 01000",
    "8": "01110 10001 10001 01110 10001 10001 01110", "9": "01110 10001 10001 01111 00001 00010 01100",
    "A": "01110 10001 10001 11111 10001 10001 10001", "B": "11110 10001 10001 11110 10001 10001 11110",
    "C": "01110 10001 10000 10000 10000 10001 01110", "D": "11100 10010 10001 10001 10001 10010 11100",
    "E": "11111 10000 10000 11110 10000 10000 11111", "F": "11111 10000 10000 11110 10000 10000 10000",
    "G": "01110 10001 10000 10111 10001 10001 01111", "H": "10001 10001 10001 11111 10001 10001 10001",
    "I": "01110 00100 00100 00100 00100 00100 01110", "J": "00111 00010 00010 00010 00010 10010 01100",
    "K": "10001 10010 10100 11000 10100 10010 10001", "L": "10000 10000 10000 10000 10000 10000 11111",
    "M": "10001 11011 10101 10101 10001 10001 10001", "N": "10001 10001 11001 10101 10011 10001 10001",
    "O": "01110 10001 10001 10001 10001 10001 01110", "P": "11110 10001 10001 11110 10000 10000 10000",
    "Q": "01110 10001 10001 10001 10101 10010 01101", "R": "11110 10001 10001 11110 10100 10010 10001",
    "S": "01111 10000 10000 01110 00001 00001 11110", "T": "11111 00100 00100 00100 00100 00100 00100",
    "U": "10001 10001 10001 10001 10001 10001 01110", "V": "10001 10001 10001 10001 10001 01010 00100",
    "W": "10001 10001 10001 10101 10101 10101 01010", "X": "10001 10001 01010 00100 01010 10001 10001",
    "Y": "10001 10001 01010 00100 00100 00100 00100", "Z": "11111 00001 00010 00100 01000 10000 11111",
    " ": "00000 00000 00000 00000 00000 00000 00000", ".": "00000 00000 00000 00000 00000 01100 01100",
    ",": "00000 00000 00000 00000 01100 00100 01000", ":": "00000 01100 01100 00000 01100 01100 00000",
    "%": "11000 11001 00010 00100 01000 10011 00011", "+": "00000 00100 00100 11111 00100 00100 00000",
    "-": "00000 00000 00000 11111 00000 00000 00000", "/": "00001 00001 00010 00100 01000 10000 10000",
    "(": "00010 00100 01000 01000 01000 00100 00010", ")": "01000 00100 00010 00010 00010 00100 01000",
    ";": "00000 01100 01100 00000 01100 00100 01000", "=": "00000 00000 11111 00000 11111 00000 00000",
}
COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]


class Canvas:
    def __init__(self, w, h):
        self.w, self.h = w, h
        self.px = bytearray(b"\xff" * (w * h * 3))

    def dot(self, x, y, c):
        if 0 <= x < self.w and 0 <= y < self.h:
            i = (y * self.w + x) * 3
            self.px[i:i + 3] = bytes(c)

    def line(self, x0, y0, x1, y1, c, width=1, dash=0):
        n = max(abs(x1 - x0), abs(y1 - y0), 1)
        for k in range(n + 1):
            if dash and (k // dash) % 2:
                continue
            x, y = round(x0 + (x1 - x0) * k / n), round(y0 + (y1 - y0) * k / n)
            for dx in range(-(width // 2), width - width // 2):
                for dy in range(-(width // 2), width - width // 2):
                    self.dot(x + dx, y + dy, c)

    def box(self, x, y, r, c):
        for dx in range(-r, r + 1):
            for dy in range(-r, r + 1):
                self.dot(x + dx, y + dy, c)

    def text(self, x, y, s, c=(0, 0, 0), scale=1, anchor="left"):
        s = s.upper()
        w = len(s) * 6 * scale
        if anchor == "center":
            x -= w // 2
        elif anchor == "right":
            x -= w
        for ch in s:
            rows = FONT.get(ch, FONT[" "]).split()
            for ry, row in enumerate(rows):
                for rx, bit in enumerate(row):
                    if bit == "1":
                        for sx in range(scale):
                            for sy in range(scale):
                                self.dot(x + rx * scale + sx, y + ry * scale + sy, c)
            x += 6 * scale

    def png(self, path):
        raw = b"".join(b"\x00" + bytes(self.px[y * self.w * 3:(y + 1) * self.w * 3]) for y in range(self.h))

        def chunk(t, d):
            return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

        with open(path, "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", self.w, self.h, 8, 2, 0, 0, 0)) +
                    chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def plot_fallback(series, unbounded, title, out, xlabel):
    W, H, L, R, T, B = 960, 600, 80, 30, 50, 70
    cv = Canvas(W, H)
    caps = sorted({p[0] for pts in series.values() for p in pts})
    logx = len(caps) > 1 and caps[-1] / max(caps[0], 1) >= 8
    fx = (lambda v: math.log2(v)) if logx else (lambda v: v)
    x0, x1 = fx(caps[0]), fx(caps[-1])
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    pad = (x1 - x0) * 0.05
    x0, x1 = x0 - pad, x1 + pad
    ymax = max(5, 100 * unbounded * 1.15, *[100 * p[1] * 1.1 for pts in series.values() for p in pts])
    X = lambda v: round(L + (fx(v) - x0) / (x1 - x0) * (W - L - R))
    Y = lambda pct: round(H - B - pct / ymax * (H - T - B))
    step = [s for s in (1, 2, 5, 10, 20, 25, 50) if ymax / s <= 10][0]
    for k in range(0, int(ymax) + 1, step):
        cv.line(L, Y(k), W - R, Y(k), (230, 230, 230))
        cv.text(L - 6, Y(k) - 3, f"{k}%", anchor="right")
    cv.line(L, T, L, H - B, (0, 0, 0))
    cv.line(L, H - B, W - R, H - B, (0, 0, 0))
    for c in caps:
        cv.line(X(c), H - B, X(c), H - B + 5, (0, 0, 0))
        cv.text(X(c), H - B + 10, human(c), anchor="center")
    cv.text((L + W - R) // 2, H - 25, xlabel, anchor="center")
    cv.text(W // 2, 15, title[:150], anchor="center")
    cv.line(L, Y(100 * unbounded), W - R, Y(100 * unbounded), (120, 120, 120), dash=8)
    legend = [(f"unbounded cache {100 * unbounded:.1f}%", (120, 120, 120))]
    for i, (tier, pts) in enumerate(series.items()):
        c = COLORS[i % len(COLORS)]
        for a, b in zip(pts, pts[1:]):
            cv.line(X(a[0]), Y(100 * a[1]), X(b[0]), Y(100 * b[1]), c, width=2)
        for p in pts:
            cv.box(X(p[0]), Y(100 * p[1]), 3, c)
        legend.append((tier, c))
    for i, (name, c) in enumerate(legend):
        y = T + 10 + 14 * i
        cv.line(L + 15, y + 3, L + 35, y + 3, c, width=2)
        cv.text(L + 42, y, name)
    cv.png(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("points", nargs="+", help="TIER:CAPACITY=REPORT.json")
    ap.add_argument("-o", "--output", default="hitrate.png")
    ap.add_argument("--table", action="store_true", help="also print the points as a Markdown table")
    ap.add_argument("--xlabel", default="KV capacity", help="x axis label (what CAPACITY is)")
    ap.add_argument("--title", help="figure title (default: from the reports)")
    ap.add_argument("--no-matplotlib", action="store_true", help="use the built-in PNG writer")
    a = ap.parse_args()
    try:
        series, unbounded, title = collect(a.points)
        title = a.title or title
    except (OSError, ValueError) as e:
        print(f"plot_hitrate: error: {e}", file=sys.stderr)
        return 1
    used = "built-in writer"
    if not a.no_matplotlib:
        try:
            plot_matplotlib(series, unbounded, title, a.output, a.xlabel)
            used = "matplotlib"
        except ImportError:
            print("plot_hitrate: matplotlib missing (apt-get install python3-matplotlib); using the built-in writer",
                  file=sys.stderr)
    if used != "matplotlib":
        plot_fallback(series, unbounded, title, a.output, a.xlabel)
    if a.table:
        print("| tier | capacity | hit rate |\n|---|---|---|")
        for tier, pts in series.items():
            for size, hr, cap in pts:
                print(f"| {tier} | {cap} | {100 * hr:.1f}% |")
        print(f"| unbounded | - | {100 * unbounded:.1f}% |")
    print(f"plot_hitrate: wrote {a.output} ({used})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
