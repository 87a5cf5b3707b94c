#!/usr/bin/env bash
# Observability checks (test tier 4): the alert rules and the Grafana dashboards are proven
# against the metrics the sidecar really exports.
#
#   1. promtool check rules and promtool test rules on deploy/prometheus/ (each alert fires when
#      it should and stays quiet when it should not).
#   2. A real sidecar (`apipolicy-sidecar demo`, the quickstart policy in front of the demo app)
#      under ~20 s of curl load: cached reads, 504s from /api/slow, 500s from /api/flaky, 429s
#      from the rate-limited login, 503s from load shedding, 404s on the default route.
#   3. promtool check metrics on a scrape of its /metrics.
#   4. A real Prometheus scrapes it every second (labels namespace=demo, pod=demo-0,
#      policy=products, as the chart's PodMonitor adds them) and evaluates the rules file. Then,
#      through the HTTP API: every PromQL expression of every dashboard (template variables
#      replaced by concrete values, the route by `.*`), every vector selector inside them, every
#      dashboard variable query, and every recording rule must return data; every rule must
#      evaluate without error; the page and ticket burn-rate alerts must be firing (the demo's
#      error rate burns the 99.9% budget far faster than 14.4x) and the dashboards' SLO state
#      must say Critical.
#
# Needs: curl, python3 with PyYAML, promtool and prometheus (Debian packages, installed when
# missing, as root or through sudo), and the sidecar binary: APIPOLICY_SIDECAR_BIN, or built with
# `cargo build --release -p apipolicy-sidecar`. Only 127.0.0.1 is used. Takes about a minute
# after the build.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

RULES=deploy/prometheus/apipolicy.rules.yaml
RULE_TESTS=deploy/prometheus/tests.yaml
DASHBOARDS=charts/apipolicy/dashboards
LOAD_SECONDS=${LOAD_SECONDS:-20}
# Metrics the dashboards may use although the sidecar does not export them yet: none (every
# metric a dashboard or rule uses must be exported and return data under the load).
COMING_METRICS=""

step() { printf '\n== %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }

# --- tools ---------------------------------------------------------------------------------
missing=()
command -v promtool >/dev/null || missing+=(prometheus)
command -v prometheus >/dev/null || missing+=(prometheus)
command -v curl >/dev/null || missing+=(curl)
source "$ROOT/scripts/lib.sh"
apt_install "${missing[@]}"
need_pyyaml
prometheus --version 2>&1 | sed -n 1p

# --- 1. the rules, offline -------------------------------------------------------------------
step "promtool check rules $RULES"
promtool check rules "$RULES"
step "promtool test rules $RULE_TESTS"
promtool test rules "$RULE_TESTS"

# --- the sidecar binary --------------------------------------------------------------------
if [[ -n ${APIPOLICY_SIDECAR_BIN:-} ]]; then
  BIN=$APIPOLICY_SIDECAR_BIN
else
  step "cargo build --release -p apipolicy-sidecar"
  cargo build --release --locked -p apipolicy-sidecar
  BIN=$ROOT/target/release/apipolicy-sidecar
fi
[[ -x $BIN ]] || fail "no sidecar binary at $BIN"

# --- processes, always stopped -------------------------------------------------------------
WORK=$(mktemp -d)
PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [[ ${KEEP_WORK:-} == 1 ]]; then echo "work dir kept: $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

read -r PROXY_PORT ADMIN_PORT PROM_PORT < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(3)]
for s in socks: s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])')
PROXY=http://127.0.0.1:$PROXY_PORT
ADMIN=http://127.0.0.1:$ADMIN_PORT
PROM=http://127.0.0.1:$PROM_PORT

wait_for() { # URL SECONDS WHAT
  local deadline=$((SECONDS + $2))
  until curl -fsS -o /dev/null --max-time 2 "$1" 2>/dev/null; do
    if ((SECONDS >= deadline)); then
      printf 'FAIL: %s did not answer at %s within %s s\n' "$3" "$1" "$2" >&2
      return 1
    fi
    sleep 0.2
  done
}

