#!/usr/bin/env bash
# Side-by-side benchmark: upstream direct vs the ApiPolicy sidecar vs nginx vs haproxy.
#
# One run, on one machine, loopback only. Each proxy under test is pinned to core 0;
# the load generator (wrk, oha) and the upstream nginx share core 1.
# Results: bench/results/latest.{md,json,png}. Scratch (configs, pids, logs, raw output,
# installed tools): bench/work/ (gitignored). See bench/README.md.
#
# Environment knobs (all optional):
#   SIDECAR_BIN   use this sidecar binary instead of building target/release/apipolicy-sidecar
#   WRK_DURATION  max-throughput run length (default 10s); WARMUP_DURATION (default 3s)
#   OHA_DURATION  fixed-rate run length (default 10s); RATE_FRACTION (default 0.5 of nginx's max)
#   OHA_VERSION   oha version to install when oha is missing (default 1.16.0)
#   BASE_PORT     first of the loopback ports used (default 18080; 6 consecutive ports)
set -euo pipefail

START_EPOCH=$(date +%s)
BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$BENCH_DIR/.." && pwd)
WORK="$BENCH_DIR/work"
RAW="$WORK/raw"
RESULTS="$BENCH_DIR/results"

WRK_DURATION=${WRK_DURATION:-10s}
WARMUP_DURATION=${WARMUP_DURATION:-3s}
WRK_CONNS=64
OHA_DURATION=${OHA_DURATION:-10s}
OHA_CONNS=32
RATE_FRACTION=${RATE_FRACTION:-0.5}
OHA_VERSION=${OHA_VERSION:-1.16.0}
BASE_PORT=${BASE_PORT:-18080}

PROXY_CORE=0 # every proxy under test (one at a time is loaded)
LOAD_CORE=1  # wrk, oha and the upstream nginx

UPSTREAM_PORT=$BASE_PORT
SIDECAR_PORT=$((BASE_PORT + 1))
SIDECAR_ADMIN_PORT=$((BASE_PORT + 2))
NGINX_PORT=$((BASE_PORT + 3))
HAPROXY_PORT=$((BASE_PORT + 4))

PATH_UNDER_TEST=/api/bench
TARGETS=(direct sidecar nginx haproxy)
declare -A URL=(
  [direct]="http://127.0.0.1:$UPSTREAM_PORT$PATH_UNDER_TEST"
  [sidecar]="http://127.0.0.1:$SIDECAR_PORT$PATH_UNDER_TEST"
  [nginx]="http://127.0.0.1:$NGINX_PORT$PATH_UNDER_TEST"
  [haproxy]="http://127.0.0.1:$HAPROXY_PORT$PATH_UNDER_TEST"
)
declare -A PID=()     # server name -> pid of its main process
declare -A PIDFILE=() # server name -> its pid file under bench/work

log() { printf '[bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() {
  printf '[bench] ERROR: %s\n' "$*" >&2
  exit 1
}

