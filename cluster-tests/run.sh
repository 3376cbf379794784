#!/usr/bin/env bash
# Runs the cluster scenarios: builds a private network of namespaces (one per
# node, one for the test clients, one for a load balancer, one holding the
# bridge), runs the node test suite inside the client namespace, and removes
# everything afterwards.
# Usage: ./run.sh [FILE.test.mjs ...]   (default: every *.test.mjs)
#        PMC_TEST_PATTERN=REGEX ./run.sh ...   (only tests whose name matches)
# Needs root (network namespaces); without it, it says so and fails.
set -euo pipefail
cd "$(dirname "$0")"
here=$(pwd)

if [ "$(id -u)" != 0 ]; then
  echo "cluster-tests: need root to create network namespaces (ip netns); not running as root" >&2
  exit 1
fi
for tool in ip iptables; do
  command -v "$tool" >/dev/null || { echo "cluster-tests: $tool is missing" >&2; exit 1; }
done

export PUSHMESH_BIN="${PUSHMESH_BIN:-$here/../target/debug/pushmesh}"
[ -x "$PUSHMESH_BIN" ] || { echo "cluster-tests: no pushmesh binary at $PUSHMESH_BIN" >&2; exit 1; }

P=pmc$$              # unique per run: several runs never collide
NODES=4
SUBNET=10.77.$(( $$ % 200 + 20 ))
BR_NS=$P-br

cleanup() {
  for i in $(seq 1 $NODES) cli; do
    ip netns pids "$P-n$i" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    ip netns del "$P-n$i" 2>/dev/null || true
  done
  for ns in cli lb; do
    ip netns pids "$P-$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    ip netns del "$P-$ns" 2>/dev/null || true
  done
  ip netns del "$BR_NS" 2>/dev/null || true
}
trap cleanup EXIT

ip netns add "$BR_NS"
ip -n "$BR_NS" link add br0 type bridge
ip -n "$BR_NS" link set br0 up
ip -n "$BR_NS" link set lo up

attach() { # name ip-suffix
  local ns=$P-$1 host=$2
  ip netns add "$ns"
  ip -n "$ns" link set lo up
  ip link add "v$$$1" type veth peer name "b$$$1"
  ip link set "v$$$1" netns "$ns"
  ip link set "b$$$1" netns "$BR_NS"
  ip -n "$ns" link set "v$$$1" name eth0
  ip -n "$ns" addr add "$SUBNET.$host/24" dev eth0
  ip -n "$ns" link set eth0 up
  ip -n "$BR_NS" link set "b$$$1" master br0
  ip -n "$BR_NS" link set "b$$$1" up
}
for i in $(seq 1 $NODES); do attach "n$i" "$i"; done
attach cli 100
attach lb 200        # the load balancer (HAProxy) of continuity-restart.test.mjs

export PMC_PREFIX=$P PMC_SUBNET=$SUBNET PMC_NODES=$NODES
# Test files: the arguments (absolute, or relative to cluster-tests/), else all of them.
files=()
for f in "$@"; do case $f in /*) files+=("$f") ;; *) files+=("$here/$f") ;; esac; done
[ ${#files[@]} -gt 0 ] || files=("$here"/*.test.mjs)
# Raw WebSocket clients use the WHATWG WebSocket, behind a flag in Node 20.
flags=()
node --experimental-websocket -e 0 2>/dev/null && flags+=(--experimental-websocket)
# --test-timeout bounds a whole test FILE (Node runs each file in a child
# without it); each test sets its own bound with test(name, { timeout }, fn).
ip netns exec "$P-cli" node "${flags[@]}" --test --test-force-exit --test-concurrency=1 --test-timeout=900000 \
  ${PMC_TEST_PATTERN:+--test-name-pattern="$PMC_TEST_PATTERN"} "${files[@]}"