# --- 2. the sidecar under load --------------------------------------------------------------
step "the sidecar: apipolicy-sidecar demo on $PROXY, admin on $ADMIN"
# The quickstart policy with a concurrency limit on the slow route, so that load shedding
# (apipolicy_shed_total, apipolicy_route_in_flight) has series too.
python3 - examples/quickstart.yaml "$WORK/policy.yaml" <<'EOF'
import sys, yaml
policy = yaml.safe_load(open(sys.argv[1]))
route = next(r for r in policy["spec"]["routes"] if r["name"] == "slow-report")
route["concurrencyLimit"] = {"maxInFlight": 2}
yaml.safe_dump(policy, open(sys.argv[2], "w"), sort_keys=False)
EOF
timeout 300 "$BIN" demo --policy "$WORK/policy.yaml" --listen "127.0.0.1:$PROXY_PORT" \
  --admin "127.0.0.1:$ADMIN_PORT" --access-log false >"$WORK/sidecar.log" 2>&1 &
PIDS+=($!)
wait_for "$ADMIN/readyz" 20 "the sidecar" || { cat "$WORK/sidecar.log" >&2; exit 1; }
echo "ready"

step "Prometheus on $PROM: scrapes the sidecar every second, evaluates $RULES"
cp "$RULES" "$WORK/apipolicy.rules.yaml"
cat >"$WORK/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:
  - $WORK/apipolicy.rules.yaml
scrape_configs:
  - job_name: apipolicy-sidecar
    metrics_path: /metrics
    static_configs:
      - targets: ["127.0.0.1:$ADMIN_PORT"]
        labels: {namespace: demo, pod: demo-0, policy: products}
EOF
promtool check config "$WORK/prometheus.yml" >/dev/null
timeout 300 prometheus --config.file="$WORK/prometheus.yml" --storage.tsdb.path="$WORK/tsdb" \
  --web.listen-address="127.0.0.1:$PROM_PORT" --log.level=warn >"$WORK/prometheus.log" 2>&1 &
PIDS+=($!)
wait_for "$PROM/-/ready" 30 "Prometheus" || { cat "$WORK/prometheus.log" >&2; exit 1; }
echo "ready"

step "load: $LOAD_SECONDS s of curl loops (cached reads, 504, 500, 429, 503 shed, 404)"
END=$((SECONDS + LOAD_SECONDS))
hit() { curl -s -o /dev/null --max-time 5 "$@" || true; }
loop() { # PAUSE CURL-ARGS... ; bounded by time and by count
  local pause=$1 n=0
  shift
  while ((SECONDS < END && n < 20000)); do
    hit "$@"
    n=$((n + 1))
    [[ $pause == 0 ]] || sleep "$pause"
  done
}
loop 0 "$PROXY/api/products" &
PIDS+=($!)
loop 0 "$PROXY/api/products/42" -H 'Accept-Encoding: gzip' &
PIDS+=($!)
loop 0.02 -I "$PROXY/api/products/7" &
PIDS+=($!)
loop 0.01 "$PROXY/api/flaky" &
PIDS+=($!)
loop 0.05 -X POST -d 'user=demo' "$PROXY/api/auth/login" &
PIDS+=($!)
for _ in 1 2 3 4; do
  loop 0.05 "$PROXY/api/slow" &
  PIDS+=($!)
done
loop 0.1 "$PROXY/no/such/route" &
PIDS+=($!)
sleep "$LOAD_SECONDS"
curl -fsS --max-time 5 "$ADMIN/metrics" >"$WORK/metrics.txt"
wait_for "$PROXY/api/products" 10 "the sidecar after the load" || exit 1
codes=$(sed -nE 's/^apipolicy_requests_total\{code="([0-9]+)",method="([A-Z]+)",route="([^"]+)"\} ([0-9]+)$/\3 \2 \1: \4,/p' "$WORK/metrics.txt" | sort | tr '\n' ' ')
echo "responses (route method code: count): ${codes%, }"
for want in 'code="200",method="GET",route="list-products"' 'code="504",method="GET",route="slow-report"' \
  'code="503",method="GET",route="slow-report"' 'code="429",method="POST",route="login"' \
  'code="500",method="GET",route="default"' 'code="404",method="GET",route="default"'; do
  grep -qE "^apipolicy_requests_total\{$want\} [1-9]" "$WORK/metrics.txt" || fail "the load produced no response with $want"
