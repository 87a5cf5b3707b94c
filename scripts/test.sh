#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs what the tests need when it is missing
# (idempotent), then formatting, lints and every test tier.
set -euo pipefail
cd "$(dirname "$0")/.."

# --- what the tests need on the machine ------------------------------------------------
# Debian packages, when missing (as root, or through sudo): redis-server and redis-tools
# (Global rate limits, a Redis Cluster), prometheus (promtool, and the live checks), curl and
# python3-yaml (the chart and observability checks); chart-checks.sh adds helm v4 into
# target/tools/ and python3-pip to fetch it.
source scripts/lib.sh
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v redis-cli >/dev/null || missing+=(redis-tools)
command -v promtool >/dev/null || missing+=(prometheus)
command -v curl >/dev/null || missing+=(curl)
apt_install "${missing[@]}"
need_pyyaml

# --- tier 0: formatting and lints ------------------------------------------------------
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings

# --- tier 4a: the chart renders (helm lint and template); the Rust tests then parse every
# rendered manifest into its k8s-openapi type --------------------------------------------
scripts/chart-checks.sh

# --- tiers 1-3, and 5 when KUBECONFIG names a cluster: unit, system, operator tests ------
# The end-to-end suite is an ignored test: without a cluster it is counted as skipped, and
# said so in the closing line; with KUBECONFIG set it runs.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
e2e=()
if [[ -n ${KUBECONFIG:-} ]]; then
  echo "KUBECONFIG is set: the end-to-end suite runs against that cluster"
  e2e=(-- --include-ignored)
fi
cargo test --workspace --locked "${e2e[@]}" 2>&1 | tee "$log"

# --- tier 4b: the dashboards and alerts against a live Prometheus ------------------------
# The debug build the tests just made is enough to feed Prometheus; no release build needed.
APIPOLICY_SIDECAR_BIN=target/debug/apipolicy-sidecar scripts/observability-checks.sh

# --- one closing line for the whole run --------------------------------------------------
read -r passed failed skipped < <(awk '/^test result:/ {p += $4; f += $6; s += $8} END {print p + 0, f + 0, s + 0}' "$log")
echo "tests: $passed passed, $failed failed, $skipped skipped"
