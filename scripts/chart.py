#!/usr/bin/env python3
"""Draws target/bench/peers.json (from `cargo xtask bench peers`) as a PNG.

Usage: chart.py PEERS_JSON OUT_PNG
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ORDER = [
    "direct",
    "direct-no-offload",
    "masquerade",
    "openvpn-udp",
    "openvpn-tcp",
    "boringtun",
    "boringtun-threads1",
    "veil",
    "veil-ws",
]
PANELS = [
    ("TCP throughput (Gbit/s, log scale)", True,
     [("tcp1_up", "1 stream up"), ("tcp1_down", "1 stream down"),
      ("tcp4_up", "4 streams up"), ("tcp4_down", "4 streams down")]),
    ("Round-trip time (µs, log scale)", True,
     [("rtt_idle_mean", "idle mean"), ("rtt_idle_p99", "idle p99"),
      ("rtt_load_mean", "loaded mean"), ("rtt_load_p99", "loaded p99")]),
    ("UDP delivered (thousand packets/s)", False,
     [("udp64_pps", "64 B"), ("udp1200_pps", "1200 B")]),
]


def main():
    data = json.load(open(sys.argv[1]))
    paths = [p for p in ORDER if p in data]
    fig, axes = plt.subplots(len(PANELS), 1, figsize=(12, 4 * len(PANELS)))
    for ax, (title, log, figures) in zip(axes, PANELS):
        width = 0.8 / len(figures)
        for i, (key, label) in enumerate(figures):
            values = [data[p].get(key, {}).get("median", 0) or 0 for p in paths]
            xs = [x + i * width for x in range(len(paths))]
            ax.bar(xs, [max(v, 1e-3) for v in values], width, label=label)
        ax.set_title(title)
        ax.set_xticks([x + width * (len(figures) - 1) / 2 for x in range(len(paths))])
        ax.set_xticklabels(paths, rotation=15)
        if log:
            ax.set_yscale("log")
        ax.legend(fontsize="small")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("veil beside the tunnels users would pick instead (median of runs)")
    fig.tight_layout()
    fig.savefig(sys.argv[2], dpi=90)


if __name__ == "__main__":
    main()
