#!/usr/bin/env bash
# Side-by-side benchmark of the ApiPolicy sidecar against nginx (and haproxy), in scenarios:
#
#   baseline          pass-through: upstream direct vs sidecar vs nginx vs haproxy (wrk + oha + RSS)
#   cache-hit         a small JSON object from the sidecar's cache vs nginx proxy_cache
#   gzip-hit          a 20 KiB JSON body, gzip: sidecar cache+compression vs nginx `gzip on`
#                     (and vs nginx proxy_cache + gzip)
#   ratelimit-pod     a Pod-scope limit that allows everything vs the same route unlimited,
#                     in the sidecar and in nginx (limit_req)
#   ratelimit-global  a Global (Redis) limit: decisions/s and added latency at a fixed rate
#   decision          the rate-limit decision micro-benchmark (sidecar/benches/decision.rs)
#   compare           (only when asked for, with --before) this sidecar against an earlier binary:
#                     pass-through, cache hits, gzip'd hits and a Pod-limited route, in short
#                     runs alternating before/after/after/before...; the report gives the median
#                     of the per-round after ÷ before ratios. For a change to the request path.
#
# One run, on one machine, loopback only. Each proxy under test is pinned to core 0;
# the load generator (wrk, oha), the upstream nginx and Redis share core 1.
# Results: bench/results/latest.{md,json,png} for a full run; a run of some scenarios only
# writes bench/work/results/ instead, so it never replaces the full results.
# Scratch (configs, pids, logs, raw output, installed tools): bench/work/ (gitignored).
# See bench/README.md.
#
# Usage: bash bench/run.sh [--only NAME[,NAME...]]... [--before BIN] [--list]
#   (or SCENARIOS=NAME,NAME bash bench/run.sh)
#   --before BIN       compare against the sidecar binary BIN (alone: runs the compare scenario only)
#
# Environment knobs (all optional):
#   SCENARIOS          comma-separated scenarios to run (default: all); --only wins over it
#   SIDECAR_BIN        use this sidecar binary instead of building target/dist/apipolicy-sidecar
#   WRK_DURATION       baseline max-throughput run length (default 10s); WARMUP_DURATION (default 3s)
#   OHA_DURATION       baseline fixed-rate run length (default 10s); RATE_FRACTION (default 0.5 of nginx's max)
#   SCENARIO_DURATION  length of each wrk run of the other scenarios (default 6s)
#   SCENARIO_WARMUP    warm-up before the first run of each target in those scenarios (default 2s)
#   GLOBAL_RATE        fixed rate of the ratelimit-global latency runs (default 5000 req/s)
#   GLOBAL_OHA_DURATION  length of each of those runs (default 8s)
#   DECISION_BENCH_MS  time per sample of the decision micro-benchmark (default 60)
#   OHA_VERSION        oha version to install when oha is missing (default 1.16.0)
#   COMPARE_ROUNDS     rounds of the compare scenario (default 10; each runs both binaries once)
#   COMPARE_DURATION   length of each wrk run of the compare scenario (default 5s)
#   BASE_PORT          first of the loopback ports used (default 18080; 13 consecutive ports)
#   RESULTS_DIR        where latest.{md,json,png} go (default: see above)
set -euo pipefail

START_EPOCH=$(date +%s)
BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$BENCH_DIR/.." && pwd)
WORK="$BENCH_DIR/work"
RAW="$WORK/raw"

WRK_DURATION=${WRK_DURATION:-10s}
WARMUP_DURATION=${WARMUP_DURATION:-3s}
WRK_CONNS=64
OHA_DURATION=${OHA_DURATION:-10s}
OHA_CONNS=${OHA_CONNS:-128}
RATE_FRACTION=${RATE_FRACTION:-0.5}
SCENARIO_DURATION=${SCENARIO_DURATION:-6s}
SCENARIO_WARMUP=${SCENARIO_WARMUP:-2s}
GLOBAL_RATE=${GLOBAL_RATE:-5000}
GLOBAL_OHA_DURATION=${GLOBAL_OHA_DURATION:-8s}
DECISION_BENCH_MS=${DECISION_BENCH_MS:-60}
OHA_VERSION=${OHA_VERSION:-1.16.0}
BASE_PORT=${BASE_PORT:-18080}
COMPARE_ROUNDS=${COMPARE_ROUNDS:-10}
COMPARE_DURATION=${COMPARE_DURATION:-5s}
BEFORE_BIN=${BEFORE_BIN:-}

PROXY_CORE=0 # every proxy under test (one at a time is loaded)
LOAD_CORE=1  # wrk, oha, the upstream nginx and Redis

UPSTREAM_PORT=$BASE_PORT
SIDECAR_PORT=$((BASE_PORT + 1))
SIDECAR_ADMIN_PORT=$((BASE_PORT + 2))
NGINX_PORT=$((BASE_PORT + 3))
HAPROXY_PORT=$((BASE_PORT + 4))
FSIDECAR_PORT=$((BASE_PORT + 5)) # the sidecar with the feature routes (cache, gzip, limits)
FSIDECAR_ADMIN_PORT=$((BASE_PORT + 6))
FNGINX_PORT=$((BASE_PORT + 7)) # the nginx with the matching locations
REDIS_PORT=$((BASE_PORT + 8))
# The compare scenario's copies of the two sidecars, running the --before binary.
BSIDECAR_PORT=$((BASE_PORT + 9))
BSIDECAR_ADMIN_PORT=$((BASE_PORT + 10))
BFSIDECAR_PORT=$((BASE_PORT + 11))
BFSIDECAR_ADMIN_PORT=$((BASE_PORT + 12))

ALL_SCENARIOS=(baseline cache-hit gzip-hit ratelimit-pod ratelimit-global decision)
# Scenarios that run only when named (they need more than this checkout).
ASKED_SCENARIOS=(compare)
KNOWN_SCENARIOS=("${ALL_SCENARIOS[@]}" "${ASKED_SCENARIOS[@]}")

PATH_UNDER_TEST=/api/bench
TARGETS=(direct sidecar nginx haproxy)
declare -A URL=(
  [direct]="http://127.0.0.1:$UPSTREAM_PORT$PATH_UNDER_TEST"
  [sidecar]="http://127.0.0.1:$SIDECAR_PORT$PATH_UNDER_TEST"
  [nginx]="http://127.0.0.1:$NGINX_PORT$PATH_UNDER_TEST"
  [haproxy]="http://127.0.0.1:$HAPROXY_PORT$PATH_UNDER_TEST"
)
FS="http://127.0.0.1:$FSIDECAR_PORT"
FN="http://127.0.0.1:$FNGINX_PORT"
UPSTREAM_STATUS="http://127.0.0.1:$UPSTREAM_PORT/__status"
declare -A PID=()     # server name -> pid of its main process
declare -A PIDFILE=() # server name -> its pid file under bench/work