done

# --- 3. the scrape is valid exposition -----------------------------------------------------
step "promtool check metrics (a scrape of $ADMIN/metrics)"
promtool check metrics <"$WORK/metrics.txt"
echo "ok: $(grep -c '^# TYPE' "$WORK/metrics.txt") metric families"

# --- 4. every query through Prometheus ----------------------------------------------------
step "every dashboard query, selector and variable, and every rule, through $PROM/api/v1"
python3 - "$PROM" "$DASHBOARDS" "$COMING_METRICS" <<'EOF'
import json, math, os, re, sys, time, urllib.parse, urllib.request

prom, dash_dir, coming = sys.argv[1], sys.argv[2], set(sys.argv[3].split(","))
VARS = {"namespace": "demo", "policy": "products", "route": ".*", "__rate_interval": "1m",
        "__interval": "15s", "__range": "5m"}
failures, notes = [], []


def api(path, **params):
    url = f"{prom}/api/v1/{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=20) as r:
        body = json.load(r)
    if body.get("status") != "success":
        raise RuntimeError(f"{body.get('errorType')}: {body.get('error')}")
    return body["data"]


def query(expr):
    return api("query", query=expr)["result"]


def substitute(expr):
    def repl(m):
        name = m.group(1) or m.group(2)
        return VARS.get(name, m.group(0))
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", repl, expr)


# Wait until the scrapes cover a minute's rate window and the rules have been evaluated.
deadline = time.time() + 60
while True:
    names = set(api("label/__name__/values"))
    rules = [r for g in api("rules")["groups"] for r in g["rules"]]
    up = query('count_over_time(up{job="apipolicy-sidecar"}[1m])')
    ready = (up and float(up[0]["value"][1]) >= 15
             and all(r.get("lastEvaluation", "").startswith("20") for r in rules)
             and query("policy:apipolicy_slo_burn_rate:5m"))
    if ready:
        break
    if time.time() > deadline:
        print("FAIL: Prometheus did not get a minute of scrapes and rule evaluations in time", file=sys.stderr)
        sys.exit(1)
    time.sleep(1)
names = set(api("label/__name__/values"))
exported = {n for n in names if n.startswith(("apipolicy_", "process_"))}
print(f"Prometheus has {len(exported)} sidecar metric names; {len(rules)} rules loaded")

SELECTOR = re.compile(r"\b((?:apipolicy|process)_[a-z0-9_]+)\b(\{[^{}]*\})?")


def metric_of(name):
    return re.sub(r"_(bucket|sum|count)$", "", name)


def may_be_absent(names_used):
    return {n for n in names_used if metric_of(n) in coming and n not in names}


checked_selectors = {}
queries = 0


def check_expr(where, expr, expect_label=None):
    global queries
    e = substitute(expr)
    left = re.findall(r"\$\{?(\w+)", re.sub(r"\$\{\d+\}", "", e))
    if left:
        failures.append(f"{where}: unknown template variable(s) {left} in {expr}")
        return
    used = {m.group(1) for m in SELECTOR.finditer(e)}
    unknown = {n for n in used if n not in names and metric_of(n) not in coming}
    if unknown:
        failures.append(f"{where}: uses {sorted(unknown)}, which the sidecar does not export")
        return
    absent_ok = may_be_absent(used)
    try:
        result = query(e)
        queries += 1
    except Exception as err:  # a PromQL error is a failure, whatever the metric
        failures.append(f"{where}: query failed: {err}\n      {e}")
        return
    if not result:
        if absent_ok:
            notes.append(f"{where}: no data yet: {', '.join(sorted(absent_ok))} is not exported until the cache lands")
        else:
            failures.append(f"{where}: returned no data\n      {e}")
        return
    if expect_label and not any(expect_label in r["metric"] for r in result):
        failures.append(f"{where}: no series has the label {expect_label!r}")
    if all(math.isnan(float(r["value"][1])) for r in result):
        notes.append(f"{where}: returned only NaN (no observations in the window)")
    # Every vector selector in the expression on its own: each metric and label filter matches.
    for m in SELECTOR.finditer(e):
        sel = m.group(0)
        if sel in checked_selectors:
            continue
        try:
            checked_selectors[sel] = bool(query(sel))
            queries += 1
        except Exception as err:
            failures.append(f"{where}: selector {sel} failed: {err}")
            continue
        if not checked_selectors[sel] and not may_be_absent({m.group(1)}):
            failures.append(f"{where}: selector {sel} matches no series")