# ---------------------------------------------------------------------------------------
# Cleanup: stop every server this script started, by pid.
# ---------------------------------------------------------------------------------------
stop_all() {
  local name pid
  for name in "${!PID[@]}"; do
    pid=${PID[$name]}
    kill -0 "$pid" 2>/dev/null || continue
    kill -TERM "$pid" 2>/dev/null || true
  done
  for name in "${!PID[@]}"; do
    pid=${PID[$name]}
    for _ in $(seq 50); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
      log "$name (pid $pid) did not stop on SIGTERM; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
  PID=()
}
trap stop_all EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------------------------------
# Tools
# ---------------------------------------------------------------------------------------
ensure_tools() {
  local missing=()
  command -v nginx >/dev/null || missing+=(nginx)
  command -v haproxy >/dev/null || missing+=(haproxy)
  command -v wrk >/dev/null || missing+=(wrk)
  command -v curl >/dev/null || missing+=(curl)
  command -v taskset >/dev/null || missing+=(util-linux)
  command -v pgrep >/dev/null || missing+=(procps)
  command -v python3 >/dev/null || missing+=(python3 python3-pip)
  if ((${#missing[@]})); then
    log "installing with apt-get: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
  # The distro nginx package enables its own service on install; we never use it.

  if command -v oha >/dev/null; then
    OHA=$(command -v oha)
  elif [[ -x "$WORK/tools/bin/oha" ]]; then
    OHA="$WORK/tools/bin/oha"
  else
    command -v cargo >/dev/null || die "oha is missing and there is no cargo to install it with"
    log "installing oha $OHA_VERSION with cargo into $WORK/tools (one-time, takes a few minutes)"
    cargo install oha --locked --version "$OHA_VERSION" --root "$WORK/tools"
    OHA="$WORK/tools/bin/oha"
  fi

  if ! python3 -c 'import matplotlib' 2>/dev/null; then
    log "installing matplotlib with pip"
    python3 -m pip install -q matplotlib
  fi
}

ensure_sidecar() {
  if [[ -n "${SIDECAR_BIN:-}" ]]; then
    [[ -x "$SIDECAR_BIN" ]] || die "SIDECAR_BIN=$SIDECAR_BIN is not an executable"
    return
  fi
  log "building the sidecar: cargo build --release -p apipolicy-sidecar"
  (cd "$REPO_DIR" && cargo build --release -p apipolicy-sidecar) ||
    die "cargo build --release -p apipolicy-sidecar failed"
  SIDECAR_BIN="$REPO_DIR/target/release/apipolicy-sidecar"
  [[ -x "$SIDECAR_BIN" ]] || die "no binary at $SIDECAR_BIN after the build"
}

# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------
# Records a command line (shell-quoted) in commands.txt.
record() {
  printf '%q ' "$@" | sed 's/ $//' >>"$RAW/commands.txt"
  printf '\n' >>"$RAW/commands.txt"
}
# Records a command line, then runs it.
logged() {
  record "$@"
  "$@"
}

port_is_free() { ! curl -s -o /dev/null --max-time 1 "http://127.0.0.1:$1/"; }

# wait_for URL NAME: retries curl until something accepts connections at URL (any status).
wait_for() {
  local url=$1 name=$2 pid=${PID[$2]:-}
  for _ in $(seq 100); do
    if curl -s -o /dev/null --max-time 1 "$url"; then return 0; fi
    if [[ -n "$pid" ]] && ! kill -0 "$pid" 2>/dev/null; then
      die "$name exited during startup; see its log in $WORK"
    fi
    sleep 0.1
  done
  die "$name did not accept connections at $url within 10s; see its log in $WORK"
}

# expect_200 URL NAME: the target must answer 200 before it is measured.
expect_200() {
  local code
  code=$(curl -s -o "$RAW/check-$2.body" -w '%{http_code}' --max-time 5 "$1" || true)
  [[ "$code" == 200 ]] || die "$2 answered HTTP '$code' (want 200) at $1; body: $(head -c 300 "$RAW/check-$2.body" 2>/dev/null)"
}

# pids_of NAME: the server's main pid and its children (nginx: master + worker).
pids_of() {
  local pid=${PID[$1]}
  echo "$pid"
  pgrep -P "$pid" || true
}

# Sum of a /proc/PID/status field (kB) over the server's processes.
status_kb() {
  local name=$1 field=$2 total=0 pid v
  for pid in $(pids_of "$name"); do
    v=$(awk -v f="$field:" '$1 == f { print $2 }' "/proc/$pid/status" 2>/dev/null || true)
    total=$((total + ${v:-0}))
  done
  echo "$total"
}

# CPU ticks (user+system) used so far by the server's processes.
cpu_ticks() {
  local name=$1 total=0 pid
  for pid in $(pids_of "$name"); do
    # Fields after the ")" of comm: state is $1, utime is $12, stime is $13.
    total=$((total + $(sed 's/^.*) //' "/proc/$pid/stat" | awk '{ print $12 + $13 }')))
  done
  echo "$total"
}

# "busy total" jiffies of one core from /proc/stat.
core_jiffies() {
  awk -v c="cpu$1" '$1 == c { busy = $2 + $3 + $4 + $7 + $8 + $9; print busy, busy + $5 + $6 }' /proc/stat
}

# ---------------------------------------------------------------------------------------
# Configs and servers
# ---------------------------------------------------------------------------------------
nginx_common() { # $1 = prefix dir
  local user_line=""
  [[ $EUID -eq 0 ]] && user_line="user root;"
  cat <<EOF
daemon off;
master_process on;
worker_processes 1;
$user_line
pid $1/nginx.pid;
error_log $1/error.log warn;
events { worker_connections 4096; }
EOF
}

nginx_temp_paths() { # $1 = prefix dir
  cat <<EOF
    client_body_temp_path $1/tmp/body;
    proxy_temp_path $1/tmp/proxy;
    fastcgi_temp_path $1/tmp/fastcgi;
    uwsgi_temp_path $1/tmp/uwsgi;
    scgi_temp_path $1/tmp/scgi;
EOF
}

write_configs() {
  local up="$WORK/nginx-upstream" px="$WORK/nginx-proxy"
  mkdir -p "$up/tmp" "$px/tmp" "$WORK/haproxy" "$WORK/sidecar"

  {
    nginx_common "$up"
    cat <<EOF
http {
    access_log off;
$(nginx_temp_paths "$up")
    keepalive_requests 1000000;
    server {
        listen 127.0.0.1:$UPSTREAM_PORT reuseport;
        location / {
            default_type application/json;
            return 200 '{"id":42,"name":"bench","status":"ok","tags":["a","b","c"],"price":12.5,"ts":"2024-01-01T00:00:00Z"}';
        }
    }
}
EOF
  } >"$up/nginx.conf"

  {
    nginx_common "$px"
    cat <<EOF
http {
    access_log off;
$(nginx_temp_paths "$px")
    keepalive_requests 1000000;
    upstream app {
        server 127.0.0.1:$UPSTREAM_PORT;
        keepalive 64;
        keepalive_requests 1000000;
    }
    server {
        listen 127.0.0.1:$NGINX_PORT;
        location / {
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
EOF
  } >"$px/nginx.conf"

  cat >"$WORK/haproxy/haproxy.cfg" <<EOF
global
    nbthread 1
    maxconn 4096

defaults
    mode http
    option http-keep-alive
    timeout connect 5s
    timeout client 30s
    timeout server 30s

frontend fe
    bind 127.0.0.1:$HAPROXY_PORT
    default_backend app

backend app
    http-reuse always
    server app 127.0.0.1:$UPSTREAM_PORT
EOF

  cat >"$WORK/sidecar/policy.yaml" <<EOF
apiVersion: apipolicy.dev/v1alpha1
kind: ApiPolicy
metadata: {name: bench, namespace: default}
spec:
  selector: {matchLabels: {app: bench}}
  upstream: {port: $UPSTREAM_PORT, timeout: 15s}
  routes:
  - name: api
    match: {path: {prefix: /api}}
    timeout: 5s
EOF
}

start_server() { # NAME CORE PIDFILE-or-"" CMD...
  local name=$1 core=$2 pidfile=$3
  shift 3
  printf '# %s\n' "$name" >>"$RAW/commands.txt"
  record taskset -c "$core" "$@"
  # Started directly (not through a function) so that $! is taskset's pid, and taskset
  # execs the server: $! is the server's own pid.
  taskset -c "$core" "$@" >"$WORK/$name.out" 2>&1 &
  PID[$name]=$!
  PIDFILE[$name]=${pidfile:-$WORK/$name.pid}
  [[ -n "$pidfile" ]] || echo "${PID[$name]}" >"${PIDFILE[$name]}"
}

start_servers() {
  local p
  for p in "$UPSTREAM_PORT" "$SIDECAR_PORT" "$SIDECAR_ADMIN_PORT" "$NGINX_PORT" "$HAPROXY_PORT"; do
    port_is_free "$p" || die "port 127.0.0.1:$p is already in use (set BASE_PORT to move the ports)"
  done
  : >"$RAW/commands.txt"
  rm -f "$WORK"/*.pid "$WORK"/*/*.pid # stale ones from an earlier run
  start_server upstream "$LOAD_CORE" "$WORK/nginx-upstream/nginx.pid" \
    nginx -p "$WORK/nginx-upstream" -e "$WORK/nginx-upstream/error.log" -c "$WORK/nginx-upstream/nginx.conf"
  wait_for "${URL[direct]}" upstream
  expect_200 "${URL[direct]}" direct

  start_server sidecar "$PROXY_CORE" "" \
    "$SIDECAR_BIN" --policy "$WORK/sidecar/policy.yaml" --upstream "http://127.0.0.1:$UPSTREAM_PORT" \
    --listen "127.0.0.1:$SIDECAR_PORT" --admin "127.0.0.1:$SIDECAR_ADMIN_PORT" \
    --threads 1 --access-log false --log warn
  start_server nginx "$PROXY_CORE" "$WORK/nginx-proxy/nginx.pid" \
    nginx -p "$WORK/nginx-proxy" -e "$WORK/nginx-proxy/error.log" -c "$WORK/nginx-proxy/nginx.conf"
  # haproxy writes no pid file in -db mode: start_server writes bench/work/haproxy.pid.
  start_server haproxy "$PROXY_CORE" "" \
    haproxy -db -f "$WORK/haproxy/haproxy.cfg"

  # The sidecar is ready when its admin /readyz says 200.
  wait_for "http://127.0.0.1:$SIDECAR_ADMIN_PORT/readyz" sidecar
  for _ in $(seq 50); do
    [[ $(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$SIDECAR_ADMIN_PORT/readyz") == 200 ]] && break
    sleep 0.1
  done
  expect_200 "http://127.0.0.1:$SIDECAR_ADMIN_PORT/readyz" sidecar-readyz
  wait_for "${URL[nginx]}" nginx
  wait_for "${URL[haproxy]}" haproxy
  local t name
  for name in "${!PID[@]}"; do
    [[ -s "${PIDFILE[$name]}" ]] || echo "${PID[$name]}" >"${PIDFILE[$name]}"
    [[ $(<"${PIDFILE[$name]}") == "${PID[$name]}" ]] ||
      die "$name: pid file ${PIDFILE[$name]} says $(<"${PIDFILE[$name]}"), but it was started as pid ${PID[$name]}"
  done
  for t in "${TARGETS[@]}"; do expect_200 "${URL[$t]}" "$t"; done
  # Same body through every target.
  for t in sidecar nginx haproxy; do
    cmp -s "$RAW/check-direct.body" "$RAW/check-$t.body" || die "$t returned a different body than the upstream"
  done
  sleep 1 # let every process settle before the idle memory reading
}

# ---------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------
proxy_of() { [[ $1 == direct ]] && echo upstream || echo "$1"; }

# CPU accounting around one load run, to tell our processes' CPU from everyone else's:
# the server's and the upstream's CPU (from /proc/PID/stat), the load generator's (the
# shell's children times, read with the `times` builtin in this shell), and how busy each
# core was (/proc/stat). Other processes on the machine = core busy minus ours.
# `times` must run in this shell itself, not in a $(...) subshell, which has no children of its own.
children_cpu_s() { # FILE written by `times`: user+sys seconds of this shell's finished children
  sed -n 2p "$1" | awk '{ s = 0; for (i = 1; i <= 2; i++) { split($i, a, "m"); s += a[1] * 60 + a[2] } print s }'
}
sample_start() { # SERVER
  S_T0=$(date +%s.%N)
  S_SRV0=$(cpu_ticks "$1")
  S_UP0=$(cpu_ticks upstream)
  times >"$RAW/.times0"
  S_C0=$(core_jiffies "$PROXY_CORE")
  S_C1=$(core_jiffies "$LOAD_CORE")
}
sample_end() { # SERVER OUT.json
  local t1 srv1 up1 gen0 gen1 c0 c1
  times >"$RAW/.times1"
  t1=$(date +%s.%N)
  srv1=$(cpu_ticks "$1")
  up1=$(cpu_ticks upstream)
  gen0=$(children_cpu_s "$RAW/.times0")
  gen1=$(children_cpu_s "$RAW/.times1")
  c0=$(core_jiffies "$PROXY_CORE")
  c1=$(core_jiffies "$LOAD_CORE")
  python3 - "$2" "$1" "$(getconf CLK_TCK)" "$S_T0" "$t1" "$S_SRV0" "$srv1" "$S_UP0" "$up1" "$gen0" "$gen1" \
    "$S_C0" "$c0" "$S_C1" "$c1" <<'PY'
import json, sys
a = sys.argv
out, server, hz = a[1], a[2], int(a[3])
secs = float(a[5]) - float(a[4])
pct = lambda t0, t1: 100.0 * (int(t1) - int(t0)) / hz / secs
def busy(x, y):
    b0, n0 = map(int, x.split()); b1, n1 = map(int, y.split())
    return 100.0 * (b1 - b0) / max(n1 - n0, 1)
server_cpu = pct(a[6], a[7])
upstream_cpu = pct(a[8], a[9])
gen_cpu = 100.0 * (float(a[11]) - float(a[10])) / secs
core0, core1 = busy(a[12], a[13]), busy(a[14], a[15])
ours0 = 0.0 if server == "upstream" else server_cpu  # proxies run on the proxy core
ours1 = upstream_cpu + gen_cpu                       # upstream + wrk/oha on the load core
r = lambda v: round(v, 1)
json.dump({
    "seconds": r(secs),
    "server_cpu_pct": r(server_cpu),
    "upstream_cpu_pct": r(upstream_cpu),
    "loadgen_cpu_pct": r(gen_cpu),
    "core0_busy_pct": r(core0),
    "core1_busy_pct": r(core1),
    "other_procs_core0_pct": r(max(core0 - ours0, 0.0)),
    "other_procs_core1_pct": r(max(core1 - ours1, 0.0)),
}, open(out, "w"))
PY
}

# CPU use of other processes with nothing of ours loaded, over 2 s.
sample_background() {
  local c0 c1 d0 d1
  c0=$(core_jiffies "$PROXY_CORE")
  c1=$(core_jiffies "$LOAD_CORE")
  sleep 2
  d0=$(core_jiffies "$PROXY_CORE")
  d1=$(core_jiffies "$LOAD_CORE")
  python3 - "$RAW/background.json" "$c0" "$d0" "$c1" "$d1" "$(cut -d' ' -f1-3 /proc/loadavg)" <<'PY'
import json, sys
a = sys.argv
def busy(x, y):
    b0, n0 = map(int, x.split()); b1, n1 = map(int, y.split())
    return round(100.0 * (b1 - b0) / max(n1 - n0, 1), 1)
json.dump({"core0_busy_pct": busy(a[2], a[3]), "core1_busy_pct": busy(a[4], a[5]), "loadavg": a[6]}, open(a[1], "w"))
PY
}

measure_wrk() {
  local t=$1 url=${URL[$1]} server
  server=$(proxy_of "$t")
  log "wrk $t: warm-up $WARMUP_DURATION, then $WRK_DURATION at -c$WRK_CONNS"
  logged taskset -c "$LOAD_CORE" wrk -t1 -c"$WRK_CONNS" -d"$WARMUP_DURATION" "$url" >"$RAW/warmup-$t.txt"
  sample_start "$server"
  logged taskset -c "$LOAD_CORE" wrk -t1 -c"$WRK_CONNS" -d"$WRK_DURATION" --latency "$url" >"$RAW/wrk-$t.txt"
  sample_end "$server" "$RAW/cpu-$t.json"
  grep -q 'Requests/sec' "$RAW/wrk-$t.txt" || die "wrk against $t printed no Requests/sec; see $RAW/wrk-$t.txt"
  if grep -q 'Non-2xx' "$RAW/wrk-$t.txt"; then
    log "WARNING: $t returned non-2xx responses under load: $(grep 'Non-2xx' "$RAW/wrk-$t.txt")"
  fi
}

measure_oha() { # TARGET RATE
  local t=$1 rate=$2 server
  server=$(proxy_of "$t")
  log "oha $t: $rate req/s for $OHA_DURATION at -c$OHA_CONNS"
  sample_start "$server"
  logged taskset -c "$LOAD_CORE" "$OHA" --no-tui --output-format json -z "$OHA_DURATION" -c "$OHA_CONNS" \
    -q "$rate" --latency-correction "${URL[$t]}" >"$RAW/oha-$t.json"
  sample_end "$server" "$RAW/cpu-oha-$t.json"
  python3 -c 'import json,sys; json.load(open(sys.argv[1]))' "$RAW/oha-$t.json" 2>/dev/null ||
    die "oha against $t did not write JSON; see $RAW/oha-$t.json"
}

# ---------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------
(($(nproc) >= 2)) || die "needs at least 2 cores (proxy on core $PROXY_CORE, load generator on core $LOAD_CORE)"
mkdir -p "$WORK" "$RESULTS"
rm -rf "$RAW" && mkdir -p "$RAW"
ensure_tools
ensure_sidecar
write_configs
log "sampling background CPU use for 2s (other processes on this machine)"
sample_background
log "starting servers (proxies on core $PROXY_CORE; upstream, wrk and oha on core $LOAD_CORE)"
start_servers

declare -A IDLE_RSS=()
for t in sidecar nginx haproxy; do IDLE_RSS[$t]=$(status_kb "$t" VmRSS); done
IDLE_RSS[direct]=$(status_kb upstream VmRSS)
MEASURE_START=$(date +%s)

for t in "${TARGETS[@]}"; do measure_wrk "$t"; done

NGINX_RPS=$(awk '/^Requests\/sec:/ { print $2 }' "$RAW/wrk-nginx.txt")
RATE=$(python3 -c "print(max(1, int(float('$NGINX_RPS') * $RATE_FRACTION)))")
log "fixed rate for latency: $RATE req/s (= $RATE_FRACTION x nginx's $NGINX_RPS req/s)"
for t in "${TARGETS[@]}"; do measure_oha "$t" "$RATE"; done

for t in "${TARGETS[@]}"; do
  server=$(proxy_of "$t")
  for f in VmRSS VmHWM; do status_kb "$server" "$f"; done | paste -sd' ' |
    awk -v idle="${IDLE_RSS[$t]}" -v n="$(pids_of "$server" | wc -l)" \
      '{ printf "{\"idle_rss_kb\": %d, \"end_rss_kb\": %d, \"peak_rss_kb\": %d, \"processes\": %d}\n", idle, $1, $2, n }' \
      >"$RAW/mem-$t.json"
done
for t in "${TARGETS[@]}"; do
  kill -0 "${PID[$(proxy_of "$t")]}" 2>/dev/null || die "$(proxy_of "$t") died during the run; see $WORK"
done
MEASURE_END=$(date +%s)

log "writing results"
stop_all
END_EPOCH=$(date +%s)

export BENCH_RAW="$RAW" BENCH_RESULTS="$RESULTS" BENCH_RATE="$RATE" BENCH_RATE_FRACTION="$RATE_FRACTION" \
  BENCH_NPROC="$(nproc)" BENCH_CPU_MODEL="$(lscpu | sed -n 's/^Model name:[[:space:]]*//p' | head -1)" \
  BENCH_KERNEL="$(uname -srm)" BENCH_NGINX_VERSION="$(nginx -v 2>&1)" \
  BENCH_HAPROXY_VERSION="$(haproxy -v 2>&1 | head -1)" BENCH_WRK_VERSION="$(wrk -v 2>&1 | head -1 || true)" \
  BENCH_OHA_VERSION="$("$OHA" --version 2>&1 | head -1)" \
  BENCH_SIDECAR_VERSION="$("$SIDECAR_BIN" --version 2>&1 | head -1)" \
  BENCH_GIT_COMMIT="$(git -C "$REPO_DIR" rev-parse --short HEAD 2>/dev/null || echo unknown)" \
  BENCH_GIT_DIRTY="$(git -C "$REPO_DIR" status --porcelain -- sidecar api Cargo.toml Cargo.lock 2>/dev/null | wc -l)" \
  BENCH_SIDECAR_BIN="$SIDECAR_BIN" BENCH_DATE="$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
  BENCH_PROXY_CORE="$PROXY_CORE" BENCH_LOAD_CORE="$LOAD_CORE" \
  BENCH_WRK_CONNS="$WRK_CONNS" BENCH_WRK_DURATION="$WRK_DURATION" BENCH_WARMUP_DURATION="$WARMUP_DURATION" \
  BENCH_OHA_CONNS="$OHA_CONNS" BENCH_OHA_DURATION="$OHA_DURATION" \
  BENCH_SETUP_SECONDS="$((MEASURE_START - START_EPOCH))" BENCH_MEASURE_SECONDS="$((MEASURE_END - MEASURE_START))" \
  BENCH_TOTAL_SECONDS="$((END_EPOCH - START_EPOCH))"
for t in "${TARGETS[@]}"; do export "BENCH_URL_${t^^}=${URL[$t]}"; done

python3 "$BENCH_DIR/report.py"
python3 "$BENCH_DIR/plot.py" "$RESULTS/latest.json" "$RESULTS/latest.png"
log "done in $(($(date +%s) - START_EPOCH))s: $RESULTS/latest.md, latest.json, latest.png"
