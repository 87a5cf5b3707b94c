#!/usr/bin/env python3
"""Turns the raw output of bench/run.sh into bench/results/latest.json and latest.md.

Reads bench/work/raw/ (wrk-*.txt, oha-*.json, cpu-*.json, mem-*.json, commands.txt) and the
BENCH_* environment variables that run.sh exports. Run by run.sh; not meant to be run alone.
"""

import json
import os
import re
import sys

TARGETS = ["direct", "sidecar", "nginx", "haproxy"]
PROXIES = ["sidecar", "nginx", "haproxy"]
LABEL = {
    "direct": "upstream direct",
    "sidecar": "apipolicy-sidecar",
    "nginx": "nginx proxy",
    "haproxy": "haproxy",
}

env = os.environ.get
RAW = env("BENCH_RAW")
RESULTS = env("BENCH_RESULTS")
if not RAW or not RESULTS:
    sys.exit("report.py: run bench/run.sh instead (BENCH_RAW / BENCH_RESULTS are not set)")

UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0, "h": 3600000.0}


def wrk_ms(text):
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if not m:
        raise ValueError(f"unexpected wrk duration {text!r}")
    return float(m.group(1)) * UNIT_MS[m.group(2)]


def parse_wrk(path):
    text = open(path).read()
    out = {"raw": os.path.basename(path)}
    m = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.M)
    out["rps"] = float(m.group(1))
    m = re.search(r"^\s+(\d+) requests in ([\d.]+\w+),", text, re.M)
    out["requests"] = int(m.group(1)) if m else None
    for pct, val in re.findall(r"^\s+(50|75|90|99)%\s+(\S+)", text, re.M):
        out[f"p{pct}_ms"] = wrk_ms(val)
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    out["non_2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    out["socket_errors"] = sum(int(x) for x in m.groups()) if m else 0
    return out


def parse_oha(path):
    data = json.load(open(path))
    summary = data.get("summary", {})
    pcts = data.get("latencyPercentiles", {})

    def ms(key):
        v = pcts.get(key)
        return None if v is None else v * 1000.0

    codes = data.get("statusCodeDistribution", {}) or {}
    errors = data.get("errorDistribution", {}) or {}
    return {
        "raw": os.path.basename(path),
        "achieved_rps": summary.get("requestsPerSec"),
        "success_rate": summary.get("successRate"),
        "p50_ms": ms("p50"),
        "p90_ms": ms("p90"),
        "p99_ms": ms("p99"),
        "p99_9_ms": ms("p99.9"),
        "status_codes": codes,
        "errors": errors,
    }


def ratio(a, b, floor=0.0):
    if a is None or b is None or b <= floor:
        return None
    return a / b


def f(v, digits=2, suffix=""):
    if v is None:
        return "n/a"
    return f"{v:,.{digits}f}{suffix}"


def fx(v):
    return "n/a" if v is None else f"{v:.2f}x"


# ---------------------------------------------------------------------------------------
targets = {}
for t in TARGETS:
    targets[t] = {
        "label": LABEL[t],
        "url": env(f"BENCH_URL_{t.upper()}"),
        "wrk": parse_wrk(f"{RAW}/wrk-{t}.txt"),
        "oha": parse_oha(f"{RAW}/oha-{t}.json"),
        "cpu": json.load(open(f"{RAW}/cpu-{t}.json")),
        "cpu_oha": json.load(open(f"{RAW}/cpu-oha-{t}.json")),
        "memory": json.load(open(f"{RAW}/mem-{t}.json")),
    }

direct = targets["direct"]
RATE = int(env("BENCH_RATE"))
for t in TARGETS:
    o = targets[t]["oha"]
    # Below the asked rate, requests queued behind the -c limit and the latency-corrected
    # percentiles measure that queue, not the proxy: such latencies are not compared.
    o["rate_held"] = o["achieved_rps"] is not None and o["achieved_rps"] >= 0.95 * RATE
for t in TARGETS:
    d = targets[t]
    cpu = d["cpu"]["server_cpu_pct"]
    # Requests served per second of the server's own CPU time: fair even when the
    # load-generator core, not the proxy's, was the bottleneck.
    d["wrk"]["rps_per_cpu_second"] = d["wrk"]["rps"] / (cpu / 100.0) if cpu > 0 else None
    o, od = d["oha"], direct["oha"]
    d["added_ms"] = {
        "p50": None if t == "direct" else o["p50_ms"] - od["p50_ms"],
        "p99": None if t == "direct" else o["p99_ms"] - od["p99_ms"],
    }

# Added latency below this (ms) is within timer noise; a ratio against it would be meaningless.
ADDED_FLOOR_MS = 0.005
S = targets["sidecar"]
ratios = {}
for other in ["nginx", "haproxy", "direct"]:
    O = targets[other]
    held = S["oha"]["rate_held"] and O["oha"]["rate_held"] and direct["oha"]["rate_held"]
    r = {
        "throughput": ratio(S["wrk"]["rps"], O["wrk"]["rps"]),
        "rps_per_cpu_second": ratio(S["wrk"]["rps_per_cpu_second"], O["wrk"]["rps_per_cpu_second"]),
        "latency_p50": ratio(S["oha"]["p50_ms"], O["oha"]["p50_ms"]) if held else None,
        "latency_p99": ratio(S["oha"]["p99_ms"], O["oha"]["p99_ms"]) if held else None,
    }
    if other != "direct":
        r["added_p50"] = ratio(S["added_ms"]["p50"], O["added_ms"]["p50"], ADDED_FLOOR_MS) if held else None
        r["added_p99"] = ratio(S["added_ms"]["p99"], O["added_ms"]["p99"], ADDED_FLOOR_MS) if held else None
        r["idle_rss"] = ratio(S["memory"]["idle_rss_kb"], O["memory"]["idle_rss_kb"])
        r["peak_rss"] = ratio(S["memory"]["peak_rss_kb"], O["memory"]["peak_rss_kb"])
    ratios[f"sidecar/{other}"] = r
for p in ["nginx", "haproxy"]:  # context: what the reference proxies cost over direct
    held = targets[p]["oha"]["rate_held"] and direct["oha"]["rate_held"]
    ratios[f"{p}/direct"] = {
        "throughput": ratio(targets[p]["wrk"]["rps"], direct["wrk"]["rps"]),
        "latency_p50": ratio(targets[p]["oha"]["p50_ms"], direct["oha"]["p50_ms"]) if held else None,
        "latency_p99": ratio(targets[p]["oha"]["p99_ms"], direct["oha"]["p99_ms"]) if held else None,
    }

commands = open(f"{RAW}/commands.txt").read().rstrip("\n")
meta = {
    "date": env("BENCH_DATE"),
    "git_commit": env("BENCH_GIT_COMMIT"),
    "git_dirty_files": int(env("BENCH_GIT_DIRTY", "0")),
    "sidecar_binary": env("BENCH_SIDECAR_BIN"),
    "machine": {
        "nproc": int(env("BENCH_NPROC")),
        "cpu_model": env("BENCH_CPU_MODEL"),
        "kernel": env("BENCH_KERNEL"),
    },
    "versions": {
        "sidecar": env("BENCH_SIDECAR_VERSION"),
        "nginx": env("BENCH_NGINX_VERSION"),
        "haproxy": env("BENCH_HAPROXY_VERSION"),
        "wrk": env("BENCH_WRK_VERSION"),
        "oha": env("BENCH_OHA_VERSION"),
    },
    "pinning": {
        "proxy_core": int(env("BENCH_PROXY_CORE")),
        "load_core": int(env("BENCH_LOAD_CORE")),
        "description": (
            f"each proxy under test on core {env('BENCH_PROXY_CORE')} "
            "(sidecar with --threads 1, nginx worker_processes 1, haproxy nbthread 1); "
            f"wrk, oha and the upstream nginx share core {env('BENCH_LOAD_CORE')}"
        ),
    },
    "load": {
        "wrk": f"wrk -t1 -c{env('BENCH_WRK_CONNS')} -d{env('BENCH_WRK_DURATION')} --latency "
        f"(after a {env('BENCH_WARMUP_DURATION')} warm-up run)",
        "oha_rate_rps": int(env("BENCH_RATE")),
        "oha_rate_fraction_of_nginx_max": float(env("BENCH_RATE_FRACTION")),
        "oha": f"oha -z {env('BENCH_OHA_DURATION')} -c {env('BENCH_OHA_CONNS')} -q {env('BENCH_RATE')} "
        "--latency-correction (keep-alive on)",
    },
    "background_before_run": json.load(open(f"{RAW}/background.json")),
    "timing_seconds": {
        "setup": int(env("BENCH_SETUP_SECONDS")),
        "measurements": int(env("BENCH_MEASURE_SECONDS")),
        "total_until_servers_stopped": int(env("BENCH_TOTAL_SECONDS")),
    },
    "commands": commands.splitlines(),
}

# Warnings a reader must see next to the numbers.
NOISE_PCT = 10.0  # CPU % of a core used by other processes above which a run is flagged
warnings = []
bg = meta["background_before_run"]
if max(bg["core0_busy_pct"], bg["core1_busy_pct"]) > NOISE_PCT:
    warnings.append(
        f"before the run, other processes already kept core 0 {bg['core0_busy_pct']}% and core 1 "
        f"{bg['core1_busy_pct']}% busy (load average {bg['loadavg']}): expect noisy numbers, rerun on a quiet machine."
    )
for t in TARGETS:
    w, o, c = targets[t]["wrk"], targets[t]["oha"], targets[t]["cpu"]
    if w["non_2xx"] or w["socket_errors"]:
        warnings.append(f"{LABEL[t]}: wrk saw {w['non_2xx']} non-2xx responses and {w['socket_errors']} socket errors.")
    bad = {k: v for k, v in o["status_codes"].items() if k != "200"}
    errs = {k: v for k, v in o["errors"].items() if "deadline" not in k}  # -z aborts in-flight requests at the end
    if bad or errs:
        warnings.append(f"{LABEL[t]}: oha saw non-200 statuses {bad} / errors {errs}.")
    rate = meta["load"]["oha_rate_rps"]
    if not o["rate_held"]:
        warnings.append(
            f"{LABEL[t]}: oha reached only {o['achieved_rps']:.0f} of the {rate} req/s asked for, so its "
            "latency-corrected percentiles measure a growing queue, not the proxy; latency ratios that involve "
            "it are shown as n/a."
        )
    # The core that matters: the proxy's for a proxy, the load core for the direct run.
    key = "other_procs_core1_pct" if t == "direct" else "other_procs_core0_pct"
    core = 1 if t == "direct" else 0
    for phase, cp in [("max-throughput (wrk)", c), ("fixed-rate (oha)", targets[t]["cpu_oha"])]:
        if cp[key] > NOISE_PCT:
            warnings.append(
                f"{LABEL[t]}, {phase}: other processes used {cp[key]}% of core {core} during the run, "
                "so these numbers are disturbed."
            )
    if t != "direct" and c["core1_busy_pct"] >= 95 and c["server_cpu_pct"] < 90 and c["other_procs_core0_pct"] <= NOISE_PCT:
        warnings.append(
            f"{LABEL[t]}: during max throughput the load core was {c['core1_busy_pct']}% busy while the proxy "
            f"used {c['server_cpu_pct']}% of its core, so the limit was the load generator/upstream, not the proxy: "
            "compare req/s per proxy CPU-second too."
        )
if meta["git_dirty_files"]:
    warnings.append(
        f"the sidecar was built from a work tree with {meta['git_dirty_files']} uncommitted change(s) "
        f"on top of {meta['git_commit']}."
    )

result = {"meta": meta, "targets": targets, "ratios": ratios, "warnings": warnings}
with open(f"{RESULTS}/latest.json", "w") as fh:
    json.dump(result, fh, indent=2)
    fh.write("\n")

# ---------------------------------------------------------------------------------------
# Markdown
md = []
add = md.append
add("# ApiPolicy sidecar vs nginx vs haproxy: latest run")
add("")
add(
    f"{meta['date']}, sidecar at commit `{meta['git_commit']}`"
    + (f" (+{meta['git_dirty_files']} uncommitted changes)" if meta["git_dirty_files"] else "")
    + f". One run on one {meta['machine']['nproc']}-core machine over loopback: "
    "**read the ratios, not the absolute times** (see bench/README.md)."
)
add("")
add("## Ratios (sidecar relative to each)")
add("")
add("Throughput: higher is better for the sidecar. Latency and memory: lower is better. "
    "Added latency = p50/p99 through the proxy minus p50/p99 of the upstream reached directly, at the same fixed rate.")
add("")
add("| metric | sidecar / nginx | sidecar / haproxy | sidecar / direct |")
add("|---|---:|---:|---:|")
rn, rh, rd = ratios["sidecar/nginx"], ratios["sidecar/haproxy"], ratios["sidecar/direct"]
add(f"| max throughput (req/s) | {fx(rn['throughput'])} | {fx(rh['throughput'])} | {fx(rd['throughput'])} |")
add(f"| req/s per proxy CPU-second | {fx(rn['rps_per_cpu_second'])} | {fx(rh['rps_per_cpu_second'])} | {fx(rd['rps_per_cpu_second'])} |")
add(f"| added p50 latency | {fx(rn['added_p50'])} | {fx(rh['added_p50'])} | — |")
add(f"| added p99 latency | {fx(rn['added_p99'])} | {fx(rh['added_p99'])} | — |")
add(f"| total p50 latency | {fx(rn['latency_p50'])} | {fx(rh['latency_p50'])} | {fx(rd['latency_p50'])} |")
add(f"| total p99 latency | {fx(rn['latency_p99'])} | {fx(rh['latency_p99'])} | {fx(rd['latency_p99'])} |")
add(f"| idle RSS | {fx(rn['idle_rss'])} | {fx(rh['idle_rss'])} | — |")
add(f"| peak RSS | {fx(rn['peak_rss'])} | {fx(rh['peak_rss'])} | — |")
add("")
add(
    "For context, the reference proxies over direct: "
    + "; ".join(
        f"{p} throughput {fx(ratios[p + '/direct']['throughput'])}, p99 {fx(ratios[p + '/direct']['latency_p99'])}"
        for p in ["nginx", "haproxy"]
    )
    + "."
)
add("")
add("## Absolute numbers")
add("")
rate = meta["load"]["oha_rate_rps"]
add(
    f"Max throughput: `wrk -t1 -c{env('BENCH_WRK_CONNS')} -d{env('BENCH_WRK_DURATION')}`, wrk's own latency percentiles "
    f"(closed loop, so they mostly reflect queueing at saturation). Fixed rate: oha at **{rate:,} req/s** "
    f"({meta['load']['oha_rate_fraction_of_nginx_max']:.0%} of nginx's max), {env('BENCH_OHA_DURATION')}, "
    f"-c {env('BENCH_OHA_CONNS')}, latency-corrected. Server CPU = the server's CPU time during the wrk run "
    "(100% = one full core; for direct it is the upstream nginx, which shares core 1 with wrk). Memory: VmRSS idle before load; peak = VmHWM after all load; nginx = master + worker."
)
add("")
add("| target | max req/s | wrk p50 | wrk p99 | server CPU | req/s per CPU-s "
    "| fixed-rate req/s | p50 | p99 | added p50 | added p99 | idle RSS | peak RSS |")
add("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for t in TARGETS:
    d = targets[t]
    w, o, c, m, a = d["wrk"], d["oha"], d["cpu"], d["memory"], d["added_ms"]
    name = LABEL[t] + (" (upstream nginx)" if t == "direct" else "")
    mark = "" if o["rate_held"] else " †"
    add(
        f"| {name} | {f(w['rps'], 0)} | {f(w.get('p50_ms'), 3)} ms | {f(w.get('p99_ms'), 3)} ms "
        f"| {f(c['server_cpu_pct'], 0)}% | {f(w['rps_per_cpu_second'], 0)} "
        f"| {f(o['achieved_rps'], 0)}{mark} | {f(o['p50_ms'], 3)} ms{mark} | {f(o['p99_ms'], 3)} ms{mark} "
        f"| {'—' if a['p50'] is None else f(a['p50'], 3) + ' ms'} | {'—' if a['p99'] is None else f(a['p99'], 3) + ' ms'} "
        f"| {f(m['idle_rss_kb'] / 1024, 1)} MiB | {f(m['peak_rss_kb'] / 1024, 1)} MiB |"
    )
if not all(targets[t]["oha"]["rate_held"] for t in TARGETS):
    add("")
    add(f"† oha could not hold {RATE:,} req/s against this target: these latencies include queueing behind "
        f"the {env('BENCH_OHA_CONNS')} connections and are not comparable.")
add("")
add("### CPU use during each run")
add("")
add(
    "Our processes' CPU (server, upstream, load generator) and what *other* processes on the machine took "
    f"from each core (core busy minus ours). Before the run, with nothing of ours loaded, other processes kept core 0 "
    f"{bg['core0_busy_pct']}% and core 1 {bg['core1_busy_pct']}% busy (load average {bg['loadavg']}). "
    f"Anything above ~{NOISE_PCT:.0f}% from others means that run is noisy."
)
add("")
add("| target | run | server CPU | upstream CPU | wrk/oha CPU | core 0 busy | core 1 busy | others on core 0 | others on core 1 |")
add("|---|---|---:|---:|---:|---:|---:|---:|---:|")
for t in TARGETS:
    for phase, cp in [("wrk", targets[t]["cpu"]), ("oha", targets[t]["cpu_oha"])]:
        add(
            f"| {LABEL[t]} | {phase} | {f(cp['server_cpu_pct'], 0)}% | {f(cp['upstream_cpu_pct'], 0)}% "
            f"| {f(cp['loadgen_cpu_pct'], 0)}% | {f(cp['core0_busy_pct'], 0)}% | {f(cp['core1_busy_pct'], 0)}% "
            f"| {f(cp['other_procs_core0_pct'], 0)}% | {f(cp['other_procs_core1_pct'], 0)}% |"
        )
add("")
if warnings:
    add("## Warnings")
    add("")
    for w in warnings:
        add(f"- {w}")
    add("")
add("## Setup")
add("")
mc = meta["machine"]
add(f"- Machine: `nproc` = {mc['nproc']}, CPU: {mc['cpu_model']}, kernel: {mc['kernel']}")
add(f"- CPU pinning (taskset): {meta['pinning']['description']}.")
v = meta["versions"]
add(f"- Sidecar: {v['sidecar']}, git commit `{meta['git_commit']}`, binary `{meta['sidecar_binary']}`")
add(f"- nginx: {v['nginx']}")
add(f"- haproxy: {v['haproxy']}")
add(f"- wrk: {v['wrk']}")
add(f"- oha: {v['oha']}")
add(
    "- Upstream: a separate nginx (worker_processes 1) answering `return 200` with a fixed "
    f"{len(open(f'{RAW}/check-direct.body', 'rb').read())}-byte JSON body."
)
add(
    "- nginx proxy: worker_processes 1, access_log off, upstream `keepalive 64`, "
    "`proxy_http_version 1.1`, `proxy_set_header Connection \"\"`."
)
add("- haproxy: nbthread 1, mode http, http-reuse always, no logging.")
add("- Sidecar: `--threads 1 --access-log false --log warn`, a pass-through ApiPolicy with one `/api` prefix route.")
ts = meta["timing_seconds"]
add(
    f"- Run time: {ts['setup']} s setup (tools, build check, servers), {ts['measurements']} s of measurements, "
    f"{ts['total_until_servers_stopped']} s in all until the servers were stopped."
)
add("")
add("## Commands")
add("")
add("Exactly as run (configs are written to bench/work/ by bench/run.sh):")
add("")
add("```")
add(commands)
add("```")
add("")
with open(f"{RESULTS}/latest.md", "w") as fh:
    fh.write("\n".join(md))
print(f"wrote {RESULTS}/latest.json and {RESULTS}/latest.md")