def panels(ps):
    for p in ps:
        yield p
        yield from panels(p.get("panels", []))


dash_files = sorted(f for f in os.listdir(dash_dir) if f.endswith(".json"))
n_targets = 0
for f in dash_files:
    d = json.load(open(os.path.join(dash_dir, f)))
    for v in d.get("templating", {}).get("list", []):
        if v.get("type") != "query":
            continue
        q = v["query"]["query"] if isinstance(v.get("query"), dict) else v.get("query", "")
        m = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\)\s*", q, re.S)
        if not m:
            failures.append(f"{f}: variable {v['name']}: not a label_values() query: {q}")
            continue
        check_expr(f"{f}: variable ${v['name']}", m.group(1), expect_label=m.group(2))
    for p in panels(d.get("panels", [])):
        for t in p.get("targets", []):
            if "expr" in t:
                n_targets += 1
                check_expr(f"{f}: panel {p.get('title')!r} {t.get('refId')}", t["expr"])

# Recording rules: each evaluated without error and its series has data; alerts evaluate too.
n_records = 0
for r in rules:
    name = r.get("name")
    if r.get("health") != "ok":
        failures.append(f"rule {name}: health {r.get('health')}: {r.get('lastError')}")
    if r["type"] == "recording":
        n_records += 1
        if not query(name):
            failures.append(f"recording rule {name}: no data\n      {r['query']}")

# The demo's error rate (500s one request in five on /api/flaky, 504s on /api/slow) burns a
# 99.9% availability budget far beyond 14.4x: both burn-rate alerts fire, the others do not.
alerts = api("alerts")["alerts"]
def firing(name):
    return [a for a in alerts if a["labels"].get("alertname") == name and a["state"] == "firing"]
for name in ("ApiPolicySLOBurnRateCritical", "ApiPolicySLOBurnRateWarning"):
    got = firing(name)
    want = {"namespace": "demo", "policy": "products", "slo": "availability"}
    if not any(all(a["labels"].get(k) == v for k, v in want.items()) for a in got):
        failures.append(f"alert {name} is not firing for demo/products/availability (alerts: {[a['labels'] for a in alerts]})")
for name in ("ApiPolicyConfigRefused", "ApiPolicyConfigRevisionsDiverged", "ApiPolicyHealthCheckDown"):
    if firing(name):
        failures.append(f"alert {name} fires on a healthy sidecar")
state_panel = next(p for p in panels(json.load(open(os.path.join(dash_dir, "apipolicy-overview.json")))["panels"])
                   if p.get("title") == "SLO state")
state = query(substitute(state_panel["targets"][0]["expr"]))
if [(r["metric"].get("slo"), r["value"][1]) for r in state] != [("availability", "3")]:
    failures.append(f"the SLO state panel says {state}, want availability = 3 (Critical)")
burn = query('policy:apipolicy_slo_burn_rate:5m{namespace="demo", policy="products", slo="availability"}')
sli = query('policy:apipolicy_slo_sli:ratio_rate5m{namespace="demo", policy="products", slo="availability"}')

print(f"dashboards: {len(dash_files)} files, {n_targets} panel queries, {len(checked_selectors)} distinct selectors; "
      f"{n_records} recording rules, {len(rules) - n_records} alerts; {queries} queries in all")
if burn and sli:
    print(f"demo/products/availability: SLI over 5m {float(sli[0]['value'][1]):.4f}, "
          f"burn rate over 5m {float(burn[0]['value'][1]):.1f}")
print("firing:", sorted({a["labels"]["alertname"] for a in alerts if a["state"] == "firing"}))
for n in notes:
    print(f"note: {n}")
if failures:
    print(f"\n{len(failures)} failure(s):", file=sys.stderr)
    for f in failures:
        print(f"  - {f}", file=sys.stderr)
    sys.exit(1)
print("every dashboard query, selector, variable and recording rule returned data")
EOF

step "observability checks passed"
