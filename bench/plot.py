#!/usr/bin/env python3
"""Draws bench/results/latest.png from bench/results/latest.json (written by bench/run.sh).

Usage: python3 bench/plot.py [results.json] [out.png]

One panel per view of the scenarios that ran, two per row:
- targets: each claim of the issues as measured ÷ target (≥ 1 = met; for "less than" targets,
  target ÷ measured), so every claim reads the same way;
- baseline: max throughput (wrk) of each target, and the latency each proxy adds over the
  upstream reached directly at the same fixed rate (oha), p50 and p99;
- cache-hit and gzip-hit: req/s of the sidecar and of the nginx variants;
- ratelimit-pod: req/s with and without the limit, sidecar and nginx;
- ratelimit-global: req/s with and without the Global limit, and p50/p99 at the fixed rate;
- decision: ns per decision of the micro-benchmark (log scale), with the 200 ns target.
"""

import json
import math
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

here = os.path.dirname(os.path.abspath(__file__))
src = sys.argv[1] if len(sys.argv) > 1 else os.path.join(here, "results", "latest.json")
out = sys.argv[2] if len(sys.argv) > 2 else os.path.join(here, "results", "latest.png")
res = json.load(open(src))
meta = res["meta"]
targets = res.get("targets") or {}
scen = res.get("scenarios") or {}
goals = res.get("goals") or []
ran = meta.get("scenarios") or (["baseline"] if targets else [])

COLORS = {"direct": "#9e9e9e", "sidecar": "#1f77b4", "nginx": "#2ca02c", "haproxy": "#d62728"}
NGINX2 = "#98df8a"  # the second nginx variant
GOOD, BAD = "#2ca02c", "#d62728"


def bar_labels(ax, bars, values, fmt="{:,.0f}"):
    ax.bar_label(bars, labels=[fmt.format(v) if v is not None else "n/a" for v in values], padding=2, fontsize=8)


def wrk_label(m):
    try:
        return "-c" + m["load"]["wrk"].split("-c")[1].split()[0]
    except (KeyError, IndexError):
        return ""


# ---------------------------------------------------------------------------------------
def panel_goals(ax):
    rows = []
    for g in goals:
        v, t = g["value"], g["target"]
        if v is None or g["format"] == "n":
            continue
        if g["op"] == ">=":
            score = v / t if t else None
        else:
            score = t / v if v > 0 else math.inf
        if score is None:
            continue
        rows.append((g, score))
    if not rows:
        ax.axis("off")
        return
    labels = [g.get('short') or f"{g['scenario']}: {g['claim']}" for g, _ in rows]
    labels = [lbl if len(lbl) <= 75 else lbl[:72] + "…" for lbl in labels]
    shown = [min(s, 10.0) for _, s in rows]  # cap for drawing; the label says the real value
    ys = list(range(len(rows)))[::-1]
    colors = [GOOD if s >= 1 else BAD for _, s in rows]
    bars = ax.barh(ys, shown, color=colors, alpha=0.8)
    for b, (g, s) in zip(bars, rows):
        fmt = {"x": "{:.2f}x", "x3": "{:.3f}x", "ms": "{:.3f} ms", "ns": "{:,.0f} ns", "rps": "{:,.0f}/s"}.get(g["format"], "{}")
        txt = fmt.format(g["value"]) + (" (noisy)" if g.get("noisy") else "")
        ax.text(b.get_width(), b.get_y() + b.get_height() / 2, " " + txt, va="center", fontsize=8)
    ax.set_yticks(ys, labels, fontsize=8)
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlim(min(0.1, min(shown) * 0.8), max(20.0, max(shown) * 3))
    ax.set_title("Targets: measured ÷ target (right of the line = met; log scale)")


