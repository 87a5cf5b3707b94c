#!/usr/bin/env python3
"""Turns the raw output of bench/run.sh into latest.json and latest.md.

Reads bench/work/raw/ (wrk-*.txt, oha-*.json, cpu-*.json, mem-*.json, metrics-*, upstream-*,
redis-*, decision.json, facts.tsv, runs.tsv, commands.txt) and the BENCH_* environment
variables that run.sh exports. Run by run.sh; not meant to be run alone.

Every scenario that ran gets a section; the claims the project's issues make ("targets") are
gathered in one table at the top, each with the measured value, the target and a verdict.
"""

import json
import os
import re
import statistics
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
SCENARIOS = [s for s in env("BENCH_SCENARIOS", "baseline").split(",") if s]

UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0, "h": 3600000.0}
UNIT_BYTES = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3}
# CPU % of a core used by other processes above which a run is flagged as noisy.
NOISE_PCT = 10.0


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
    m = re.search(r"^Transfer/sec:\s+([\d.]+)(B|KB|MB|GB)", text, re.M)
    if m:
        out["transfer_bytes_per_s"] = float(m.group(1)) * UNIT_BYTES[m.group(2)]
        out["bytes_per_response"] = out["transfer_bytes_per_s"] / out["rps"] if out["rps"] else None
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


def read_json(path, default=None):
    try:
        return json.load(open(path))
    except (OSError, ValueError):
        return default


def stub_requests(path):
    """The `requests` count of nginx's stub_status page, or None."""
    try:
        lines = open(path).read().splitlines()
    except OSError:
        return None
    for i, line in enumerate(lines):
        if line.startswith("server accepts handled requests") and i + 1 < len(lines):
            return int(lines[i + 1].split()[2])
    return None


PROM_LINE = re.compile(r"^([a-zA-Z_:][\w:]*)(?:\{([^}]*)\})?\s+(\S+)")


def parse_prom(path):
    """Prometheus text format → {(name, ((label, value), ...)): float}, or None."""
    try:
        text = open(path).read()
    except OSError:
        return None
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = PROM_LINE.match(line)
        if not m:
            continue
        labels = tuple(sorted(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or "")))
        try:
            out[(m.group(1), labels)] = float(m.group(3))
        except ValueError:
            pass
    return out


def prom_value(metrics, name, **labels):
    if metrics is None:
        return None
    want = tuple(sorted(labels.items()))
    return metrics.get((name, want), 0.0)


def prom_sum_delta(before, after, name):
    """The change of every series of `name` added up, whatever their labels."""
    if before is None or after is None:
        return None
    total = lambda m: sum(v for (n, _), v in m.items() if n == name)
    return total(after) - total(before)


def prom_delta(before, after, name, **labels):
    if before is None or after is None:
        return None
    return prom_value(after, name, **labels) - prom_value(before, name, **labels)


def hist_delta(before, after, name):
    """Cumulative bucket counts [(le, count)] of a label-less histogram between two scrapes."""
    if before is None or after is None:
        return None
    buckets = []
    for (n, labels), v in after.items():
        if n == f"{name}_bucket":
            le = dict(labels)["le"]
            buckets.append((float("inf") if le == "+Inf" else float(le), v - before.get((n, labels), 0.0)))
    buckets.sort()
    total = after.get((f"{name}_count", ()), 0.0) - before.get((f"{name}_count", ()), 0.0)
    total_sum = after.get((f"{name}_sum", ()), 0.0) - before.get((f"{name}_sum", ()), 0.0)
    return {"buckets": buckets, "count": total, "sum": total_sum}


def add_hists(a, b):
    if a is None:
        return b
    if b is None:
        return a
    return {
        "buckets": [(le, x + y) for (le, x), (_, y) in zip(a["buckets"], b["buckets"])],
        "count": a["count"] + b["count"],
        "sum": a["sum"] + b["sum"],
    }


def hist_quantile(h, q):
    """Prometheus' histogram_quantile: linear interpolation inside the bucket (seconds)."""
    if not h or h["count"] <= 0:
        return None
    rank = q * h["count"]
    prev_le, prev_count = 0.0, 0.0
    for le, count in h["buckets"]:
        if count >= rank:
            if le == float("inf"):
                return prev_le  # above the highest bound: all we know is "more than that"
            if count == prev_count:
                return le
            return prev_le + (le - prev_le) * (rank - prev_count) / (count - prev_count)
        prev_le, prev_count = le, count
    return prev_le


def redis_calls(path, command="evalsha"):
    try:
        text = open(path).read()
    except OSError:
        return None
    m = re.search(rf"^cmdstat_{command}:calls=(\d+),.*?failed_calls=(\d+)", text, re.M)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def ratio(a, b, floor=0.0):
    if a is None or b is None or b <= floor:
        return None
    return a / b


def mean(values):
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def f(v, digits=2, suffix=""):
    if v is None:
        return "n/a"
    return f"{v:,.{digits}f}{suffix}"


def fx(v):
    return "n/a" if v is None else f"{v:.2f}x"


def fx3(v):
    return "n/a" if v is None else f"{v:.3f}x"


def fms(v, digits=3):
    return "n/a" if v is None else f"{v:,.{digits}f} ms"


# ---------------------------------------------------------------------------------------
# Inputs shared by every scenario
facts = {}
if os.path.exists(f"{RAW}/facts.tsv"):
    for line in open(f"{RAW}/facts.tsv"):
        if "\t" in line:
            k, v = line.rstrip("\n").split("\t", 1)
            facts[k] = v
run_info = {}
if os.path.exists(f"{RAW}/runs.tsv"):
    for line in open(f"{RAW}/runs.tsv"):
        parts = line.rstrip("\n").split("\t")
        if len(parts) >= 4:
            run_info[parts[0]] = {"server": parts[1], "url": parts[2], "tool": parts[3], "args": parts[4] if len(parts) > 4 else ""}

warnings = []
goals = []
cpu_rows = []  # (scenario, label, phase, cpu json, core that matters)


def core_of(server):
    return 1 if server == "upstream" else 0


def noisy(cpu, core):
    key = f"other_procs_core{core}_pct"
    return cpu is not None and cpu.get(key) is not None and cpu[key] > NOISE_PCT


def wrk_run(run_id, label, scenario):
    """One max-throughput run: wrk numbers, CPU, and the counters around it."""
    info = run_info.get(run_id, {})
    server = info.get("server", "")
    w = parse_wrk(f"{RAW}/wrk-{run_id}.txt")
    cpu = read_json(f"{RAW}/cpu-{run_id}.json")
    r = {"id": run_id, "label": label, "server": server, "url": info.get("url"), "wrk": w, "cpu": cpu}
    srv = cpu["server_cpu_pct"] if cpu else 0
    r["rps_per_cpu_second"] = w["rps"] / (srv / 100.0) if srv > 0 else None
    up0, up1 = stub_requests(f"{RAW}/upstream-{run_id}.before.txt"), stub_requests(f"{RAW}/upstream-{run_id}.after.txt")
    if up0 is not None and up1 is not None:
        r["upstream_requests"] = up1 - up0 - 1  # the "after" read counts itself
        r["upstream_requests_per_response"] = r["upstream_requests"] / w["requests"] if w.get("requests") else None
    r["_metrics"] = (parse_prom(f"{RAW}/metrics-{run_id}.before.txt"), parse_prom(f"{RAW}/metrics-{run_id}.after.txt"))
    r["_redis"] = (redis_calls(f"{RAW}/redis-{run_id}.before.txt"), redis_calls(f"{RAW}/redis-{run_id}.after.txt"))
    cpu_rows.append((scenario, label, "wrk", cpu, core_of(server)))
    if w["non_2xx"] or w["socket_errors"]:
        warnings.append(f"{scenario}, {label}: wrk saw {w['non_2xx']} non-2xx responses and {w['socket_errors']} socket errors.")
    if noisy(cpu, core_of(server)):
        warnings.append(
            f"{scenario}, {label} (wrk): other processes used {cpu[f'other_procs_core{core_of(server)}_pct']}% of "
            f"core {core_of(server)} during the run, so these numbers are disturbed."
        )
    if (server not in ("upstream", "") and cpu and cpu["core1_busy_pct"] >= 95 and cpu["server_cpu_pct"] < 90
            and cpu["other_procs_core0_pct"] <= NOISE_PCT):
        warnings.append(
            f"{scenario}, {label}: during max throughput the load core was {cpu['core1_busy_pct']}% busy while the proxy "
            f"used {cpu['server_cpu_pct']}% of its core, so the limit was the load core, not the proxy: "
            "compare req/s per proxy CPU-second too."
        )
    return r