log() { printf '[bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() {
  printf '[bench] ERROR: %s\n' "$*" >&2
  exit 1
}

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
}

# ---------------------------------------------------------------------------------------
# Which scenarios
# ---------------------------------------------------------------------------------------
ONLY=()
while (($#)); do
  case $1 in
  --only)
    (($# >= 2)) || die "--only needs a scenario name (one of: ${ALL_SCENARIOS[*]})"
    IFS=, read -ra _names <<<"$2"
    ONLY+=("${_names[@]}")
    shift 2
    ;;
  --only=*)
    IFS=, read -ra _names <<<"${1#--only=}"
    ONLY+=("${_names[@]}")
    shift
    ;;
  --before)
    (($# >= 2)) || die "--before needs the path of a sidecar binary to compare against"
    BEFORE_BIN=$2
    shift 2
    ;;
  --before=*)
    BEFORE_BIN=${1#--before=}
    shift
    ;;
  --list)
    printf '%s\n' "${KNOWN_SCENARIOS[@]}"
    exit 0
    ;;
  -h | --help)
    usage
    exit 0
    ;;
  *) die "unknown argument '$1' (try --help)" ;;
  esac
done
if ((${#ONLY[@]} == 0)) && [[ -n "${SCENARIOS:-}" && "${SCENARIOS:-}" != all ]]; then
  IFS=', ' read -ra ONLY <<<"$SCENARIOS"
fi
# --before alone: the comparison is what was asked for, not a full run beside it.
if ((${#ONLY[@]} == 0)) && [[ -n "$BEFORE_BIN" ]]; then ONLY=(compare); fi
SELECTED=()
for s in "${ONLY[@]}"; do
  [[ " ${KNOWN_SCENARIOS[*]} " == *" $s "* ]] || die "unknown scenario '$s' (one of: ${KNOWN_SCENARIOS[*]})"
done
for s in "${KNOWN_SCENARIOS[@]}"; do # always in this order
  if [[ " ${ONLY[*]} " == *" $s "* ]] ||
    { ((${#ONLY[@]} == 0)) && [[ " ${ALL_SCENARIOS[*]} " == *" $s "* ]]; }; then SELECTED+=("$s"); fi
done
wants() { [[ " ${SELECTED[*]} " == *" $1 "* ]]; }
NEED_BASE=0 NEED_FEAT=0 NEED_FNGINX=0 NEED_REDIS=0
wants baseline && NEED_BASE=1
for s in cache-hit gzip-hit ratelimit-pod; do wants "$s" && NEED_FEAT=1 NEED_FNGINX=1; done
wants ratelimit-global && NEED_FEAT=1 NEED_REDIS=1
NEED_BEFORE=0
if wants compare; then
  [[ -n "$BEFORE_BIN" ]] || die "the compare scenario needs the binary to compare against: --before PATH (or BEFORE_BIN=PATH)"
  [[ -x "$BEFORE_BIN" ]] || die "--before $BEFORE_BIN is not an executable file"
  NEED_BASE=1 NEED_FEAT=1 NEED_BEFORE=1
fi
NEED_SERVERS=$((NEED_BASE || NEED_FEAT))
FULL_RUN=$((${#SELECTED[@]} == ${#ALL_SCENARIOS[@]}))
if [[ -n "${RESULTS_DIR:-}" ]]; then
  RESULTS=$RESULTS_DIR
elif ((FULL_RUN)); then
  RESULTS="$BENCH_DIR/results"
else
  RESULTS="$WORK/results"
fi

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
  ((NEED_BASE)) && { command -v haproxy >/dev/null || missing+=(haproxy); }
  command -v wrk >/dev/null || missing+=(wrk)
  command -v curl >/dev/null || missing+=(curl)
  command -v gzip >/dev/null || missing+=(gzip)
  command -v taskset >/dev/null || missing+=(util-linux)
  command -v pgrep >/dev/null || missing+=(procps)
  command -v python3 >/dev/null || missing+=(python3 python3-pip)
  if ((NEED_REDIS)); then
    command -v redis-server >/dev/null || missing+=(redis-server)
    command -v redis-cli >/dev/null || missing+=(redis-tools)
  fi
  if ((${#missing[@]})); then
    log "installing with apt-get: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
  # The distro nginx and redis packages may start their own services on install; we never use them.

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
  log "building the sidecar: cargo build --profile dist -p apipolicy-sidecar"
  (cd "$REPO_DIR" && cargo build --profile dist -p apipolicy-sidecar) ||
    die "cargo build --profile dist -p apipolicy-sidecar failed"
  SIDECAR_BIN="$REPO_DIR/target/dist/apipolicy-sidecar"
  [[ -x "$SIDECAR_BIN" ]] || die "no binary at $SIDECAR_BIN after the build"
}

# Built during setup, so the scenario itself only runs it.
ensure_decision_bench() {
  command -v cargo >/dev/null || die "the decision scenario needs cargo"
  log "building the decision micro-benchmark: cargo bench -p apipolicy-sidecar --bench decision --no-run"
  (cd "$REPO_DIR" && cargo bench -p apipolicy-sidecar --bench decision --no-run) ||
    die "cargo bench -p apipolicy-sidecar --bench decision --no-run failed"
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

# Something accepts TCP connections on 127.0.0.1:PORT (any protocol).
port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

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

# expect_200 URL NAME [curl args]: the target must answer 200 before it is measured.
expect_200() {
  local url=$1 name=$2 code
  shift 2
  code=$(curl -s -o "$RAW/check-$name.body" -D "$RAW/check-$name.headers" -w '%{http_code}' --max-time 5 "$@" "$url" || true)
  [[ "$code" == 200 ]] || die "$name answered HTTP '$code' (want 200) at $url; body: $(head -c 300 "$RAW/check-$name.body" 2>/dev/null)"
}

# has_header NAME REGEX: the headers of the last expect_200 NAME match (case-insensitive).
has_header() { grep -qiE "$2" "$RAW/check-$1.headers"; }

# A fact found by a check, for the report: KEY VALUE.
fact() { printf '%s\t%s\n' "$1" "$2" >>"$RAW/facts.tsv"; }

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

# CPU ticks used so far by the server's processes (0 for "none" or one not running): user and
# system time, or with a second argument "sys", the system (kernel) time alone.
cpu_ticks() {
  local name=$1 total=0 pid v fields='$12 + $13'
  [[ ${2:-} == sys ]] && fields='$13'
  [[ -n "${PID[$name]:-}" ]] || {
    echo 0
    return
  }
  for pid in $(pids_of "$name"); do
    # Fields after the ")" of comm: state is $1, utime is $12, stime is $13.
    v=$(sed 's/^.*) //' "/proc/$pid/stat" 2>/dev/null | awk "{ print $fields }" || true)
    total=$((total + ${v:-0}))
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

# The gzip-hit body: a 20 KiB JSON list of products, the same bytes on every run.
write_big_json() {
  python3 - "$1" <<'PY'
import json, sys
SIZE = 20 * 1024
items = []
def dump(pad):
    return json.dumps({"items": items, "total": len(items), "note": "x" * pad}, separators=(",", ":"))
while len(dump(0)) < SIZE - 400:
    i = len(items)
    items.append({
        "id": 1000 + i, "sku": f"SKU-{i:05d}", "name": f"Product {i}",
        "category": ["books", "garden", "tools", "toys"][i % 4], "price": round(3.5 + (i * 7.31) % 200, 2),
        "currency": "EUR", "inStock": i % 3 != 0, "tags": ["new", "sale", "eco"][: 1 + i % 3],
        "rating": round(1 + (i * 0.37) % 4, 1), "updatedAt": f"2024-01-{1 + i % 28:02d}T12:00:00Z",
    })
body = dump(SIZE - len(dump(0)))
assert len(body) == SIZE, len(body)
open(sys.argv[1], "w").write(body)
PY
}

write_configs() {
  local up="$WORK/nginx-upstream" px="$WORK/nginx-proxy" fx="$WORK/nginx-feat"
  mkdir -p "$up/tmp" "$up/www" "$px/tmp" "$fx/tmp" "$WORK/haproxy" "$WORK/sidecar" "$WORK/sidecar-feat" "$WORK/redis"
  rm -rf "$fx/cache" # every run starts with an empty proxy_cache
  write_big_json "$up/www/big.json"

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
        # The gzip-hit body (20 KiB of JSON, served uncompressed).
        location /gzip {
            default_type application/json;
            root $up/www;
            try_files /big.json =404;
        }
        # Requests handled so far: tells whether a cache really answered without the upstream.
        location = /__status { stub_status; }
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

  # The nginx counterpart of the feature sidecar: the same paths, the same upstream.
  {
    nginx_common "$fx"
    cat <<EOF
http {
    access_log off;
$(nginx_temp_paths "$fx")
    keepalive_requests 1000000;
    proxy_cache_path $fx/cache levels=1:2 keys_zone=bench:10m max_size=64m inactive=10m use_temp_path=off;
    limit_req_zone \$binary_remote_addr zone=z:10m rate=10000000r/s;
    upstream app {
        server 127.0.0.1:$UPSTREAM_PORT;
        keepalive 64;
        keepalive_requests 1000000;
    }
    server {
        listen 127.0.0.1:$FNGINX_PORT;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        # Pass-through: the reference of ratelimit-pod.
        location / {
            proxy_pass http://app;
        }
        # cache-hit
        location /cache/ {
            proxy_pass http://app;
            proxy_cache bench;
            proxy_cache_valid 200 60s;
            add_header X-Cache-Status \$upstream_cache_status always;
        }
        # gzip-hit: compressed on every response...
        location /gzip/ {
            proxy_pass http://app;
            gzip on;
            gzip_types application/json;
            gzip_min_length 1024;
        }
        # ...and with proxy_cache: nginx caches the identity body and gzips every hit again.
        location /gzip-cache/ {
            proxy_pass http://app;
            proxy_cache bench;
            proxy_cache_valid 200 60s;
            add_header X-Cache-Status \$upstream_cache_status always;
            gzip on;
            gzip_types application/json;
            gzip_min_length 1024;
        }
        # ratelimit-pod: a limit that allows everything.
        location /limited/ {
            proxy_pass http://app;
            limit_req zone=z burst=1000000 nodelay;
        }
    }
}
EOF
  } >"$fx/nginx.conf"

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

  # The feature sidecar: one route per scenario, plus the pass-through /api they compare with.
  # The Global route (and spec.redis) only when ratelimit-global runs, since it needs Redis.
  {
    cat <<EOF
apiVersion: apipolicy.dev/v1alpha1
kind: ApiPolicy
metadata: {name: bench-features, namespace: default}
spec:
  selector: {matchLabels: {app: bench}}
  upstream: {port: $UPSTREAM_PORT, timeout: 15s}
EOF
    ((NEED_REDIS)) && echo "  redis: {url: \"redis://127.0.0.1:$REDIS_PORT\"}"
    cat <<EOF
  routes:
  - name: api
    match: {path: {prefix: /api}}
    timeout: 5s
  - name: limited
    match: {path: {prefix: /limited}}
    timeout: 5s
    rateLimit: {requests: 10000000, per: 1s, burst: 1000000, scope: Pod, key: {clientIp: {}}}
EOF
    ((NEED_REDIS)) && cat <<EOF
  - name: global
    match: {path: {prefix: /global}}
    timeout: 5s
    rateLimit: {requests: 10000000, per: 1s, burst: 1000000, scope: Global, key: {clientIp: {}}}
EOF
    cat <<EOF
  - name: cache
    match: {path: {prefix: /cache}}
    timeout: 5s
    cache: {maxAge: 60s}
  - name: gzip
    match: {path: {prefix: /gzip}}
    timeout: 5s
    cache: {maxAge: 60s}
    compression: {algorithms: [gzip], minSize: 1Ki}
EOF
  } >"$WORK/sidecar-feat/policy.yaml"
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

# wait_ready NAME ADMIN_PORT: the sidecar's admin /readyz says 200.
wait_ready() {
  wait_for "http://127.0.0.1:$2/readyz" "$1"
  for _ in $(seq 50); do
    [[ $(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$2/readyz") == 200 ]] && break
    sleep 0.1
  done
  expect_200 "http://127.0.0.1:$2/readyz" "$1-readyz"
}

start_servers() {
  local p ports=("$UPSTREAM_PORT")
  ((NEED_BASE)) && ports+=("$SIDECAR_PORT" "$SIDECAR_ADMIN_PORT" "$NGINX_PORT" "$HAPROXY_PORT")
  ((NEED_FEAT)) && ports+=("$FSIDECAR_PORT" "$FSIDECAR_ADMIN_PORT")
  ((NEED_FNGINX)) && ports+=("$FNGINX_PORT")
  ((NEED_REDIS)) && ports+=("$REDIS_PORT")
  ((NEED_BEFORE)) && ports+=("$BSIDECAR_PORT" "$BSIDECAR_ADMIN_PORT" "$BFSIDECAR_PORT" "$BFSIDECAR_ADMIN_PORT")
  for p in "${ports[@]}"; do
    ! port_in_use "$p" || die "port 127.0.0.1:$p is already in use (set BASE_PORT to move the ports)"
  done
  rm -f "$WORK"/*.pid "$WORK"/*/*.pid # stale ones from an earlier run
  start_server upstream "$LOAD_CORE" "$WORK/nginx-upstream/nginx.pid" \
    nginx -p "$WORK/nginx-upstream" -e "$WORK/nginx-upstream/error.log" -c "$WORK/nginx-upstream/nginx.conf"
  wait_for "${URL[direct]}" upstream
  expect_200 "${URL[direct]}" direct

  if ((NEED_BASE)); then
    start_server sidecar "$PROXY_CORE" "" \
      "$SIDECAR_BIN" --policy "$WORK/sidecar/policy.yaml" --upstream "http://127.0.0.1:$UPSTREAM_PORT" \
      --listen "127.0.0.1:$SIDECAR_PORT" --admin "127.0.0.1:$SIDECAR_ADMIN_PORT" \
      --threads 1 --access-log false --log warn
    start_server nginx "$PROXY_CORE" "$WORK/nginx-proxy/nginx.pid" \
      nginx -p "$WORK/nginx-proxy" -e "$WORK/nginx-proxy/error.log" -c "$WORK/nginx-proxy/nginx.conf"
    # haproxy writes no pid file in -db mode: start_server writes bench/work/haproxy.pid.
    start_server haproxy "$PROXY_CORE" "" \
      haproxy -db -f "$WORK/haproxy/haproxy.cfg"
  fi
  if ((NEED_REDIS)); then
    # No persistence: the counts live in memory only, as a rate-limit Redis usually does.
    start_server redis "$LOAD_CORE" "" \
      redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no \
      --dir "$WORK/redis" --loglevel warning
    for _ in $(seq 100); do
      [[ $(redis-cli -p "$REDIS_PORT" ping 2>/dev/null) == PONG ]] && break
      kill -0 "${PID[redis]}" 2>/dev/null || die "redis-server exited during startup; see $WORK/redis.out"
      sleep 0.1
    done
    [[ $(redis-cli -p "$REDIS_PORT" ping 2>/dev/null) == PONG ]] || die "redis-server does not answer PING on $REDIS_PORT"
  fi
  if ((NEED_FEAT)); then
    start_server sidecar-feat "$PROXY_CORE" "" \
      "$SIDECAR_BIN" --policy "$WORK/sidecar-feat/policy.yaml" --upstream "http://127.0.0.1:$UPSTREAM_PORT" \
      --listen "127.0.0.1:$FSIDECAR_PORT" --admin "127.0.0.1:$FSIDECAR_ADMIN_PORT" \
      --threads 1 --access-log false --log warn --cache-size 64Mi
  fi
  if ((NEED_BEFORE)); then # the same two sidecars, same configs, from the --before binary
    start_server sidecar-before "$PROXY_CORE" "" \
      "$BEFORE_BIN" --policy "$WORK/sidecar/policy.yaml" --upstream "http://127.0.0.1:$UPSTREAM_PORT" \
      --listen "127.0.0.1:$BSIDECAR_PORT" --admin "127.0.0.1:$BSIDECAR_ADMIN_PORT" \
      --threads 1 --access-log false --log warn
    start_server sidecar-feat-before "$PROXY_CORE" "" \
      "$BEFORE_BIN" --policy "$WORK/sidecar-feat/policy.yaml" --upstream "http://127.0.0.1:$UPSTREAM_PORT" \
      --listen "127.0.0.1:$BFSIDECAR_PORT" --admin "127.0.0.1:$BFSIDECAR_ADMIN_PORT" \
      --threads 1 --access-log false --log warn --cache-size 64Mi
  fi
  if ((NEED_FNGINX)); then
    start_server nginx-feat "$PROXY_CORE" "$WORK/nginx-feat/nginx.pid" \
      nginx -p "$WORK/nginx-feat" -e "$WORK/nginx-feat/error.log" -c "$WORK/nginx-feat/nginx.conf"
  fi

  if ((NEED_BASE)); then
    wait_ready sidecar "$SIDECAR_ADMIN_PORT"
    wait_for "${URL[nginx]}" nginx
    wait_for "${URL[haproxy]}" haproxy
  fi
  ((NEED_FEAT)) && wait_ready sidecar-feat "$FSIDECAR_ADMIN_PORT"
  if ((NEED_BEFORE)); then
    wait_ready sidecar-before "$BSIDECAR_ADMIN_PORT"
    wait_ready sidecar-feat-before "$BFSIDECAR_ADMIN_PORT"
  fi
  ((NEED_FNGINX)) && wait_for "$FN/api/bench" nginx-feat
  local t name
  for name in "${!PID[@]}"; do
    [[ -s "${PIDFILE[$name]}" ]] || echo "${PID[$name]}" >"${PIDFILE[$name]}"
    [[ $(<"${PIDFILE[$name]}") == "${PID[$name]}" ]] ||
      die "$name: pid file ${PIDFILE[$name]} says $(<"${PIDFILE[$name]}"), but it was started as pid ${PID[$name]}"
  done
  if ((NEED_BASE)); then
    for t in "${TARGETS[@]}"; do expect_200 "${URL[$t]}" "$t"; done
    # Same body through every target.
    for t in sidecar nginx haproxy; do
      cmp -s "$RAW/check-direct.body" "$RAW/check-$t.body" || die "$t returned a different body than the upstream"
    done
  fi
  expect_200 "$UPSTREAM_STATUS" upstream-status
  grep -q '^server accepts handled requests' "$RAW/check-upstream-status.body" ||
    die "the upstream's stub_status at $UPSTREAM_STATUS is not what was expected"
  sleep 1 # let every process settle before the idle memory reading
}

# ---------------------------------------------------------------------------------------
# Checks of the feature scenarios: each side really does what is being measured.
# ---------------------------------------------------------------------------------------
same_body() { # NAME: the last check's body equals the upstream's small JSON
  cmp -s "$RAW/check-direct.body" "$RAW/check-$1.body" || die "$1 returned a different body than the upstream"
}

check_cache_hit() {
  local who url
  for who in sidecar nginx; do
    url=$([[ $who == sidecar ]] && echo "$FS/cache/bench" || echo "$FN/cache/bench")
    expect_200 "$url" "cache-hit.$who.first"
    expect_200 "$url" "cache-hit.$who"
    same_body "cache-hit.$who"
  done
  has_header cache-hit.sidecar '^cache-status:.*hit' ||
    die "the sidecar's second response on /cache/bench is not a cache hit: $(grep -i '^cache-status' "$RAW/check-cache-hit.sidecar.headers" || echo 'no Cache-Status')"
  has_header cache-hit.nginx '^x-cache-status: *HIT' ||
    die "nginx's second response on /cache/bench is not a proxy_cache HIT: $(grep -i '^x-cache-status' "$RAW/check-cache-hit.nginx.headers" || echo 'no X-Cache-Status')"
  fact cache-hit.sidecar.cache_status "$(grep -i '^cache-status' "$RAW/check-cache-hit.sidecar.headers" | tr -d '\r' | cut -d' ' -f2-)"
  fact cache-hit.nginx.cache_status "$(grep -i '^x-cache-status' "$RAW/check-cache-hit.nginx.headers" | tr -d '\r' | cut -d' ' -f2-)"
}

check_gzip_hit() {
  local who url big="$WORK/nginx-upstream/www/big.json"
  fact gzip-hit.identity_bytes "$(stat -c %s "$big")"
  for who in sidecar nginx nginx-cache; do
    case $who in
    sidecar) url="$FS/gzip/bench" ;;
    nginx) url="$FN/gzip/bench" ;;
    nginx-cache) url="$FN/gzip-cache/bench" ;;
    esac
    expect_200 "$url" "gzip-hit.$who.first" -H 'Accept-Encoding: gzip'
    expect_200 "$url" "gzip-hit.$who" -H 'Accept-Encoding: gzip'
    has_header "gzip-hit.$who" '^content-encoding: *gzip' ||
      die "$who did not gzip $url for Accept-Encoding: gzip; headers: $(tr -d '\r' <"$RAW/check-gzip-hit.$who.headers" | paste -sd'|')"
    gzip -dc <"$RAW/check-gzip-hit.$who.body" | cmp -s - "$big" ||
      die "$who: the gunzipped body of $url differs from the upstream's"
    fact "gzip-hit.$who.gzip_bytes" "$(stat -c %s "$RAW/check-gzip-hit.$who.body")"
  done
  has_header gzip-hit.sidecar '^cache-status:.*hit' || die "the sidecar's second gzip response is not a cache hit"
  has_header gzip-hit.nginx-cache '^x-cache-status: *HIT' || die "nginx's second /gzip-cache/ response is not a HIT"
  fact gzip-hit.sidecar.cache_status "$(grep -i '^cache-status' "$RAW/check-gzip-hit.sidecar.headers" | tr -d '\r' | cut -d' ' -f2-)"
}

check_ratelimit_pod() {
  expect_200 "$FS/api/bench" ratelimit-pod.sidecar-plain
  same_body ratelimit-pod.sidecar-plain
  expect_200 "$FS/limited/bench" ratelimit-pod.sidecar-limited
  same_body ratelimit-pod.sidecar-limited
  has_header ratelimit-pod.sidecar-limited '^x-ratelimit-limit:' || die "the sidecar's /limited/ response carries no X-RateLimit-Limit"
  fact ratelimit-pod.sidecar.ratelimit "$(grep -i '^ratelimit:' "$RAW/check-ratelimit-pod.sidecar-limited.headers" | tr -d '\r' | cut -d' ' -f2-)"
  expect_200 "$FN/api/bench" ratelimit-pod.nginx-plain
  same_body ratelimit-pod.nginx-plain
  expect_200 "$FN/limited/bench" ratelimit-pod.nginx-limited
  same_body ratelimit-pod.nginx-limited
}

check_ratelimit_global() {
  local before after
  before=$(redis_evalsha_calls)
  expect_200 "$FS/global/bench" ratelimit-global.sidecar-global
  same_body ratelimit-global.sidecar-global
  has_header ratelimit-global.sidecar-global '^x-ratelimit-limit:' || die "the sidecar's /global/ response carries no X-RateLimit-Limit"
  after=$(redis_evalsha_calls)
  ((after > before)) || die "a request on the Global route made no EVALSHA call to Redis (before $before, after $after)"
  fact ratelimit-global.sidecar.ratelimit "$(grep -i '^ratelimit:' "$RAW/check-ratelimit-global.sidecar-global.headers" | tr -d '\r' | cut -d' ' -f2-)"
  expect_200 "$FS/api/bench" ratelimit-global.sidecar-plain
}

redis_evalsha_calls() {
  redis-cli -p "$REDIS_PORT" info commandstats | tr -d '\r' | sed -n 's/^cmdstat_evalsha:calls=\([0-9]*\),.*/\1/p' | grep . || echo 0
}

# ---------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------
proxy_of() { [[ $1 == direct ]] && echo upstream || echo "$1"; }

# CPU accounting around one load run, to tell our processes' CPU from everyone else's:
# the server's, the upstream's and Redis's CPU (from /proc/PID/stat), the load generator's (the
# shell's children times, read with the `times` builtin in this shell), and how busy each
# core was (/proc/stat). Other processes on the machine = core busy minus ours.
# `times` must run in this shell itself, not in a $(...) subshell, which has no children of its own.
children_cpu_s() { # FILE written by `times`: user+sys seconds of this shell's finished children
  sed -n 2p "$1" | awk '{ s = 0; for (i = 1; i <= 2; i++) { split($i, a, "m"); s += a[1] * 60 + a[2] } print s }'
}
sample_start() { # SERVER (or "none")
  S_T0=$(date +%s.%N)
  S_SRV0=$(cpu_ticks "$1")
  S_SYS0=$(cpu_ticks "$1" sys)
  S_UP0=$(cpu_ticks upstream)
  S_RD0=$(cpu_ticks redis)
  times >"$RAW/.times0"
  S_C0=$(core_jiffies "$PROXY_CORE")
  S_C1=$(core_jiffies "$LOAD_CORE")
}
sample_end() { # SERVER OUT.json
  local t1 srv1 sys1 up1 rd1 gen0 gen1 c0 c1
  times >"$RAW/.times1"
  t1=$(date +%s.%N)
  srv1=$(cpu_ticks "$1")
  sys1=$(cpu_ticks "$1" sys)
  up1=$(cpu_ticks upstream)
  rd1=$(cpu_ticks redis)
  gen0=$(children_cpu_s "$RAW/.times0")
  gen1=$(children_cpu_s "$RAW/.times1")
  c0=$(core_jiffies "$PROXY_CORE")
  c1=$(core_jiffies "$LOAD_CORE")
  python3 - "$2" "$1" "$(getconf CLK_TCK)" "$S_T0" "$t1" "$S_SRV0" "$srv1" "$S_UP0" "$up1" "$gen0" "$gen1" \
    "$S_C0" "$c0" "$S_C1" "$c1" "$S_RD0" "$rd1" "$S_SYS0" "$sys1" <<'PY'
import json, sys
a = sys.argv
out, server, hz = a[1], a[2], int(a[3])
secs = float(a[5]) - float(a[4])
pct = lambda t0, t1: 100.0 * (int(t1) - int(t0)) / hz / secs
def busy(x, y):
    b0, n0 = map(int, x.split()); b1, n1 = map(int, y.split())
    return 100.0 * (b1 - b0) / max(n1 - n0, 1)
server_cpu = pct(a[6], a[7])
server_sys = pct(a[18], a[19])
upstream_cpu = pct(a[8], a[9])
redis_cpu = pct(a[16], a[17])
gen_cpu = 100.0 * (float(a[11]) - float(a[10])) / secs
core0, core1 = busy(a[12], a[13]), busy(a[14], a[15])
if server == "none":  # the decision micro-benchmark: its threads may run on either core
    ours0, ours1 = 0.0, 0.0
    other_total = max(core0 + core1 - gen_cpu, 0.0)
else:
    ours0 = 0.0 if server == "upstream" else server_cpu  # proxies run on the proxy core
    ours1 = upstream_cpu + redis_cpu + gen_cpu           # upstream + Redis + wrk/oha on the load core
    other_total = None
r = lambda v: None if v is None else round(v, 1)
json.dump({
    "seconds": r(secs),
    "server_cpu_pct": r(server_cpu),
    "server_sys_pct": r(server_sys),
    "upstream_cpu_pct": r(upstream_cpu),
    "redis_cpu_pct": r(redis_cpu),
    "loadgen_cpu_pct": r(gen_cpu),
    "core0_busy_pct": r(core0),
    "core1_busy_pct": r(core1),
    "other_procs_core0_pct": r(max(core0 - ours0, 0.0)) if server != "none" else None,
    "other_procs_core1_pct": r(max(core1 - ours1, 0.0)) if server != "none" else None,
    "other_procs_both_cores_pct": r(other_total),
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

# Counters read just before and just after a measured run (not around its warm-up): requests
# the upstream handled, the feature sidecar's metrics, Redis's command counts.
snapshot() { # ID before|after SERVER
  local id=$1 when=$2 server=$3
  curl -s --max-time 2 "$UPSTREAM_STATUS" >"$RAW/upstream-$id.$when.txt" || true
  if [[ $server == sidecar-feat ]]; then
    curl -s --max-time 2 "http://127.0.0.1:$FSIDECAR_ADMIN_PORT/metrics" >"$RAW/metrics-$id.$when.txt" || true
  fi
  if [[ -n "${PID[redis]:-}" ]]; then
    redis-cli -p "$REDIS_PORT" info commandstats >"$RAW/redis-$id.$when.txt" 2>/dev/null || true
  fi
}

# run_wrk ID SERVER URL WARMUP DURATION [extra wrk args]: one max-throughput run (WARMUP 0: none).
run_wrk() {
  local id=$1 server=$2 url=$3 warm=$4 dur=$5
  shift 5
  log "wrk $id: $([[ $warm != 0 ]] && echo "warm-up $warm, then ")$dur at -c$WRK_CONNS${*:+ $*}"
  if [[ $warm != 0 ]]; then
    logged taskset -c "$LOAD_CORE" wrk -t1 -c"$WRK_CONNS" -d"$warm" "$@" "$url" >"$RAW/warmup-$id.txt"
  fi
  printf '%s\t%s\t%s\twrk\t%s\n' "$id" "$server" "$url" "$*" >>"$RAW/runs.tsv"
  snapshot "$id" before "$server"
  sample_start "$server"
  logged taskset -c "$LOAD_CORE" wrk -t1 -c"$WRK_CONNS" -d"$dur" --latency "$@" "$url" >"$RAW/wrk-$id.txt"
  sample_end "$server" "$RAW/cpu-$id.json"
  snapshot "$id" after "$server"
  grep -q 'Requests/sec' "$RAW/wrk-$id.txt" || die "wrk against $id printed no Requests/sec; see $RAW/wrk-$id.txt"
  if grep -q 'Non-2xx' "$RAW/wrk-$id.txt"; then
    log "WARNING: $id returned non-2xx responses under load: $(grep 'Non-2xx' "$RAW/wrk-$id.txt")"
  fi
}

# run_oha ID SERVER URL RATE DURATION: one fixed-rate latency run (raw files oha-ID.json, cpu-oha-ID.json).
run_oha() {
  local id=$1 server=$2 url=$3 rate=$4 dur=$5
  log "oha $id: $rate req/s for $dur at -c$OHA_CONNS"
  printf 'oha-%s\t%s\t%s\toha\t\n' "$id" "$server" "$url" >>"$RAW/runs.tsv"
  snapshot "oha-$id" before "$server"
  sample_start "$server"
  logged taskset -c "$LOAD_CORE" "$OHA" --no-tui --output-format json -z "$dur" -c "$OHA_CONNS" \
    -q "$rate" --latency-correction "$url" >"$RAW/oha-$id.json"
  sample_end "$server" "$RAW/cpu-oha-$id.json"
  snapshot "oha-$id" after "$server"
  python3 -c 'import json,sys; json.load(open(sys.argv[1]))' "$RAW/oha-$id.json" 2>/dev/null ||
    die "oha against $id did not write JSON; see $RAW/oha-$id.json"
}

alive() { # SERVER...: each is still running
  local s
  for s in "$@"; do kill -0 "${PID[$s]}" 2>/dev/null || die "$s died during the run; see $WORK"; done
}

declare -A SCENARIO_SECONDS=()

scenario_baseline() {
  local t server
  for t in "${TARGETS[@]}"; do run_wrk "$t" "$(proxy_of "$t")" "${URL[$t]}" "$WARMUP_DURATION" "$WRK_DURATION"; done
  NGINX_RPS=$(awk '/^Requests\/sec:/ { print $2 }' "$RAW/wrk-nginx.txt")
  RATE=$(python3 -c "print(max(1, int(float('$NGINX_RPS') * $RATE_FRACTION)))")
  log "fixed rate for latency: $RATE req/s (= $RATE_FRACTION x nginx's $NGINX_RPS req/s)"
  # Two rounds, the second in reverse order: a stall of the machine during one target's run
  # shows as a round far worse than the other (the report takes each target's better round).
  for t in "${TARGETS[@]}"; do run_oha "$t" "$(proxy_of "$t")" "${URL[$t]}" "$RATE" "$OHA_DURATION"; done
  for ((i = ${#TARGETS[@]} - 1; i >= 0; i--)); do
    t=${TARGETS[$i]}
    run_oha "$t.2" "$(proxy_of "$t")" "${URL[$t]}" "$RATE" "$OHA_DURATION"
  done

  for t in "${TARGETS[@]}"; do
    server=$(proxy_of "$t")
    for f in VmRSS VmHWM; do status_kb "$server" "$f"; done | paste -sd' ' |
      awk -v idle="${IDLE_RSS[$t]}" -v n="$(pids_of "$server" | wc -l)" \
        '{ printf "{\"idle_rss_kb\": %d, \"end_rss_kb\": %d, \"peak_rss_kb\": %d, \"processes\": %d}\n", idle, $1, $2, n }' \
        >"$RAW/mem-$t.json"
  done
  alive upstream sidecar nginx haproxy
}

scenario_cache_hit() {
  check_cache_hit
  run_wrk cache-hit.sidecar sidecar-feat "$FS/cache/bench" "$SCENARIO_WARMUP" "$SCENARIO_DURATION"
  run_wrk cache-hit.nginx nginx-feat "$FN/cache/bench" "$SCENARIO_WARMUP" "$SCENARIO_DURATION"
  alive sidecar-feat nginx-feat
}

scenario_gzip_hit() {
  check_gzip_hit
  local ae=(-H 'Accept-Encoding: gzip')
  run_wrk gzip-hit.sidecar sidecar-feat "$FS/gzip/bench" "$SCENARIO_WARMUP" "$SCENARIO_DURATION" "${ae[@]}"
  run_wrk gzip-hit.nginx nginx-feat "$FN/gzip/bench" "$SCENARIO_WARMUP" "$SCENARIO_DURATION" "${ae[@]}"
  run_wrk gzip-hit.nginx-cache nginx-feat "$FN/gzip-cache/bench" "$SCENARIO_WARMUP" "$SCENARIO_DURATION" "${ae[@]}"
  alive sidecar-feat nginx-feat
}

# plain, limited, limited, plain (ABBA): a drift in the machine's load over the four runs
# hits both sides alike, which matters for a claim as tight as "≥ 95%".
abba() { # SCENARIO SERVER SIDE PLAIN-URL LIMITED-URL LIMITED-NAME
  local sc=$1 server=$2 side=$3 plain=$4 limited=$5 lname=$6
  run_wrk "$sc.$side-plain.1" "$server" "$plain" "$SCENARIO_WARMUP" "$SCENARIO_DURATION"
  run_wrk "$sc.$side-$lname.1" "$server" "$limited" "$SCENARIO_WARMUP" "$SCENARIO_DURATION"
  run_wrk "$sc.$side-$lname.2" "$server" "$limited" 0 "$SCENARIO_DURATION"
  run_wrk "$sc.$side-plain.2" "$server" "$plain" 0 "$SCENARIO_DURATION"
}

scenario_ratelimit_pod() {
  check_ratelimit_pod
  abba ratelimit-pod sidecar-feat sidecar "$FS/api/bench" "$FS/limited/bench" limited
  abba ratelimit-pod nginx-feat nginx "$FN/api/bench" "$FN/limited/bench" limited
  alive sidecar-feat nginx-feat
}

scenario_ratelimit_global() {
  check_ratelimit_global
  local sc=ratelimit-global
  abba "$sc" sidecar-feat sidecar "$FS/api/bench" "$FS/global/bench" global
  log "fixed rate for the Global limit's latency: $GLOBAL_RATE req/s"
  run_oha "$sc.sidecar-plain.1" sidecar-feat "$FS/api/bench" "$GLOBAL_RATE" "$GLOBAL_OHA_DURATION"
  run_oha "$sc.sidecar-global.1" sidecar-feat "$FS/global/bench" "$GLOBAL_RATE" "$GLOBAL_OHA_DURATION"
  run_oha "$sc.sidecar-global.2" sidecar-feat "$FS/global/bench" "$GLOBAL_RATE" "$GLOBAL_OHA_DURATION"
  run_oha "$sc.sidecar-plain.2" sidecar-feat "$FS/api/bench" "$GLOBAL_RATE" "$GLOBAL_OHA_DURATION"
  alive sidecar-feat redis
}

# compare_kind KIND AFTER-SERVER BEFORE-SERVER AFTER-URL BEFORE-URL HEADER-REGEX [curl/wrk args]: both
# binaries answer the same (a decoded body equal to the other's, the header that shows the
# feature worked), then COMPARE_ROUNDS rounds of one run each, the order alternating (before,
# after, after, before, ...) so that a drift of the machine over the rounds hits both alike.
compare_kind() {
  local kind=$1 after=$2 before=$3 aurl=$4 burl=$5 want=$6 side url r warm
  shift 6
  for side in before after; do
    url=$([[ $side == after ]] && echo "$aurl" || echo "$burl")
    expect_200 "$url" "compare.$kind.$side.first" "$@"
    expect_200 "$url" "compare.$kind.$side" "$@"
    has_header "compare.$kind.$side" "$want" ||
      die "compare $kind: the $side binary's response at $url has no header matching '$want'; headers: $(tr -d '\r' <"$RAW/check-compare.$kind.$side.headers" | paste -sd'|')"
    if has_header "compare.$kind.$side" '^content-encoding: *gzip'; then
      gzip -dc <"$RAW/check-compare.$kind.$side.body" >"$RAW/check-compare.$kind.$side.decoded"
    else
      cp "$RAW/check-compare.$kind.$side.body" "$RAW/check-compare.$kind.$side.decoded"
    fi
  done
  cmp -s "$RAW/check-compare.$kind.before.decoded" "$RAW/check-compare.$kind.after.decoded" ||
    die "compare $kind: the two binaries returned different bodies at $burl and $aurl"
  local -a order
  for ((r = 1; r <= COMPARE_ROUNDS; r++)); do
    if ((r % 2)); then order=(before after); else order=(after before); fi
    for side in "${order[@]}"; do
      warm=$([[ $r == 1 ]] && echo "$SCENARIO_WARMUP" || echo 0)
      if [[ $side == after ]]; then
        run_wrk "compare.$kind.after.$r" "$after" "$aurl" "$warm" "$COMPARE_DURATION" "$@"
      else
        run_wrk "compare.$kind.before.$r" "$before" "$burl" "$warm" "$COMPARE_DURATION" "$@"
      fi
    done
  done
}

scenario_compare() {
  local bs="http://127.0.0.1:$BSIDECAR_PORT" bfs="http://127.0.0.1:$BFSIDECAR_PORT"
  log "comparing $SIDECAR_BIN (after) with $BEFORE_BIN (before): $COMPARE_ROUNDS rounds of $COMPARE_DURATION per kind"
  compare_kind pass-through sidecar sidecar-before "${URL[sidecar]}" "$bs$PATH_UNDER_TEST" '^content-type:'
  compare_kind cache-hit sidecar-feat sidecar-feat-before "$FS/cache/bench" "$bfs/cache/bench" '^cache-status:.*hit'
  compare_kind gzip-hit sidecar-feat sidecar-feat-before "$FS/gzip/bench" "$bfs/gzip/bench" '^content-encoding: *gzip' \
    -H 'Accept-Encoding: gzip'
  compare_kind limited sidecar-feat sidecar-feat-before "$FS/limited/bench" "$bfs/limited/bench" '^x-ratelimit-limit:'
  alive sidecar sidecar-before sidecar-feat sidecar-feat-before
}

scenario_decision() {
  log "decision micro-benchmark: cargo bench -p apipolicy-sidecar --bench decision"
  sample_start none
  (cd "$REPO_DIR" && logged env DECISION_BENCH_JSON="$RAW/decision.json" DECISION_BENCH_MS="$DECISION_BENCH_MS" \
    cargo bench -q -p apipolicy-sidecar --bench decision) >"$RAW/decision.txt" 2>"$RAW/decision.stderr" ||
    die "the decision micro-benchmark failed; see $RAW/decision.stderr"
  sample_end none "$RAW/cpu-decision.json"
  [[ -s "$RAW/decision.json" ]] || die "the decision micro-benchmark wrote no $RAW/decision.json"
  sed 's/^/    /' "$RAW/decision.txt" >&2
}

# ---------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------
(($(nproc) >= 2)) || die "needs at least 2 cores (proxy on core $PROXY_CORE, load generator on core $LOAD_CORE)"
mkdir -p "$WORK" "$RESULTS"
rm -rf "$RAW" && mkdir -p "$RAW"
: >"$RAW/commands.txt"
: >"$RAW/facts.tsv"
: >"$RAW/runs.tsv"
log "scenarios: ${SELECTED[*]}; results go to $RESULTS"
ensure_tools
((NEED_SERVERS)) && ensure_sidecar
wants decision && ensure_decision_bench
write_configs
log "sampling background CPU use for 2s (other processes on this machine)"
sample_background

declare -A IDLE_RSS=()
if ((NEED_SERVERS)); then
  log "starting servers (proxies on core $PROXY_CORE; upstream, Redis, wrk and oha on core $LOAD_CORE)"
  start_servers
  if ((NEED_BASE)); then
    for t in sidecar nginx haproxy; do IDLE_RSS[$t]=$(status_kb "$t" VmRSS); done
    IDLE_RSS[direct]=$(status_kb upstream VmRSS)
  fi
fi
MEASURE_START=$(date +%s)

for s in "${SELECTED[@]}"; do
  t0=$(date +%s)
  log "=== scenario $s"
  "scenario_${s//-/_}"
  SCENARIO_SECONDS[$s]=$(($(date +%s) - t0))
done
MEASURE_END=$(date +%s)

log "writing results"
stop_all
END_EPOCH=$(date +%s)

timings=""
haproxy_version="" redis_version="" sidecar_version=""
# (`head` may close the pipe early: with pipefail, `|| true` keeps that from ending the script.)
if ((NEED_BASE)); then haproxy_version=$(haproxy -v 2>&1 | head -1 || true); fi
if ((NEED_REDIS)); then redis_version=$(redis-server --version 2>&1 | head -1 || true); fi
if ((NEED_SERVERS)); then sidecar_version=$("$SIDECAR_BIN" --version 2>&1 | head -1 || true); fi
before_version=""
if ((NEED_BEFORE)); then before_version=$("$BEFORE_BIN" --version 2>&1 | head -1 || true); fi
for s in "${SELECTED[@]}"; do timings+="$s=${SCENARIO_SECONDS[$s]},"; done
export BENCH_RAW="$RAW" BENCH_RESULTS="$RESULTS" BENCH_RATE="${RATE:-0}" BENCH_RATE_FRACTION="$RATE_FRACTION" \
  BENCH_SCENARIOS="$(IFS=,; echo "${SELECTED[*]}")" BENCH_FULL_RUN="$FULL_RUN" BENCH_SCENARIO_SECONDS="${timings%,}" \
  BENCH_NPROC="$(nproc)" BENCH_CPU_MODEL="$(lscpu | sed -n 's/^Model name:[[:space:]]*//p' | head -1)" \
  BENCH_KERNEL="$(uname -srm)" BENCH_NGINX_VERSION="$(nginx -v 2>&1)" \
  BENCH_HAPROXY_VERSION="$haproxy_version" \
  BENCH_WRK_VERSION="$(wrk -v 2>&1 | head -1 || true)" \
  BENCH_OHA_VERSION="$("$OHA" --version 2>&1 | head -1)" \
  BENCH_REDIS_VERSION="$redis_version" \
  BENCH_RUSTC_VERSION="$(rustc --version 2>/dev/null || true)" \
  BENCH_SIDECAR_VERSION="$sidecar_version" \
  BENCH_GIT_COMMIT="$(git -C "$REPO_DIR" rev-parse --short HEAD 2>/dev/null || echo unknown)" \
  BENCH_GIT_DIRTY="$(git -C "$REPO_DIR" status --porcelain -- sidecar api Cargo.toml Cargo.lock 2>/dev/null | wc -l)" \
  BENCH_BEFORE_BIN="$BEFORE_BIN" BENCH_COMPARE_ROUNDS="$COMPARE_ROUNDS" BENCH_COMPARE_DURATION="$COMPARE_DURATION" \
  BENCH_BEFORE_VERSION="$before_version" \
  BENCH_SIDECAR_BIN="${SIDECAR_BIN:-}" BENCH_DATE="$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
  BENCH_PROXY_CORE="$PROXY_CORE" BENCH_LOAD_CORE="$LOAD_CORE" \
  BENCH_WRK_CONNS="$WRK_CONNS" BENCH_WRK_DURATION="$WRK_DURATION" BENCH_WARMUP_DURATION="$WARMUP_DURATION" \
  BENCH_OHA_CONNS="$OHA_CONNS" BENCH_OHA_DURATION="$OHA_DURATION" \
  BENCH_SCENARIO_DURATION="$SCENARIO_DURATION" BENCH_SCENARIO_WARMUP="$SCENARIO_WARMUP" \
  BENCH_GLOBAL_RATE="$GLOBAL_RATE" BENCH_GLOBAL_OHA_DURATION="$GLOBAL_OHA_DURATION" \
  BENCH_SETUP_SECONDS="$((MEASURE_START - START_EPOCH))" BENCH_MEASURE_SECONDS="$((MEASURE_END - MEASURE_START))" \
  BENCH_TOTAL_SECONDS="$((END_EPOCH - START_EPOCH))"
for t in "${TARGETS[@]}"; do export "BENCH_URL_${t^^}=${URL[$t]}"; done

python3 "$BENCH_DIR/report.py"
python3 "$BENCH_DIR/plot.py" "$RESULTS/latest.json" "$RESULTS/latest.png"
log "done in $(($(date +%s) - START_EPOCH))s: $RESULTS/latest.md, latest.json, latest.png"
