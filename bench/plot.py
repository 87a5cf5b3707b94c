#!/usr/bin/env python3
"""Draws bench/results/latest.png from bench/results/latest.json (written by bench/run.sh).

Usage: python3 bench/plot.py [results.json] [out.png]
Left: max throughput (wrk) of each target. Right: latency each proxy adds over the upstream
reached directly, at the same fixed request rate (oha), p50 and p99.
"""

import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

here = os.path.dirname(os.path.abspath(__file__))
src = sys.argv[1] if len(sys.argv) > 1 else os.path.join(here, "results", "latest.json")
out = sys.argv[2] if len(sys.argv) > 2 else os.path.join(here, "results", "latest.png")
res = json.load(open(src))
targets, meta = res["targets"], res["meta"]

COLORS = {"direct": "#9e9e9e", "sidecar": "#1f77b4", "nginx": "#2ca02c", "haproxy": "#d62728"}
order = ["direct", "sidecar", "nginx", "haproxy"]
proxies = ["sidecar", "nginx", "haproxy"]

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))

rps = [targets[t]["wrk"]["rps"] for t in order]
bars = ax1.bar([targets[t]["label"] for t in order], rps, color=[COLORS[t] for t in order])
ax1.bar_label(bars, labels=[f"{v:,.0f}" for v in rps], padding=2, fontsize=9)
ax1.set_title(f"Max throughput (wrk -c{meta['load']['wrk'].split('-c')[1].split()[0]}), req/s — higher is better")
ax1.set_ylabel("requests / second")
ax1.set_ylim(0, max(rps) * 1.15)
ax1.tick_params(axis="x", labelrotation=10)

width = 0.38
xs = list(range(len(proxies)))
held = [targets[t]["oha"].get("rate_held", True) for t in proxies]
added = {q: [targets[t]["added_ms"][q] for t in proxies] for q in ("p50", "p99")}
# Microseconds unless that makes the numbers huge.
every = [v for q in added for v, h in zip(added[q], held) if h] or [v for q in added for v in added[q]]
unit, scale = ("µs", 1000.0) if max(abs(v) for v in every) < 10 else ("ms", 1.0)
top = max(every + [0]) * scale * 1.25 or 1.0
bottom = min(every + [0]) * scale * 1.25
from matplotlib.patches import Patch  # noqa: E402

for i, q in enumerate(("p50", "p99")):
    for x, t, v, h in zip(xs, proxies, added[q], held):
        v *= scale
        xpos = x + (i - 0.5) * width
        if h:
            ax2.bar(xpos, v, width, color=COLORS[t], alpha=0.5 if q == "p50" else 1.0)
            ax2.annotate(f"{v:,.0f}" if abs(v) >= 10 else f"{v:,.2f}", (xpos, max(v, 0)), ha="center",
                         va="bottom", fontsize=9, xytext=(0, 2), textcoords="offset points")
        else:
            # oha could not hold the rate: the value is queueing, not the proxy. Hatched and cut off.
            ax2.bar(xpos, top * 0.9, width, color="white", edgecolor=COLORS[t], hatch="//")
            ax2.text(xpos, top * 0.45, f"{q}: rate not held ({v:,.0f} {unit})", ha="center", va="center",
                     rotation=90, fontsize=8, bbox={"facecolor": "white", "edgecolor": "none", "pad": 1})
ax2.set_xticks(xs, [targets[t]["label"] for t in proxies])
ax2.axhline(0, color="black", linewidth=0.8)
ax2.set_title(f"Added latency at {meta['load']['oha_rate_rps']:,} req/s (oha), {unit} — lower is better")
ax2.set_ylabel(f"{unit} over upstream direct")
ax2.set_ylim(bottom, top * 1.1)
ax2.legend(handles=[Patch(color="gray", alpha=0.5), Patch(color="gray")], labels=["added p50", "added p99"],
           loc="upper left")

fig.suptitle(
    f"ApiPolicy sidecar @ {meta['git_commit']} — {meta['date']} — {meta['machine']['nproc']} cores "
    f"({meta['machine']['cpu_model']}); proxy on core {meta['pinning']['proxy_core']}, "
    f"load + upstream on core {meta['pinning']['load_core']}",
    fontsize=10,
)
fig.tight_layout()
fig.savefig(out, dpi=110)
print(f"wrote {out}")