def panel_baseline_rps(ax):
    order = ["direct", "sidecar", "nginx", "haproxy"]
    rps = [targets[t]["wrk"]["rps"] for t in order]
    bars = ax.bar([targets[t]["label"] for t in order], rps, color=[COLORS[t] for t in order])
    bar_labels(ax, bars, rps)
    ax.set_title(f"Baseline: max throughput (wrk {wrk_label(meta)}), req/s — higher is better", fontsize=10)
    ax.set_ylabel("requests / second")
    ax.set_ylim(0, max(rps) * 1.15)
    ax.tick_params(axis="x", labelrotation=10)


def panel_baseline_latency(ax):
    proxies = ["sidecar", "nginx", "haproxy"]
    width = 0.38
    xs = list(range(len(proxies)))
    held = [targets[t]["oha"].get("rate_held", True) for t in proxies]
    added = {q: [targets[t]["added_ms"][q] for t in proxies] for q in ("p50", "p99")}
    # Microseconds unless that makes the numbers huge.
    every = [v for q in added for v, h in zip(added[q], held) if h] or [v for q in added for v in added[q]]
    unit, scale = ("µs", 1000.0) if max(abs(v) for v in every) < 10 else ("ms", 1.0)
    top = max(every + [0]) * scale * 1.25 or 1.0
    bottom = min(every + [0]) * scale * 1.25
    for i, q in enumerate(("p50", "p99")):
        for x, t, v, h in zip(xs, proxies, added[q], held):
            v *= scale
            xpos = x + (i - 0.5) * width
            if h:
                ax.bar(xpos, v, width, color=COLORS[t], alpha=0.5 if q == "p50" else 1.0)
                ax.annotate(f"{v:,.0f}" if abs(v) >= 10 else f"{v:,.2f}", (xpos, max(v, 0)), ha="center",
                            va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
            else:
                # oha could not hold the rate: the value is queueing, not the proxy. Hatched and cut off.
                ax.bar(xpos, top * 0.9, width, color="white", edgecolor=COLORS[t], hatch="//")
                ax.text(xpos, top * 0.45, f"{q}: rate not held ({v:,.0f} {unit})", ha="center", va="center",
                        rotation=90, fontsize=8, bbox={"facecolor": "white", "edgecolor": "none", "pad": 1})
    ax.set_xticks(xs, [targets[t]["label"] for t in proxies])
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_title(f"Baseline: added latency at {meta['load']['oha_rate_rps']:,} req/s (oha), {unit} — lower is better",
                 fontsize=10)
    ax.set_ylabel(f"{unit} over upstream direct")
    ax.set_ylim(bottom, top * 1.1)
    ax.legend(handles=[Patch(color="gray", alpha=0.5), Patch(color="gray")], labels=["added p50", "added p99"],
              loc="upper left", fontsize=8)


def panel_hits(ax):
    names, values, colors, notes = [], [], [], []
    if "cache-hit" in scen:
        c = scen["cache-hit"]
        names += ["cache-hit:\nsidecar\ncache", "cache-hit:\nnginx\nproxy_cache"]
        values += [c["runs"]["sidecar"]["wrk"]["rps"], c["runs"]["nginx"]["wrk"]["rps"]]
        colors += [COLORS["sidecar"], COLORS["nginx"]]
        notes.append(f"cache-hit {c['ratios']['throughput']:.2f}x (target ≥ 1.5x)")
    if "gzip-hit" in scen:
        g = scen["gzip-hit"]
        names += ["gzip-hit:\nsidecar\ncache+gzip", "gzip-hit:\nnginx\ngzip on", "gzip-hit:\nnginx\ncache+gzip"]
        values += [g["runs"][k]["wrk"]["rps"] for k in ("sidecar", "nginx", "nginx-cache")]
        colors += [COLORS["sidecar"], COLORS["nginx"], NGINX2]
        notes.append(f"gzip-hit {g['ratios']['throughput_vs_nginx_gzip']:.2f}x vs nginx gzip (target ≥ 3x)")
    bars = ax.bar(names, values, color=colors)
    bar_labels(ax, bars, values)
    ax.set_ylim(0, max(values) * 1.2)
    ax.set_ylabel("requests / second")
    ax.tick_params(axis="x", labelsize=8)
    ax.set_title("Cache and gzip hits: req/s — higher is better\nsidecar ÷ nginx: " + "; ".join(notes), fontsize=10)


def panel_ratelimit_pod(ax):
    r = scen["ratelimit-pod"]
    width = 0.38
    sides = [("sidecar", r["sidecar"], COLORS["sidecar"]), ("nginx", r["nginx"], COLORS["nginx"])]
    for i, (name, s, color) in enumerate(sides):
        for j, which in enumerate(("plain", "limited")):
            v = s[which]["rps"]
            xpos = i + (j - 0.5) * width
            ax.bar(xpos, v, width, color=color, alpha=0.5 if which == "plain" else 1.0)
            ax.annotate(f"{v:,.0f}", (xpos, v), ha="center", va="bottom", fontsize=8, xytext=(0, 2),
                        textcoords="offset points")
        ax.text(i, 0.04 * max(s["plain"]["rps"], s["limited"]["rps"]), f"{s['ratio']:.2f}x", ha="center",
                fontsize=9, color="white", fontweight="bold")
    ax.set_xticks([0, 1], ["sidecar (Pod TokenBucket)", "nginx (limit_req)"])
    top = max(s[w]["rps"] for _, s, _ in sides for w in ("plain", "limited"))
    ax.set_ylim(0, top * 1.2)
    ax.set_ylabel("requests / second (mean of 2 rounds)")
    ax.legend(handles=[Patch(color="gray", alpha=0.5), Patch(color="gray")], labels=["no limit", "limit that allows all"],
              loc="upper left", fontsize=8)
    ax.set_title("ratelimit-pod: req/s without and with the limit\n(limited ÷ plain in the bars; sidecar target ≥ 0.95x)",
                 fontsize=10)


def panel_ratelimit_global(ax):
    g = scen["ratelimit-global"]
    m = g["max"]
    vals = [m["plain"]["rps"], m["global"]["rps"]]
    bars = ax.bar(["sidecar, no limit", "sidecar, Global (Redis)"], vals, color=[COLORS["sidecar"], COLORS["sidecar"]],
                  alpha=0.9)
    bars[0].set_alpha(0.5)
    bar_labels(ax, bars, vals)
    ax.axhline(20000, color=BAD, linestyle="--", linewidth=1)
    ax.text(1.45, 20000, " target 20k/s", va="bottom", ha="right", fontsize=8, color=BAD)
    ax.set_ylim(0, max(vals + [20000]) * 1.2)
    ax.set_ylabel("requests (= decisions) / second")
    st = g["store"]
    ax.set_title(f"ratelimit-global: max req/s ({m['ratio']:.2f}x of no limit); Redis store errors: {st['errors']:.0f}",
                 fontsize=10)


def panel_ratelimit_global_latency(ax):
    g = scen["ratelimit-global"]["fixed_rate"]
    lat, added = g["latency_ms_best_round"], g["added_ms"]
    qs = ["p50", "p90", "p99"]
    width = 0.38
    xs = list(range(len(qs)))
    for j, (which, alpha) in enumerate((("plain", 0.5), ("global", 1.0))):
        vals = [lat[which][q] for q in qs]
        xp = [x + (j - 0.5) * width for x in xs]
        bars = ax.bar(xp, [v or 0 for v in vals], width, color=COLORS["sidecar"], alpha=alpha)
        bar_labels(ax, bars, vals, fmt="{:.3f}")
    ax.set_xticks(xs, qs)
    ax.set_ylabel("ms (oha, latency-corrected; less disturbed round)")
    a99 = added.get("p99")
    ax.set_title(f"ratelimit-global at {g['rate']:,} req/s: added p99 "
                 f"{'n/a' if a99 is None else f'{a99:.3f} ms'} (target < 1 ms)", fontsize=10)
    ax.legend(handles=[Patch(color=COLORS["sidecar"], alpha=0.5), Patch(color=COLORS["sidecar"])],
              labels=["no limit", "Global limit"], loc="upper left", fontsize=8)


def panel_decision(ax):
    d = scen["decision"]["bench"]
    rows = [r for r in d.get("rows", []) if r["algorithm"] != "-"]
    algos = []
    for r in rows:
        if r["algorithm"] not in algos:
            algos.append(r["algorithm"])
    groups = [("LocalStore::decide", 1), ("LocalStore::decide", 2), ("RouteLimiter::check", 1), ("RouteLimiter::check", 2)]
    width = 0.8 / len(groups)
    palette = ["#1f77b4", "#aec7e8", "#ff7f0e", "#ffbb78"]
    for gi, (path, th) in enumerate(groups):
        vals = []
        for a in algos:
            m = [r for r in rows if r["path"] == path and r["threads"] == th and r["algorithm"] == a]
            vals.append(m[0]["ns_per_decision"] if m else 0)
        xp = [x + (gi - (len(groups) - 1) / 2) * width for x in range(len(algos))]
        bars = ax.bar(xp, vals, width, color=palette[gi], label=f"{path.split('::')[1]}, {th} thread{'s' if th > 1 else ''}")
        bar_labels(ax, bars, vals, fmt="{:,.0f}")
    ax.axhline(d.get("target_ns", 200), color=BAD, linestyle="--", linewidth=1)
    ax.text(len(algos) - 0.5, d.get("target_ns", 200), "200 ns target ", va="bottom", ha="right", fontsize=8, color=BAD)
    ax.set_yscale("log")
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo, hi * 8)  # room for the legend
    ax.set_xticks(list(range(len(algos))), algos)
    ax.set_ylabel("ns per decision, per thread (log)")
    ax.legend(fontsize=8, loc="upper left", ncol=2)
    ax.set_title("decision micro-benchmark: ns per decision — lower is better", fontsize=10)


