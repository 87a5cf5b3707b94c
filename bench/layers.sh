#!/usr/bin/env bash
# What each resilience layer costs a pass-through request when it is configured and idle, in
# CPU per request (user and kernel time of the sidecar, from /proc) and throughput, against its
# plain twin route (bench/layers.yaml). Instructions (bench/callgrind.sh) leave the kernel out;
# this is the whole cost. The sidecar runs on one thread on core 0; nginx and wrk on core 1.
# Each round runs, per layer, its twin before it, the layer, its twin after it (the baseline is
# the twins' mean), for ROUNDS rounds; the medians of each round's ratio are reported, so a
# drift of the machine during the run touches both sides of each ratio alike.
#
# Usage: SIDECAR_BIN=target/dist/apipolicy-sidecar bash bench/layers.sh [ROUNDS [SECONDS]]
#   ROUNDS rounds (default 5) of SECONDS-long wrk runs (default 5), 16 connections.
#   Do not run it beside bench/run.sh or bench/callgrind.sh (the same ports).
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=bench/small-upstream.sh
source "$BENCH_DIR/small-upstream.sh"
WORK="$BENCH_DIR/work/layers"
ROUNDS=${1:-5}
SECS=${2:-5}
SIDECAR_BIN=${SIDECAR_BIN:-$BENCH_DIR/../target/dist/apipolicy-sidecar}
UP=127.0.0.1:18180
PROXY=127.0.0.1:18181
ADMIN=127.0.0.1:18182

for tool in nginx wrk taskset; do
  command -v "$tool" >/dev/null || { echo "$tool is missing: run bash bench/run.sh once" >&2; exit 1; }
done
rm -rf "$WORK" && mkdir -p "$WORK/tmp"
small_upstream_conf "$WORK" "$UP" >"$WORK/nginx.conf"

taskset -c 1 nginx -c "$WORK/nginx.conf" &
NGINX=$!
taskset -c 0 "$SIDECAR_BIN" --threads 1 --policy "$BENCH_DIR/layers.yaml" --upstream "http://$UP" \
  --listen "$PROXY" --admin "$ADMIN" --access-log false --log warn 2>"$WORK/sidecar.err" &
SIDECAR=$!
trap 'kill $SIDECAR $NGINX 2>/dev/null || true; wait 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do curl -fsS "http://$ADMIN/healthz" >/dev/null 2>&1 && break; sleep 0.5; done

ticks() { sed 's/^.*) //' "/proc/$SIDECAR/stat" | awk '{ print $12, $13 }'; } # utime stime
HZ=$(getconf CLK_TCK)

# run KIND PATH: one wrk run; appends "KIND requests/s cpu-µs/request user-share" to
# results.tsv.
run() {
  local t0 t1 out reqs rps
  t0=$(ticks)
  out=$(taskset -c 1 wrk -t1 -c16 -d"${SECS}s" "http://$PROXY$2")
  t1=$(ticks)
  reqs=$(awk '/requests in/ { print $1 }' <<<"$out")
  rps=$(awk '/Requests\/sec/ { print $2 }' <<<"$out")
  if grep -q 'Non-2xx' <<<"$out"; then echo "$1: non-2xx answers: $(grep 'Non-2xx' <<<"$out")" >&2; exit 1; fi
  awk -v k="$1" -v n="$reqs" -v r="$rps" -v t0="$t0" -v t1="$t1" -v hz="$HZ" 'BEGIN {
    split(t0, a, " "); split(t1, b, " "); user = b[1] - a[1]; sys = b[2] - a[2]
    printf "%s\t%.0f\t%.3f\t%.3f\n", k, r, (user + sys) / hz * 1e6 / n, user / (user + sys) }' >>"$WORK/results.tsv"
}

for layer in retry:retry-1 breaker:break-1 adaptive:adapt-1 slo-protect:guard-1; do
  prefix=${layer##*:}
  curl -fsS "http://$PROXY/plain-${prefix:0:1}/items" "http://$PROXY/$prefix/items" \
    "http://$PROXY/after-${prefix:0:1}/items" >/dev/null
done
taskset -c 1 wrk -t1 -c16 -d2s "http://$PROXY/plain-r/items" >/dev/null # warm-up
for round in $(seq 1 "$ROUNDS"); do
  for layer in retry:retry-1 breaker:break-1 adaptive:adapt-1 slo-protect:guard-1; do
    kind=${layer%%:*} prefix=${layer##*:}
    run "before-$kind" "/plain-${prefix:0:1}/items"
    run "$kind" "/$prefix/items"
    run "after-$kind" "/after-${prefix:0:1}/items"
  done
  echo "round $round of $ROUNDS done" >&2
done

python3 - "$WORK/results.tsv" <<'EOF'
import statistics, sys
rows = [l.split("\t") for l in open(sys.argv[1]).read().split("\n") if l]
by = {}
for kind, rps, cpu, _ in rows:
    by.setdefault(kind, []).append((float(rps), float(cpu)))
print(f"{'layer':<12} {'req/s':>8} {'twins':>8} {'ratio':>7}   {'CPU µs/req':>10} {'twins':>6} {'added':>7}")
for kind in ["retry", "breaker", "adaptive", "slo-protect"]:
    rounds = list(zip(by[f"before-{kind}"], by[kind], by[f"after-{kind}"]))
    twin = [((b[0] + a[0]) / 2, (b[1] + a[1]) / 2) for b, _, a in rounds]
    rps = statistics.median(l[0] for _, l, _ in rounds)
    rps_twin = statistics.median(t[0] for t in twin)
    cpu = statistics.median(l[1] for _, l, _ in rounds)
    cpu_twin = statistics.median(t[1] for t in twin)
    # The median of each round's own ratio: runs back to back share the machine's mood.
    r_rps = statistics.median(l[0] / t[0] for (_, l, _), t in zip(rounds, twin))
    r_cpu = statistics.median(l[1] / t[1] for (_, l, _), t in zip(rounds, twin))
    print(f"{kind:<12} {rps:>8.0f} {rps_twin:>8.0f} {r_rps:>6.3f}x   {cpu:>10.2f} {cpu_twin:>6.2f} {100 * (r_cpu - 1):>+6.1f} %")
user = statistics.median(float(r[3]) for r in rows)
print(f"User space is {100 * user:.0f} % of the sidecar's CPU here (median of all runs), the kernel the")
print("rest: instructions (bench/callgrind.sh) count the user-space part alone.")
EOF
