#!/usr/bin/env python3
"""Plots larder-bench-ssd's JSON lines: read bandwidth (MB/s) vs read size, one line per thread count.

  build/bin/larder-bench-ssd FILE > ssd.jsonl && bench/ssd_plot.py ssd.jsonl docs/ssd_read.svg
"""

import json
import math
import sys


def main():
    rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
    out = sys.argv[2]
    sizes = sorted({r["size"] for r in rows})
    threads = sorted({r["threads"] for r in rows})
    top = max(r["mb_s"] for r in rows)
    W, H, L, R, T, B = 640, 400, 70, 150, 30, 60
    x = lambda s: L + (math.log2(s) - math.log2(sizes[0])) / max(1e-9, math.log2(sizes[-1]) - math.log2(sizes[0])) * (W - L - R)
    ymax = math.ceil(top / 500) * 500
    y = lambda v: H - B - v / ymax * (H - T - B)
    colors = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666666"]
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{W / 2 - 60}" y="18" font-size="14">Random O_DIRECT reads on this VM\'s disk</text>']
    for v in range(0, ymax + 1, 500):
        svg.append(f'<line x1="{L}" x2="{W - R}" y1="{y(v)}" y2="{y(v)}" stroke="#ddd"/>')
        svg.append(f'<text x="{L - 8}" y="{y(v) + 4}" text-anchor="end">{v}</text>')
    for s in sizes:
        label = f"{s // 1024} KiB" if s >= 1024 else f"{s} B"
        svg.append(f'<text x="{x(s)}" y="{H - B + 18}" text-anchor="middle">{label}</text>')
    svg.append(f'<text x="{(L + W - R) / 2}" y="{H - 15}" text-anchor="middle">read size</text>')
    svg.append(f'<text x="18" y="{(T + H - B) / 2}" transform="rotate(-90 18 {(T + H - B) / 2})" text-anchor="middle">MB/s</text>')
    for i, t in enumerate(threads):
        pts = sorted((r["size"], r["mb_s"]) for r in rows if r["threads"] == t)
        c = colors[i % len(colors)]
        svg.append('<polyline fill="none" stroke="%s" stroke-width="2" points="%s"/>' % (c, " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in pts)))
        svg.append(f'<text x="{W - R + 10}" y="{T + 20 + 18 * i}" fill="{c}">{t} thread{"s" if t > 1 else ""}</text>')
    svg.append("</svg>")
    open(out, "w").write("\n".join(svg) + "\n")


if __name__ == "__main__":
    main()