panels = []
if goals:
    panels.append(("wide", panel_goals))
if "baseline" in ran and targets:
    panels += [("half", panel_baseline_rps), ("half", panel_baseline_latency)]
if "cache-hit" in scen or "gzip-hit" in scen:
    panels.append(("half", panel_hits))
if "ratelimit-pod" in scen:
    panels.append(("half", panel_ratelimit_pod))
if "ratelimit-global" in scen:
    panels += [("half", panel_ratelimit_global), ("half", panel_ratelimit_global_latency)]
if "decision" in scen:
    panels.append(("half", panel_decision))

# Lay out: a wide panel takes a full row, half panels go two per row.
rows, cur = [], []
for kind, fn in panels:
    if kind == "wide":
        if cur:
            rows.append(cur)
            cur = []
        rows.append([fn])
    else:
        cur.append(fn)
        if len(cur) == 2:
            rows.append(cur)
            cur = []
if cur:
    rows.append(cur)
heights = [max(2.2, 0.45 * len(goals) + 1.2) if r == [panel_goals] else 4.6 for r in rows]
fig = plt.figure(figsize=(14, sum(heights) + 0.8))
gs = fig.add_gridspec(len(rows), 2, height_ratios=heights)
for i, row in enumerate(rows):
    if len(row) == 1 and row[0] is panel_goals:
        row[0](fig.add_subplot(gs[i, :]))
    else:
        for j, fn in enumerate(row):
            fn(fig.add_subplot(gs[i, j]))

fig.suptitle(
    f"ApiPolicy sidecar @ {meta['git_commit']} — {meta['date']} — {meta['machine']['nproc']} cores "
    f"({meta['machine']['cpu_model']}); proxy on core {meta['pinning']['proxy_core']}, "
    f"load + upstream (+ Redis) on core {meta['pinning']['load_core']}",
    fontsize=10,
)
fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))
fig.savefig(out, dpi=100)
print(f"wrote {out}")