def oha_run(run_id, label, scenario, rate):
    info = run_info.get(f"oha-{run_id}", {})
    server = info.get("server", "")
    o = parse_oha(f"{RAW}/oha-{run_id}.json")
    o["rate_held"] = o["achieved_rps"] is not None and o["achieved_rps"] >= 0.95 * rate
    cpu = read_json(f"{RAW}/cpu-oha-{run_id}.json")
    r = {"id": f"oha-{run_id}", "label": label, "server": server, "url": info.get("url"), "oha": o, "cpu": cpu}
    r["_metrics"] = (parse_prom(f"{RAW}/metrics-oha-{run_id}.before.txt"), parse_prom(f"{RAW}/metrics-oha-{run_id}.after.txt"))
    r["_redis"] = (redis_calls(f"{RAW}/redis-oha-{run_id}.before.txt"), redis_calls(f"{RAW}/redis-oha-{run_id}.after.txt"))
    cpu_rows.append((scenario, label, "oha", cpu, core_of(server)))
    bad = {k: v for k, v in o["status_codes"].items() if k != "200"}
    errs = {k: v for k, v in o["errors"].items() if "deadline" not in k}  # -z aborts in-flight requests at the end
    if bad or errs:
        warnings.append(f"{scenario}, {label}: oha saw non-200 statuses {bad} / errors {errs}.")
    if not o["rate_held"]:
        warnings.append(
            f"{scenario}, {label}: oha reached only {o['achieved_rps']:.0f} of the {rate} req/s asked for, so its "
            "latency-corrected percentiles measure a growing queue, not the proxy."
        )
    if noisy(cpu, core_of(server)):
        warnings.append(
            f"{scenario}, {label} (oha): other processes used {cpu[f'other_procs_core{core_of(server)}_pct']}% of "
            f"core {core_of(server)} during the run, so these numbers are disturbed."
        )
    return r


def public(r):
    return {k: v for k, v in r.items() if not k.startswith("_")}


def goal(scenario, claim, value, target, op, fmt, runs, note="", short=None):
    """One claim from an issue. op: ">=" or "<". runs: the runs it rests on (for the noise flag).
    short: a label for the chart."""
    if value is None:
        met = None
    else:
        met = value >= target if op == ">=" else value < target
    noise = any(noisy(r.get("cpu"), core_of(r.get("server", ""))) for r in runs)
    goals.append({
        "scenario": scenario, "claim": claim, "short": short or claim, "value": value, "target": target, "op": op,
        "format": fmt, "met": met, "noisy": noise, "note": note,
    })


def fmt_goal(v, fmt):
    if v is None:
        return "n/a"
    return {"x": lambda: f"{v:.2f}x", "x3": lambda: f"{v:.3f}x", "ms": lambda: f"{v:.3f} ms", "ns": lambda: f"{v:,.0f} ns",
            "rps": lambda: f"{v:,.0f}/s", "n": lambda: f"{v:,.0f}"}[fmt]()


md_sections = []  # (title, lines) per scenario, in run order
scenarios = {}

