#!/bin/sh
# socketd's benchmark against its peers (xinetd, socat, haproxy, Python socketserver and a
# minimal epoll echo), and HTTP through each proxy to nginx. Needs root (for a private network
# namespace), cargo and python3; installs the Debian packages it needs if they are missing
# (xinetd socat haproxy nginx-light apache2-utils iproute2). Not run by CI.
#
#   bench/run.sh                 # 3 rounds of 5 s per load and server, ~8 minutes
#   BENCH_SECS=2 ROUNDS=1 bench/run.sh    # a quick look
#   BENCH_NO_BUILD=1 bench/run.sh         # use the release binaries already built
#   BENCH_ONLY=rr64mux1,cps16mux1,http32 bench/run.sh   # only these loads
#
# Everything runs inside `unshare -n` with only loopback up, so no packet can leave the
# machine whatever a peer does (xinetd resolves client addresses other than 127.0.0.1).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
if [ "${SOCKETD_BENCH_NETNS:-}" != 1 ]; then
    if [ "${BENCH_NO_BUILD:-}" != 1 ]; then
        (cd "$here/.." && cargo build --release --quiet --bin socketd)
        (cd "$here" && cargo build --release --quiet)
    fi
    missing=""
    for pair in xinetd:xinetd socat:socat haproxy:haproxy nginx:nginx-light ab:apache2-utils ip:iproute2; do
        command -v "${pair%%:*}" >/dev/null || missing="$missing ${pair#*:}"
    done
    if [ -n "$missing" ]; then
        echo "run.sh: installing$missing" >&2
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >&2
    fi
    for tool in xinetd socat haproxy nginx ab python3 ip unshare; do
        command -v "$tool" >/dev/null || { echo "run.sh: $tool is missing" >&2; exit 1; }
    done
    export SOCKETD_BENCH_NETNS=1
    exec timeout --signal=TERM --kill-after=30 3600 unshare -n -- "$0" "$@"
fi
ip link set lo up
exec python3 "$here/bench.py" "$@"