# ---------------------------------------------------------------------------------------
# Scenario: baseline (pass-through)
targets, ratios = {}, {}
RATE = int(env("BENCH_RATE", "0") or 0)
if "baseline" in SCENARIOS:
    for t in TARGETS:
        # Fixed-rate rounds: the first in target order, the second (if run) in reverse order.
        rounds = [r for r in (t, f"{t}.2") if os.path.exists(f"{RAW}/oha-{r}.json")]
        ohas = {r: parse_oha(f"{RAW}/oha-{r}.json") for r in rounds}
        for o in ohas.values():
            # Below the asked rate, requests queued behind the -c limit and the latency-corrected
            # percentiles measure that queue, not the proxy: such latencies are not compared.
            o["rate_held"] = o["achieved_rps"] is not None and o["achieved_rps"] >= 0.95 * RATE
        # The round the machine disturbed less: other processes only ever add latency, so the
        # better round is the closer one to what the target itself costs.
        best = min(rounds, key=lambda r: (not ohas[r]["rate_held"], ohas[r]["p99_ms"] is None, ohas[r]["p99_ms"] or 0))
        targets[t] = {
            "label": LABEL[t],
            "url": env(f"BENCH_URL_{t.upper()}"),
            "wrk": parse_wrk(f"{RAW}/wrk-{t}.txt"),
            "oha": ohas[best],
            "oha_round_p99_ms": [ohas[r]["p99_ms"] for r in rounds],
            "cpu": json.load(open(f"{RAW}/cpu-{t}.json")),
            "cpu_oha": json.load(open(f"{RAW}/cpu-oha-{best}.json")),
            "memory": json.load(open(f"{RAW}/mem-{t}.json")),
        }
    direct = targets["direct"]
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

    for t in TARGETS:
        w, o, c = targets[t]["wrk"], targets[t]["oha"], targets[t]["cpu"]
        if w["non_2xx"] or w["socket_errors"]:
            warnings.append(f"baseline, {LABEL[t]}: wrk saw {w['non_2xx']} non-2xx responses and {w['socket_errors']} socket errors.")
        bad = {k: v for k, v in o["status_codes"].items() if k != "200"}
        errs = {k: v for k, v in o["errors"].items() if "deadline" not in k}
        if bad or errs:
            warnings.append(f"baseline, {LABEL[t]}: oha saw non-200 statuses {bad} / errors {errs}.")
        if not o["rate_held"]:
            warnings.append(
                f"baseline, {LABEL[t]}: oha reached only {o['achieved_rps']:.0f} of the {RATE} req/s asked for, so its "
                "latency-corrected percentiles measure a growing queue, not the proxy; latency ratios that involve "
                "it are shown as n/a."
            )
        # The core that matters: the proxy's for a proxy, the load core for the direct run.
        key = "other_procs_core1_pct" if t == "direct" else "other_procs_core0_pct"
        core = 1 if t == "direct" else 0
        for phase, cp in [("max-throughput (wrk)", c), ("fixed-rate (oha)", targets[t]["cpu_oha"])]:
            cpu_rows.append(("baseline", LABEL[t], "wrk" if phase.startswith("max") else "oha", cp, core))
            if cp[key] > NOISE_PCT:
                warnings.append(
                    f"baseline, {LABEL[t]}, {phase}: other processes used {cp[key]}% of core {core} during the run, "
                    "so these numbers are disturbed."
                )
        if t != "direct" and c["core1_busy_pct"] >= 95 and c["server_cpu_pct"] < 90 and c["other_procs_core0_pct"] <= NOISE_PCT:
            warnings.append(
                f"baseline, {LABEL[t]}: during max throughput the load core was {c['core1_busy_pct']}% busy while the proxy "
                f"used {c['server_cpu_pct']}% of its core, so the limit was the load generator/upstream, not the proxy: "
                "compare req/s per proxy CPU-second too."
            )

    md = []
    add = md.append
    add("Pass-through: the same ~100-byte JSON reached directly, through the sidecar, nginx and haproxy. "
        "Ratios are sidecar ÷ the other. Throughput: higher is better for the sidecar; latency and memory: lower is better. "
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
    add(
        f"Max throughput: `wrk -t1 -c{env('BENCH_WRK_CONNS')} -d{env('BENCH_WRK_DURATION')}`, wrk's own latency percentiles "
        f"(closed loop, so they mostly reflect queueing at saturation). Fixed rate: oha at **{RATE:,} req/s** "
        f"({float(env('BENCH_RATE_FRACTION')):.0%} of nginx's max), {env('BENCH_OHA_DURATION')}, "
        f"-c {env('BENCH_OHA_CONNS')}, latency-corrected, in two rounds (the second in reverse target order); each "
        "target's fixed-rate figures come from its round with the lower p99, since other processes only ever add "
        "latency (both rounds' p99 in the last column). Server CPU = the server's CPU time during the wrk run "
        "(100% = one full core; for direct it is the upstream nginx, which shares core 1 with wrk). "
        "Memory: VmRSS idle before load; peak = VmHWM after all load; nginx = master + worker."
    )
    add("")
    add("| target | max req/s | wrk p50 | wrk p99 | server CPU | req/s per CPU-s "
        "| fixed-rate req/s | p50 | p99 | added p50 | added p99 | idle RSS | peak RSS | p99 by round |")
    add("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
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
            f"| {f(m['idle_rss_kb'] / 1024, 1)} MiB | {f(m['peak_rss_kb'] / 1024, 1)} MiB "
            f"| {', '.join(fms(p) for p in d['oha_round_p99_ms'])} |"
        )
    if not all(targets[t]["oha"]["rate_held"] for t in TARGETS):
        add("")
        add(f"† oha could not hold {RATE:,} req/s against this target: these latencies include queueing behind "
            f"the {env('BENCH_OHA_CONNS')} connections and are not comparable.")
    md_sections.append(("baseline", "Baseline: pass-through proxying", md))
    scenarios["baseline"] = {"see": "targets and ratios at the top level of this file"}

# ---------------------------------------------------------------------------------------
DUR, WARM = env("BENCH_SCENARIO_DURATION", "6s"), env("BENCH_SCENARIO_WARMUP", "2s")
WRK_LINE = f"`wrk -t1 -c{env('BENCH_WRK_CONNS')} -d{DUR}` after a {WARM} warm-up"


def run_table(rows, extra_cols=()):
    """Markdown rows for wrk runs: target, req/s, per CPU-s, server CPU, wrk p50/p99, upstream requests/response."""
    head = "| target | req/s | server CPU | req/s per CPU-s | wrk p50 | wrk p99 | upstream req. per response |" + "".join(
        f" {c[0]} |" for c in extra_cols)
    out = [head, "|---|" + "---:|" * (6 + len(extra_cols))]
    for r in rows:
        w = r["wrk"]
        upr = r.get("upstream_requests_per_response")
        out.append(
            f"| {r['label']} | {f(w['rps'], 0)} | {f(r['cpu']['server_cpu_pct'], 0)}% | {f(r['rps_per_cpu_second'], 0)} "
            f"| {fms(w.get('p50_ms'))} | {fms(w.get('p99_ms'))} | {f(upr, 3)} |"
            + "".join(f" {c[1](r)} |" for c in extra_cols)
        )
    return out


# ---------------------------------------------------------------------------------------
# Scenario: cache-hit
if "cache-hit" in SCENARIOS:
    sc = "cache-hit"
    s = wrk_run(f"{sc}.sidecar", "sidecar, route cache (maxAge 60s)", sc)
    n = wrk_run(f"{sc}.nginx", "nginx proxy_cache (valid 200 60s)", sc)
    mb, ma = s["_metrics"]
    hits = prom_delta(mb, ma, "apipolicy_cache_lookups_total", route="cache", result="hit")
    misses = prom_delta(mb, ma, "apipolicy_cache_lookups_total", route="cache", result="miss")
    res = {
        "runs": {"sidecar": public(s), "nginx": public(n)},
        "ratios": {
            "throughput": ratio(s["wrk"]["rps"], n["wrk"]["rps"]),
            "rps_per_cpu_second": ratio(s["rps_per_cpu_second"], n["rps_per_cpu_second"]),
        },
        "checks": {
            "sidecar_cache_status": facts.get(f"{sc}.sidecar.cache_status"),
            "nginx_cache_status": facts.get(f"{sc}.nginx.cache_status"),
            "sidecar_hits_during_run": hits,
            "sidecar_misses_during_run": misses,
            "nginx_upstream_requests_during_run": n.get("upstream_requests"),
        },
    }
    scenarios[sc] = res
    goal(sc, "cache-hit req/s: sidecar ÷ nginx proxy_cache", res["ratios"]["throughput"], 1.5, ">=", "x", [s, n],
         note=f"per proxy CPU-second: {fx(res['ratios']['rps_per_cpu_second'])}", short="cache hit: sidecar ÷ nginx proxy_cache, req/s")
    for r in (s, n):
        upr = r.get("upstream_requests_per_response")
        if upr is not None and upr > 0.01:
            warnings.append(f"{sc}, {r['label']}: {upr:.1%} of responses reached the upstream: not all were cache hits.")
    md = [
        "The same ~100-byte JSON object, served from the sidecar's in-memory cache (Override mode) and from nginx's "
        f"`proxy_cache` (files under bench/work, `proxy_cache_valid 200 60s`). {WRK_LINE}; both warmed first. "
        f"Checked before measuring: sidecar `Cache-Status: {res['checks']['sidecar_cache_status']}`, nginx "
        f"`X-Cache-Status: {res['checks']['nginx_cache_status']}` (`$upstream_cache_status`). During the runs, the "
        "upstream's own request counter (stub_status) says how many responses were not hits.",
        "",
        "| ratio | sidecar / nginx proxy_cache | target |",
        "|---|---:|---:|",
        f"| req/s | **{fx(res['ratios']['throughput'])}** | ≥ 1.50x |",
        f"| req/s per proxy CPU-second | {fx(res['ratios']['rps_per_cpu_second'])} | |",
        "",
        *run_table([s, n]),
        "",
        f"During its run the sidecar counted {f(hits, 0)} cache hits and {f(misses, 0)} misses "
        f"(`apipolicy_cache_lookups_total`; wrk counted {f(s['wrk']['requests'], 0)} responses, the difference being "
        f"requests still in flight when wrk stopped); the upstream saw {f(s.get('upstream_requests'), 0)} requests during "
        f"the sidecar's run and {f(n.get('upstream_requests'), 0)} during nginx's.",
    ]
    # Where each response's CPU goes: the server's own code (user) and the kernel (system: the
    # TCP read and write of the response, and delivering it to wrk over loopback).
    split = {}
    for key, r in (("sidecar", s), ("nginx", n)):
        c, rps = r["cpu"], r["wrk"]["rps"]
        if c.get("server_sys_pct") is None or not rps:
            continue
        kernel = c["server_sys_pct"] / 100 * 1e6 / rps
        total = c["server_cpu_pct"] / 100 * 1e6 / rps
        split[key] = {"user_us": total - kernel, "kernel_us": kernel, "total_us": total}
    res["cpu_per_response_us"] = split
    if len(split) == 2:
        sd, ng = split["sidecar"], split["nginx"]
        md += [
            "",
            "CPU per response, from the server's user and system time during the run (µs of one core):",
            "",
            "| target | user (server's own code) | kernel (TCP read + write) | total |",
            "|---|---:|---:|---:|",
            *(f"| {label} | {v['user_us']:.2f} µs | {v['kernel_us']:.2f} µs | {v['total_us']:.2f} µs |"
              for label, v in (("sidecar", sd), ("nginx proxy_cache", ng))),
            "",
            f"The sidecar answers a hit with one read and one write (nginx adds open, fstat, pread and close of the "
            f"cache file). The kernel's share of a hit alone is {sd['kernel_us']:.2f} µs for the sidecar: even with "
            f"no user time at all, it could serve at most {ng['total_us'] / sd['kernel_us']:.2f}x nginx's hits per "
            f"CPU-second on this machine; its user time is {sd['user_us'] / ng['user_us']:.2f}x nginx's.",
        ]
    md_sections.append((sc, "cache-hit: sidecar cache vs nginx proxy_cache", md))

# ---------------------------------------------------------------------------------------
# Scenario: gzip-hit
if "gzip-hit" in SCENARIOS:
    sc = "gzip-hit"
    s = wrk_run(f"{sc}.sidecar", "sidecar, cache + gzip", sc)
    n = wrk_run(f"{sc}.nginx", "nginx gzip on", sc)
    nc = wrk_run(f"{sc}.nginx-cache", "nginx proxy_cache + gzip on", sc)
    ident = int(facts.get(f"{sc}.identity_bytes", 0)) or None
    sizes = {k: int(facts[f"{sc}.{k}.gzip_bytes"]) for k in ("sidecar", "nginx", "nginx-cache") if f"{sc}.{k}.gzip_bytes" in facts}
    mb, ma = s["_metrics"]
    hits = prom_delta(mb, ma, "apipolicy_cache_lookups_total", route="gzip", result="hit")
    misses = prom_delta(mb, ma, "apipolicy_cache_lookups_total", route="gzip", result="miss")
    res = {
        "runs": {"sidecar": public(s), "nginx": public(n), "nginx-cache": public(nc)},
        "ratios": {
            "throughput_vs_nginx_gzip": ratio(s["wrk"]["rps"], n["wrk"]["rps"]),
            "rps_per_cpu_second_vs_nginx_gzip": ratio(s["rps_per_cpu_second"], n["rps_per_cpu_second"]),
            "throughput_vs_nginx_cache_gzip": ratio(s["wrk"]["rps"], nc["wrk"]["rps"]),
            "rps_per_cpu_second_vs_nginx_cache_gzip": ratio(s["rps_per_cpu_second"], nc["rps_per_cpu_second"]),
        },
        "checks": {
            "identity_bytes": ident,
            "gzip_bytes": sizes,
            "content_encoding": "gzip on all three (checked; gunzipped bodies equal the upstream's)",
            "sidecar_cache_status": facts.get(f"{sc}.sidecar.cache_status"),
            "sidecar_hits_during_run": hits,
            "sidecar_misses_during_run": misses,
        },
    }
    scenarios[sc] = res
    goal(sc, "gzip req/s: sidecar (cache + gzip) ÷ nginx `gzip on`", res["ratios"]["throughput_vs_nginx_gzip"], 3.0, ">=",
         "x", [s, n], note=f"per proxy CPU-second: {fx(res['ratios']['rps_per_cpu_second_vs_nginx_gzip'])}",
         short="gzip hit: sidecar ÷ nginx gzip on, req/s")
    for r, want_zero in ((s, True), (nc, True)):
        upr = r.get("upstream_requests_per_response")
        if want_zero and upr is not None and upr > 0.01:
            warnings.append(f"{sc}, {r['label']}: {upr:.1%} of responses reached the upstream: not all were cache hits.")
    gz = lambda k: f"{sizes[k]:,} B ({sizes[k] / ident:.1%})" if k in sizes and ident else "n/a"  # noqa: E731
    md = [
        f"A {f(ident, 0)}-byte JSON body, every client sending `Accept-Encoding: gzip` (wrk -H). The sidecar route has "
        "`cache: {maxAge: 60s}` and `compression: {algorithms: [gzip], minSize: 1Ki}`, so the gzipped form is made "
        "once and served from memory. nginx compresses on every response: `gzip on; gzip_types application/json; "
        "gzip_min_length 1024;` (default level 1), proxying the upstream each time, or with `proxy_cache` in front, "
        f"which still gzips every hit. {WRK_LINE}. All three were checked to answer `Content-Encoding: gzip` with a "
        "body that gunzips to the upstream's bytes.",
        "",
        "| ratio | sidecar / nginx gzip | sidecar / nginx proxy_cache + gzip | target |",
        "|---|---:|---:|---:|",
        f"| req/s | **{fx(res['ratios']['throughput_vs_nginx_gzip'])}** | {fx(res['ratios']['throughput_vs_nginx_cache_gzip'])} | ≥ 3.00x vs nginx gzip |",
        f"| req/s per proxy CPU-second | {fx(res['ratios']['rps_per_cpu_second_vs_nginx_gzip'])} | {fx(res['ratios']['rps_per_cpu_second_vs_nginx_cache_gzip'])} | |",
        "",
        *run_table([s, n, nc], extra_cols=[
            ("gzip body", lambda r: gz({"gzip-hit.sidecar": "sidecar", "gzip-hit.nginx": "nginx", "gzip-hit.nginx-cache": "nginx-cache"}[r["id"]])),
            ("bytes/response", lambda r: f(r["wrk"].get("bytes_per_response"), 0)),
        ]),
        "",
        "The sidecar compresses at gzip level 6 (a smaller body), nginx at its default level 1, the cheapest. "
        f"During its run the sidecar counted {f(hits, 0)} cache hits and {f(misses, 0)} misses "
        f"({f(s['wrk']['requests'], 0)} responses counted by wrk).",
    ]
    md_sections.append((sc, "gzip-hit: compressed once vs compressed per response", md))

# ---------------------------------------------------------------------------------------
# Scenario: ratelimit-pod


def pair_runs(sc, side, lname, llabel, plabel):
    """The ABBA runs of one side: plain.1, limited.1, limited.2, plain.2."""
    runs = {}
    for which, label in (("plain", plabel), (lname, llabel)):
        runs[which] = [wrk_run(f"{sc}.{side}-{which}.{i}", f"{label} #{i}", sc) for i in (1, 2)]
    return runs


def summarize_pair(runs, lname):
    out = {}
    for which in ("plain", lname):
        rs = runs[which]
        out[which] = {
            "rps": mean(r["wrk"]["rps"] for r in rs),
            "rps_per_cpu_second": mean(r["rps_per_cpu_second"] for r in rs),
            "rounds_rps": [r["wrk"]["rps"] for r in rs],
            "non_2xx": sum(r["wrk"]["non_2xx"] for r in rs),
            "requests": sum(r["wrk"]["requests"] or 0 for r in rs),
        }
    out["ratio"] = ratio(out[lname]["rps"], out["plain"]["rps"])
    out["ratio_per_cpu_second"] = ratio(out[lname]["rps_per_cpu_second"], out["plain"]["rps_per_cpu_second"])
    out["ratio_rounds"] = [ratio(a["wrk"]["rps"], b["wrk"]["rps"]) for a, b in zip(runs[lname], runs["plain"])]
    return out


if "ratelimit-pod" in SCENARIOS:
    sc = "ratelimit-pod"
    sr = pair_runs(sc, "sidecar", "limited", "sidecar, Pod limit", "sidecar, no limit")
    nr = pair_runs(sc, "nginx", "limited", "nginx, limit_req", "nginx, no limit")
    ss, ns = summarize_pair(sr, "limited"), summarize_pair(nr, "limited")
    allowed = sum(prom_delta(*r["_metrics"], "apipolicy_ratelimit_decisions_total", route="limited", decision="allowed") or 0
                  for r in sr["limited"])
    refused = sum(prom_delta(*r["_metrics"], "apipolicy_ratelimit_decisions_total", route="limited", decision="limited") or 0
                  for r in sr["limited"])
    res = {
        "runs": {k: [public(r) for r in v] for k, v in {"sidecar-plain": sr["plain"], "sidecar-limited": sr["limited"],
                                                        "nginx-plain": nr["plain"], "nginx-limited": nr["limited"]}.items()},
        "sidecar": ss,
        "nginx": ns,
        "ratios": {
            "sidecar_limited/sidecar_plain": ss["ratio"],
            "sidecar_limited/sidecar_plain_per_cpu_second": ss["ratio_per_cpu_second"],
            "nginx_limited/nginx_plain": ns["ratio"],
            "nginx_limited/nginx_plain_per_cpu_second": ns["ratio_per_cpu_second"],
            "sidecar_limited/nginx_limited": ratio(ss["limited"]["rps"], ns["limited"]["rps"]),
            "sidecar_limited/nginx_limited_per_cpu_second": ratio(ss["limited"]["rps_per_cpu_second"], ns["limited"]["rps_per_cpu_second"]),
        },
        "checks": {
            "sidecar_ratelimit_header": facts.get(f"{sc}.sidecar.ratelimit"),
            "sidecar_decisions_allowed": allowed,
            "sidecar_decisions_limited": refused,
            "sidecar_limited_requests": ss["limited"]["requests"],
        },
    }
    scenarios[sc] = res
    goal(sc, "limited route keeps ≥ 95% of pass-through req/s (sidecar, Pod TokenBucket)", ss["ratio"], 0.95, ">=", "x",
         sr["plain"] + sr["limited"], note=f"per proxy CPU-second: {fx(ss['ratio_per_cpu_second'])}; rounds: "
         + ", ".join(fx(x) for x in ss["ratio_rounds"]), short="Pod limit: limited ÷ plain req/s (sidecar)")
    for label, sm in (("sidecar", ss), ("nginx", ns)):
        if sm["limited"]["non_2xx"]:
            warnings.append(f"{sc}: the {label} limited route refused {sm['limited']['non_2xx']} requests: the limit was not "
                            "high enough to allow everything, so the comparison is off.")
    r = res["ratios"]
    md = [
        "A route with a Pod-scope token bucket so high that every request passes (`requests: 10000000, per: 1s, burst: "
        "1000000`, keyed by client IP), against the same sidecar's route without a limit; and nginx with "
        "`limit_req_zone $binary_remote_addr zone=z:10m rate=10000000r/s; limit_req zone=z burst=1000000 nodelay;` "
        f"against its pass-through location. Each side runs plain, limited, limited, plain ({DUR} each, warm-up before "
        "the first run of each URL) and the two rounds are averaged, so a drift in the machine's load hits both alike.",
        "",
        "| ratio | req/s | req/s per proxy CPU-second | rounds (req/s) | target |",
        "|---|---:|---:|---|---:|",
        f"| sidecar limited / sidecar plain | **{fx(r['sidecar_limited/sidecar_plain'])}** | {fx(r['sidecar_limited/sidecar_plain_per_cpu_second'])} "
        f"| {', '.join(fx(x) for x in ss['ratio_rounds'])} | ≥ 0.95x |",
        f"| nginx limited / nginx plain | {fx(r['nginx_limited/nginx_plain'])} | {fx(r['nginx_limited/nginx_plain_per_cpu_second'])} "
        f"| {', '.join(fx(x) for x in ns['ratio_rounds'])} | |",
        f"| sidecar limited / nginx limited | {fx(r['sidecar_limited/nginx_limited'])} | {fx(r['sidecar_limited/nginx_limited_per_cpu_second'])} | | |",
        "",
        *run_table(sr["plain"] + sr["limited"] + nr["plain"] + nr["limited"],
                   extra_cols=[("non-2xx", lambda r: f(r["wrk"]["non_2xx"], 0))]),
        "",
        f"The sidecar counted {f(allowed, 0)} allowed and {f(refused, 0)} limited decisions on the limited route during its "
        f"measured runs ({f(ss['limited']['requests'], 0)} responses); first response's header: "
        f"`RateLimit: {res['checks']['sidecar_ratelimit_header']}`.",
    ]
    md_sections.append((sc, "ratelimit-pod: the cost of a Pod-scope limit", md))

# ---------------------------------------------------------------------------------------
# Scenario: ratelimit-global
STORE_HIST = "apipolicy_ratelimit_store_duration_seconds"
if "ratelimit-global" in SCENARIOS:
    sc = "ratelimit-global"
    grate = int(env("BENCH_GLOBAL_RATE", "5000"))
    wr = pair_runs(sc, "sidecar", "global", "sidecar, Global limit (Redis)", "sidecar, no limit")
    ws = summarize_pair(wr, "global")
    orr = {which: [oha_run(f"{sc}.sidecar-{which}.{i}", f"{'sidecar, Global limit' if which == 'global' else 'sidecar, no limit'} #{i}",
                           sc, grate) for i in (1, 2)]
           for which in ("plain", "global")}
    lat = {}
    for which in ("plain", "global"):
        rs = orr[which]
        # Another process can only add latency: of the two rounds, the lower percentile is the
        # less disturbed one (both rounds are in the table).
        lat[which] = {q: min((r["oha"][f"{q}_ms"] for r in rs if r["oha"][f"{q}_ms"] is not None), default=None)
                      for q in ("p50", "p90", "p99", "p99_9")}
        lat[which]["achieved_rps"] = mean(r["oha"]["achieved_rps"] for r in rs)
        lat[which]["rate_held"] = all(r["oha"]["rate_held"] for r in rs)
    held = lat["plain"]["rate_held"] and lat["global"]["rate_held"]
    added = {q: (lat["global"][q] - lat["plain"][q]) if held and lat["global"][q] is not None and lat["plain"][q] is not None
             else None for q in ("p50", "p90", "p99")}
    added_rounds = [
        (g["oha"]["p99_ms"] - p["oha"]["p99_ms"]) for g, p in zip(orr["global"], orr["plain"])
    ] if held else []

    # Store calls: histogram deltas over the runs on the Global route; errors over the whole scenario.
    def store_stats(runs):
        h = None
        for r in runs:
            h = add_hists(h, hist_delta(*r["_metrics"], STORE_HIST))
        if not h:
            return None
        return {
            "calls": h["count"],
            "mean_ms": h["sum"] / h["count"] * 1000 if h["count"] else None,
            "p50_ms": (hist_quantile(h, 0.50) or 0) * 1000 if h["count"] else None,
            "p90_ms": (hist_quantile(h, 0.90) or 0) * 1000 if h["count"] else None,
            "p99_ms": (hist_quantile(h, 0.99) or 0) * 1000 if h["count"] else None,
            "buckets": [[("+Inf" if le == float("inf") else le), c] for le, c in h["buckets"]],
        }

    store_fixed = store_stats(orr["global"])
    store_max = store_stats(wr["global"])
    all_runs = wr["plain"] + wr["global"] + orr["plain"] + orr["global"]
    err_total = sum((prom_sum_delta(*r["_metrics"], "apipolicy_ratelimit_store_errors_total") or 0) for r in all_runs)
    evalsha = 0
    evalsha_failed = 0
    for r in wr["global"] + orr["global"]:
        b, a = r["_redis"]
        if a and b:
            evalsha += a[0] - b[0]
            evalsha_failed += a[1] - b[1]
    decisions = sum((prom_delta(*r["_metrics"], "apipolicy_ratelimit_decisions_total", route="global", decision="allowed") or 0)
                    for r in wr["global"])
    res = {
        "runs": {"wrk": {k: [public(r) for r in v] for k, v in wr.items()}, "oha": {k: [public(r) for r in v] for k, v in orr.items()}},
        "max": ws,
        "decisions_per_second": ws["global"]["rps"],
        "fixed_rate": {"rate": grate, "latency_ms_best_round": lat, "added_ms": added, "added_p99_rounds_ms": added_rounds},
        "store": {"fixed_rate": store_fixed, "max_throughput": store_max, "errors": err_total,
                  "evalsha_calls": evalsha, "evalsha_failed": evalsha_failed},
        "checks": {"sidecar_ratelimit_header": facts.get(f"{sc}.sidecar.ratelimit"), "decisions_counted_in_wrk_runs": decisions,
                   "wrk_responses_on_global_route": ws["global"]["requests"]},
    }
    scenarios[sc] = res
    goal(sc, "Global decisions/s through one Redis (req/s on the Global route)", ws["global"]["rps"], 20000, ">=", "rps",
         wr["global"], note=f"{fx(ws['ratio'])} of the same sidecar without a limit", short="Global limit: decisions/s")
    goal(sc, f"p99 added by the Global limit at {grate:,} req/s", added["p99"], 1.0, "<", "ms", orr["plain"] + orr["global"],
         note=f"p50 added {fms(added['p50'])}", short=f"Global limit: added p99 at {grate:,} req/s")
    goal(sc, "rate-limit store errors during the scenario", err_total, 1, "<", "n", [], note="must be 0")
    if err_total:
        warnings.append(f"{sc}: the sidecar counted {err_total:.0f} Redis store errors; those requests were decided "
                        "locally (onStoreFailure: LocalFallback), so the decisions/s overstate what Redis sustained.")
    if decisions and ws["global"]["requests"] and abs(decisions - ws["global"]["requests"]) > 0.02 * ws["global"]["requests"]:
        warnings.append(f"{sc}: {decisions:.0f} decisions counted vs {ws['global']['requests']} wrk responses on the Global route.")
    sf, sm = store_fixed or {}, store_max or {}
    md = [
        "A route with `scope: Global` (`requests: 10000000, per: 1s, burst: 1000000`, keyed by client IP, every request "
        "allowed), its count kept in one Debian `redis-server` on loopback (`--save \"\" --appendonly no`, pinned to core 1 "
        "with wrk and the upstream), against the same sidecar's route without a limit. Max decisions/s = req/s through "
        f"the sidecar on that route (wrk: plain, Global, Global, plain, {DUR} each). Latency: oha at a fixed "
        f"{grate:,} req/s, -c {env('BENCH_OHA_CONNS')}, {env('BENCH_GLOBAL_OHA_DURATION')} per run, in the same ABBA order; "
        "added = Global − plain, each side's percentile taken from its less disturbed round (the lower one: other "
        "processes only ever add latency); both rounds are listed.",
        "",
        "| measure | value | target |",
        "|---|---:|---:|",
        f"| decisions/s (req/s on the Global route) | **{f(ws['global']['rps'], 0)}** | ≥ 20,000 |",
        f"| … ÷ the same route without a limit | {fx(ws['ratio'])} (per CPU-s {fx(ws['ratio_per_cpu_second'])}) | |",
        f"| added p50 at {grate:,} req/s | {fms(added['p50'])} | |",
        f"| added p99 at {grate:,} req/s | **{fms(added['p99'])}** (round by round: {', '.join(fms(x) for x in added_rounds) or 'n/a'}) | < 1 ms |",
        f"| Redis store errors (`apipolicy_ratelimit_store_errors_total`) | **{f(err_total, 0)}** | 0 |",
        "",
        "| oha at fixed rate | achieved req/s | p50 | p90 | p99 | p99.9 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in orr["plain"] + orr["global"]:
        o = r["oha"]
        mark = "" if o["rate_held"] else " †"
        md.append(f"| {r['label']} | {f(o['achieved_rps'], 0)}{mark} | {fms(o['p50_ms'])} | {fms(o['p90_ms'])} | {fms(o['p99_ms'])} | {fms(o['p99_9_ms'])} |")
    md += [
        "",
        *run_table(wr["plain"] + wr["global"], extra_cols=[("Redis CPU", lambda r: f"{f(r['cpu'].get('redis_cpu_pct'), 0)}%")]),
        "",
        "Redis call time as the sidecar sees it (`apipolicy_ratelimit_store_duration_seconds`, quantiles interpolated "
        "inside the histogram's buckets like PromQL's `histogram_quantile`, so only as fine as the buckets: 0.1, 0.25, "
        "0.5, 1 ms, …):",
        "",
        "| phase | calls | mean | p50 | p90 | p99 |",
        "|---|---:|---:|---:|---:|---:|",
        f"| fixed rate ({grate:,} req/s) | {f(sf.get('calls'), 0)} | {fms(sf.get('mean_ms'))} | {fms(sf.get('p50_ms'))} | {fms(sf.get('p90_ms'))} | {fms(sf.get('p99_ms'))} |",
        f"| max throughput | {f(sm.get('calls'), 0)} | {fms(sm.get('mean_ms'))} | {fms(sm.get('p50_ms'))} | {fms(sm.get('p90_ms'))} | {fms(sm.get('p99_ms'))} |",
        "",
        f"Redis executed {evalsha:,} EVALSHA calls during the Global runs ({evalsha_failed} failed); the sidecar counted "
        f"{f(decisions, 0)} allowed decisions in the wrk runs for {f(ws['global']['requests'], 0)} responses. "
        f"First response's header: `RateLimit: {res['checks']['sidecar_ratelimit_header']}`.",
    ]
    md_sections.append((sc, "ratelimit-global: a Redis-backed limit", md))

# ---------------------------------------------------------------------------------------
# Scenario: decision (micro-benchmark)
if "decision" in SCENARIOS:
    sc = "decision"
    d = read_json(f"{RAW}/decision.json", {})
    cpu = read_json(f"{RAW}/cpu-decision.json")
    rows = d.get("rows", [])
    target = d.get("target_ns", 200.0)
    res = {"bench": d, "cpu": cpu}
    scenarios[sc] = res
    noise_note = ""
    if cpu and cpu.get("other_procs_both_cores_pct") is not None and cpu["other_procs_both_cores_pct"] > 2 * NOISE_PCT:
        noise_note = f"other processes used {cpu['other_procs_both_cores_pct']}% of the two cores meanwhile"
        warnings.append(f"decision: {noise_note} (100% = one core), so the ns figures are inflated, the 2-thread ones most.")
    fake_run = [{"cpu": {"other_procs_core0_pct": (cpu or {}).get("other_procs_both_cores_pct", 0) / 2}, "server": "none"}]

    def worst(path, threads):
        xs = [r for r in rows if r["path"] == path and r["threads"] == threads]
        return max(xs, key=lambda r: r["ns_per_decision"]) if xs else None

    for path, threads, claim, short in (
        ("LocalStore::decide", 1, "Pod decision (LocalStore::decide), 1 thread, slowest algorithm",
         "decide, 1 thread"),
        ("LocalStore::decide", 2, "Pod decision (LocalStore::decide), 2 threads on the same keys, slowest algorithm",
         "decide, 2 threads"),
        ("RouteLimiter::check", 1, "full per-request path (RouteLimiter::check), 1 thread, slowest algorithm",
         "full check path, 1 thread"),
    ):
        w = worst(path, threads)
        goal(sc, claim, w["ns_per_decision"] if w else None, target, "<", "ns", fake_run,
             note=f"{w['algorithm']}" if w else "", short=f"{short} (slowest algorithm)")
    md = [
        f"`cargo bench -p apipolicy-sidecar --bench decision` (sidecar/benches/decision.rs): {d.get('keys', 1000):,} hot keys, "
        f"a limit that allows everything ({d.get('limit', {}).get('requests', 0):,} per {d.get('limit', {}).get('per_ms', 0)} ms, "
        f"burst {d.get('limit', {}).get('burst', 0):,}), {d.get('samples')} samples of ~{d.get('sample_ms')} ms after a warm-up; "
        "the median sample is shown with [min..max]. ns/decision is per thread (what one request waits); 2 threads walk "
        "the same keys. `check` is the whole per-request path of a Pod limit (client IP, key hash, store, counter, "
        "five response headers) and reads the real clock; the last row shows the clock reads alone. Not pinned: "
        "the 2-thread rows use both cores, so with other work on the machine they time-share and their ns grow."
        + (f" Note: {noise_note}." if noise_note else ""),
        "",
        "| path | algorithm | threads | ns/decision (median) | [min..max] | decisions/s (all threads) | on CPU | ns of CPU time | < 200 ns |",
        "|---|---|---:|---:|---|---:|---:|---:|:---:|",
    ]
    for r in rows:
        ok = "" if r["algorithm"] == "-" else ("yes" if r["ns_per_decision"] < target else "**no**")
        share = r.get("cpu_share")
        md.append(f"| `{r['path']}` | {r['algorithm']} | {r['threads']} | {f(r['ns_per_decision'], 1)} "
                  f"| [{f(r['ns_min'], 1)}..{f(r['ns_max'], 1)}] | {f(r['decisions_per_s'], 0)} "
                  f"| {'n/a' if share is None else f'{share:.0%}'} "
                  f"| {'n/a' if share is None else f(r['ns_per_decision'] * share, 1)} | {ok} |")
    md += ["", "\"On CPU\": the share of the measured time the bench's threads were running (the lowest of the threads, "
           "from /proc/thread-self/stat, 10 ms ticks); other processes took the rest. \"ns of CPU time\" = ns/decision × "
           "that share, an estimate of the undisturbed cost. The verdicts use the wall-clock median, the stricter figure."]
    md_sections.append((sc, "decision: rate-limit decision micro-benchmark", md))

# ---------------------------------------------------------------------------------------
# Scenario: compare (this sidecar against an earlier binary, --before)
COMPARE_KINDS = [
    ("pass-through", "pass-through (/api route, timeout 5s)"),
    ("cache-hit", "cache hit"),
    ("gzip-hit", "gzip'd cache hit (20 KiB JSON)"),
    ("limited", "Pod-limited route"),
]
# A change to the request path keeps each kind within 3 % of before (or better).
COMPARE_TOLERANCE = 0.97


def median_or_none(xs):
    return statistics.median(xs) if xs and None not in xs else None


if "compare" in SCENARIOS:
    sc = "compare"
    rounds = int(env("BENCH_COMPARE_ROUNDS", "0"))
    cdur = env("BENCH_COMPARE_DURATION", "5s")
    res = {"before_binary": env("BENCH_BEFORE_BIN"), "before_version": env("BENCH_BEFORE_VERSION"),
           "after_binary": env("BENCH_SIDECAR_BIN"), "rounds": rounds, "kinds": {}}
    rows = []
    for kind, label in COMPARE_KINDS:
        before = [wrk_run(f"{sc}.{kind}.before.{r}", f"{label}, before, round {r}", sc) for r in range(1, rounds + 1)]
        after = [wrk_run(f"{sc}.{kind}.after.{r}", f"{label}, after, round {r}", sc) for r in range(1, rounds + 1)]
        by_rps = [ratio(a["wrk"]["rps"], b["wrk"]["rps"]) for a, b in zip(after, before)]
        by_cpu = [ratio(a["rps_per_cpu_second"], b["rps_per_cpu_second"]) for a, b in zip(after, before)]
        k = {
            "before_rps": [b["wrk"]["rps"] for b in before],
            "after_rps": [a["wrk"]["rps"] for a in after],
            "ratio_rounds": by_rps,
            "ratio_per_cpu_second_rounds": by_cpu,
            "ratio_median": median_or_none(by_rps),
            "ratio_per_cpu_second_median": median_or_none(by_cpu),
            "before_p99_ms_median": median_or_none([b["wrk"].get("p99_ms") for b in before]),
            "after_p99_ms_median": median_or_none([a["wrk"].get("p99_ms") for a in after]),
            "runs": {"before": [public(b) for b in before], "after": [public(a) for a in after]},
        }
        res["kinds"][kind] = k
        goal(sc, f"{label}: after ÷ before req/s, median of {rounds} paired rounds", k["ratio_median"], COMPARE_TOLERANCE,
             ">=", "x3", before + after,
             note=f"per CPU-second {fx3(k['ratio_per_cpu_second_median'])}; rounds: " + ", ".join(fx3(x) for x in by_rps),
             short=f"{kind}: after ÷ before req/s")
        rows.append((label, k))
    scenarios[sc] = res
    md = [
        f"The sidecar under test (after: `{res['after_binary'] or 'target/dist'}`) against an earlier binary (before: "
        f"`{res['before_binary']}`, {res['before_version'] or 'version unknown'}), each running the same two configs "
        "(the baseline's pass-through policy and the feature scenarios' policy) side by side on core 0. Per kind, "
        f"{rounds} rounds of one `wrk -t1 -c{env('BENCH_WRK_CONNS')} -d{cdur}` run per binary, the order alternating "
        "(before, after, after, before, ...), so the machine's drift over the session hits both alike; the verdict is the "
        f"median of the per-round ratios, and a change to the request path should keep every kind ≥ {fx3(COMPARE_TOLERANCE)}.",
        "",
        "| kind | before req/s (median) | after req/s (median) | after ÷ before, median | per CPU-second | rounds | wrk p99 before → after |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for label, k in rows:
        md.append(
            f"| {label} | {f(statistics.median(k['before_rps']), 0)} | {f(statistics.median(k['after_rps']), 0)} "
            f"| **{fx3(k['ratio_median'])}** | {fx3(k['ratio_per_cpu_second_median'])} "
            f"| {', '.join(fx3(x) for x in k['ratio_rounds'])} "
            f"| {fms(k['before_p99_ms_median'])} → {fms(k['after_p99_ms_median'])} |"
        )
    md += ["", "Every run:", "", *run_table([r for k in res["kinds"].values() for side in ("before", "after")
                                             for r in k["runs"][side]])]
    md_sections.append((sc, "compare: this sidecar against an earlier binary", md))

# ---------------------------------------------------------------------------------------
commands = open(f"{RAW}/commands.txt").read().rstrip("\n")
scenario_seconds = {}
for kv in (env("BENCH_SCENARIO_SECONDS") or "").split(","):
    if "=" in kv:
        k, v = kv.split("=", 1)
        scenario_seconds[k] = int(v)
meta = {
    "date": env("BENCH_DATE"),
    "git_commit": env("BENCH_GIT_COMMIT"),
    "git_dirty_files": int(env("BENCH_GIT_DIRTY", "0")),
    "sidecar_binary": env("BENCH_SIDECAR_BIN"),
    "scenarios": SCENARIOS,
    "full_run": env("BENCH_FULL_RUN") == "1",
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
        "redis": env("BENCH_REDIS_VERSION"),
        "rustc": env("BENCH_RUSTC_VERSION"),
    },
    "pinning": {
        "proxy_core": int(env("BENCH_PROXY_CORE")),
        "load_core": int(env("BENCH_LOAD_CORE")),
        "description": (
            f"each proxy under test on core {env('BENCH_PROXY_CORE')} "
            "(sidecar with --threads 1, nginx worker_processes 1, haproxy nbthread 1); "
            f"wrk, oha, the upstream nginx and Redis share core {env('BENCH_LOAD_CORE')}"
        ),
    },
    "load": {
        "wrk": f"wrk -t1 -c{env('BENCH_WRK_CONNS')} -d{env('BENCH_WRK_DURATION')} --latency "
        f"(after a {env('BENCH_WARMUP_DURATION')} warm-up run)",
        "wrk_scenarios": f"wrk -t1 -c{env('BENCH_WRK_CONNS')} -d{DUR} --latency (after a {WARM} warm-up for the first run of each URL)",
        "oha_rate_rps": RATE,
        "oha_rate_fraction_of_nginx_max": float(env("BENCH_RATE_FRACTION")),
        "oha": f"oha -z {env('BENCH_OHA_DURATION')} -c {env('BENCH_OHA_CONNS')} -q {RATE} "
        "--latency-correction (keep-alive on)",
        "oha_global": f"oha -z {env('BENCH_GLOBAL_OHA_DURATION')} -c {env('BENCH_OHA_CONNS')} -q {env('BENCH_GLOBAL_RATE')} "
        "--latency-correction",
    },
    "background_before_run": json.load(open(f"{RAW}/background.json")),
    "timing_seconds": {
        "setup": int(env("BENCH_SETUP_SECONDS")),
        "measurements": int(env("BENCH_MEASURE_SECONDS")),
        "per_scenario": scenario_seconds,
        "total_until_servers_stopped": int(env("BENCH_TOTAL_SECONDS")),
    },
    "commands": commands.splitlines(),
}

bg = meta["background_before_run"]
if max(bg["core0_busy_pct"], bg["core1_busy_pct"]) > NOISE_PCT:
    warnings.insert(0,
        f"before the run, other processes already kept core 0 {bg['core0_busy_pct']}% and core 1 "
        f"{bg['core1_busy_pct']}% busy (load average {bg['loadavg']}): expect noisy numbers, rerun on a quiet machine."
    )
if meta["git_dirty_files"]:
    warnings.append(
        f"the sidecar was built from a work tree with {meta['git_dirty_files']} uncommitted change(s) "
        f"on top of {meta['git_commit']}."
    )

result = {"meta": meta, "goals": goals, "targets": targets, "ratios": ratios, "scenarios": scenarios, "warnings": warnings}
with open(f"{RESULTS}/latest.json", "w") as fh:
    json.dump(result, fh, indent=2)
    fh.write("\n")

# ---------------------------------------------------------------------------------------
# Markdown
md = []
add = md.append
title = "ApiPolicy sidecar vs nginx" + (" vs haproxy" if "baseline" in SCENARIOS else "")
add(f"# {title}: latest run")
add("")
add(
    f"{meta['date']}, sidecar at commit `{meta['git_commit']}`"
    + (f" (+{meta['git_dirty_files']} uncommitted changes)" if meta["git_dirty_files"] else "")
    + f". Scenarios: {', '.join(SCENARIOS)}"
    + ("" if meta["full_run"] else " (a partial run)")
    + f". One run on one {meta['machine']['nproc']}-core machine over loopback: "
    "**read the ratios, not the absolute times** (see bench/README.md)."
)
add("")
if goals:
    add("## Targets from the issues")
    add("")
    add("Each claim, measured in this run. \"noisy\": other processes took more than "
        f"{NOISE_PCT:.0f}% of the core that matters during a run the claim rests on (see the CPU table); "
        "such a verdict is rough, rerun on a quiet machine.")
    add("")
    add("| scenario | claim | measured | target | met? | notes |")
    add("|---|---|---:|---:|:---:|---|")
    for g in goals:
        verdict = "n/a" if g["met"] is None else ("yes" if g["met"] else "**no**")
        if g["noisy"] and g["met"] is not None:
            verdict += " (noisy)"
        tgt = ("≥ " if g["op"] == ">=" else "< ") + fmt_goal(g["target"], g["format"])
        if g["format"] == "n":
            tgt = "0"
        add(f"| {g['scenario']} | {g['claim']} | {fmt_goal(g['value'], g['format'])} | {tgt} | {verdict} | {g['note']} |")
    add("")
for _, heading, lines in md_sections:
    add(f"## {heading}")
    add("")
    md.extend(lines)
    add("")

add("## CPU use during each run")
add("")
add(
    "Our processes' CPU (server, upstream, Redis, load generator) and what *other* processes on the machine took "
    f"from each core (core busy minus ours). Before the run, with nothing of ours loaded, other processes kept core 0 "
    f"{bg['core0_busy_pct']}% and core 1 {bg['core1_busy_pct']}% busy (load average {bg['loadavg']}). "
    f"Anything above ~{NOISE_PCT:.0f}% from others on the proxy's core (core 0) means that run is noisy."
)
add("")
add("| scenario | target | run | server CPU | upstream CPU | Redis CPU | wrk/oha CPU | core 0 busy | core 1 busy | others on core 0 | others on core 1 |")
add("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
for scen, label, phase, cp, _core in cpu_rows:
    if not cp:
        continue
    add(
        f"| {scen} | {label} | {phase} | {f(cp['server_cpu_pct'], 0)}% | {f(cp['upstream_cpu_pct'], 0)}% "
        f"| {f(cp.get('redis_cpu_pct', 0), 0)}% | {f(cp['loadgen_cpu_pct'], 0)}% | {f(cp['core0_busy_pct'], 0)}% "
        f"| {f(cp['core1_busy_pct'], 0)}% | {f(cp['other_procs_core0_pct'], 0)}% | {f(cp['other_procs_core1_pct'], 0)}% |"
    )
if "decision" in SCENARIOS and scenarios["decision"].get("cpu"):
    cp = scenarios["decision"]["cpu"]
    add("")
    add(f"Decision micro-benchmark (not pinned): the bench used {f(cp['loadgen_cpu_pct'], 0)}% CPU (100% = one core) over "
        f"{cp['seconds']} s; core 0 {f(cp['core0_busy_pct'], 0)}% and core 1 {f(cp['core1_busy_pct'], 0)}% busy; "
        f"others {f(cp['other_procs_both_cores_pct'], 0)}% of the two cores together.")
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
v = meta["versions"]
add(f"- Machine: `nproc` = {mc['nproc']}, CPU: {mc['cpu_model']}, kernel: {mc['kernel']}")
add(f"- CPU pinning (taskset): {meta['pinning']['description']}.")
if v["sidecar"]:
    add(f"- Sidecar: {v['sidecar']}, git commit `{meta['git_commit']}`, binary `{meta['sidecar_binary']}`")
add(f"- nginx: {v['nginx']}")
if v["haproxy"]:
    add(f"- haproxy: {v['haproxy']}")
if v["redis"]:
    add(f"- Redis: {v['redis']}")
add(f"- wrk: {v['wrk']}")
add(f"- oha: {v['oha']}")
if v["rustc"] and "decision" in SCENARIOS:
    add(f"- rustc (decision micro-benchmark): {v['rustc']}")
if os.path.exists(f"{RAW}/check-direct.body"):
    add(
        "- Upstream: a separate nginx (worker_processes 1) answering `return 200` with a fixed "
        f"{len(open(f'{RAW}/check-direct.body', 'rb').read())}-byte JSON body"
        + (f", and a static {facts['gzip-hit.identity_bytes']}-byte JSON file under /gzip" if "gzip-hit.identity_bytes" in facts else "")
        + "; `stub_status` at /__status counts the requests that reached it."
    )
if "baseline" in SCENARIOS:
    add(
        "- Baseline nginx proxy: worker_processes 1, access_log off, upstream `keepalive 64`, "
        "`proxy_http_version 1.1`, `proxy_set_header Connection \"\"`. haproxy: nbthread 1, mode http, "
        "http-reuse always, no logging. Sidecar: `--threads 1 --access-log false --log warn`, a pass-through ApiPolicy "
        "with one `/api` prefix route."
    )
if any(s in SCENARIOS for s in ("cache-hit", "gzip-hit", "ratelimit-pod", "ratelimit-global")):
    add(
        "- Feature scenarios: a second sidecar (`--threads 1 --access-log false --log warn --cache-size 64Mi`) with one "
        "route per scenario (/api plain, /limited, /global, /cache, /gzip; policy in bench/work/sidecar-feat/policy.yaml) "
        "and a second nginx with the matching locations (bench/work/nginx-feat/nginx.conf), same upstream keep-alive "
        "settings as the baseline nginx, both on core 0."
    )
ts = meta["timing_seconds"]
add(
    f"- Run time: {ts['setup']} s setup (tools, build checks, servers), {ts['measurements']} s of measurements "
    f"({', '.join(f'{k} {v} s' for k, v in ts['per_scenario'].items())}), "
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
