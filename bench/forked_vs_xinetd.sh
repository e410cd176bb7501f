#!/usr/bin/env bash
# bench/forked_vs_xinetd.sh: connections per second, connect-send-receive-close, for
#   socketd `workers = "forked"` echo, socketd exec of /bin/cat (forked and threaded),
#   and Debian's xinetd running /bin/cat — in one run, on loopback only.
#
# It re-runs itself inside a private network namespace (`unshare -n`, loopback only) so that
# xinetd's per-client name lookups never leave the machine. Needs root, xinetd, and the release
# builds of socketd and bench/loadgen:
#   cargo build --release && (cd bench && cargo build --release)
#   sudo bench/forked_vs_xinetd.sh [DURATION (default 10s)] [CONNS (default 8)] [ROUNDS (default 1)]
# SOCKETD=path picks the socketd binary; SOCKETD_BEFORE=path adds the same socketd rows for a
# second binary (e.g. one built from an older commit) in the same run, for before/after tables.
# With ROUNDS > 1 the targets take turns, round after round, so load from elsewhere on the
# machine hits them alike. Ports 9101-9114 are used inside the namespace only. Every step is
# bounded in time.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION="${1:-10s}"
CONNS="${2:-8}"
ROUNDS="${3:-1}"
if [ -z "${IN_NETNS:-}" ]; then
    exec env IN_NETNS=1 unshare -n -- "$0" "$@"
fi
ip link set lo up
SOCKETD="${SOCKETD:-target/release/socketd}"
SOCKETD_BEFORE="${SOCKETD_BEFORE:-}"
LOADGEN=bench/target/release/loadgen
WORK="$(mktemp -d /tmp/socketd-bench.XXXXXX)"
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    sleep 1
    for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

# socketd_config PORT_BASE: forked echo on BASE+1, forked exec /bin/cat on BASE+2, threaded
# exec /bin/cat on BASE+4.
socketd_config() {
local base="$1"
cat <<TOML
[daemon]
shutdown_timeout = "2s"
log_level = "warn"

[[listener]]
name = "forked-echo"
protocol = "tcp"
address = "127.0.0.1:$((base + 1))"
handler = "echo"
workers = "forked"
max_workers = 256

[[listener]]
name = "forked-cat"
protocol = "tcp"
address = "127.0.0.1:$((base + 2))"
handler = "exec"
workers = "forked"
max_workers = 256
exec = { argv = ["/bin/cat"], stderr = "null" }

[[listener]]
name = "threaded-cat"
protocol = "tcp"
address = "127.0.0.1:$((base + 4))"
handler = "exec"
max_workers = 256
exec = { argv = ["/bin/cat"], stderr = "null" }
TOML
}
socketd_config 9100 > "$WORK/socketd.toml"
socketd_config 9110 > "$WORK/socketd-before.toml"

cat > "$WORK/xinetd.conf" <<XCONF
defaults
{
    instances = UNLIMITED
    per_source = UNLIMITED
    cps = 1000000 1
    log_type = FILE $WORK/xinetd.log
    log_on_success =
    log_on_failure =
}
service socketd-bench-cat
{
    type = UNLISTED
    port = 9103
    bind = 127.0.0.1
    socket_type = stream
    protocol = tcp
    wait = no
    user = root
    server = /bin/cat
    flags = NOLIBWRAP
}
XCONF

"$SOCKETD" --config "$WORK/socketd.toml" 2> "$WORK/socketd.log" &
PIDS+=($!)
PORTS="9101 9102 9103 9104"
TARGETS=("socketd forked echo:9101" "socketd forked exec /bin/cat:9102" "socketd threaded exec /bin/cat:9104")
if [ -n "$SOCKETD_BEFORE" ]; then
    "$SOCKETD_BEFORE" --config "$WORK/socketd-before.toml" 2> "$WORK/socketd-before.log" &
    PIDS+=($!)
    PORTS="$PORTS 9111 9112 9114"
    TARGETS+=("before, forked echo:9111" "before, forked exec /bin/cat:9112" "before, threaded exec /bin/cat:9114")
fi
TARGETS+=("xinetd /bin/cat:9103")
xinetd -dontfork -f "$WORK/xinetd.conf" -pidfile "$WORK/xinetd.pid" 2> "$WORK/xinetd.err" &
PIDS+=($!)
for port in $PORTS; do
    for _ in $(seq 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then break; fi
        sleep 0.1
    done
done

echo "cps, connect-send(64 B)-receive-close, $CONNS client threads, $DURATION each, $ROUNDS round(s), $(nproc) CPUs"
for round in $(seq "$ROUNDS"); do
    [ "$ROUNDS" -gt 1 ] && echo "round $round"
    for t in "${TARGETS[@]}"; do
        name="${t%%:*}"; port="${t##*:}"
        printf '%-36s ' "$name"
        timeout 120 "$LOADGEN" --mode cps --target "tcp:127.0.0.1:$port" --conns "$CONNS" --size 64 --duration "$DURATION" || echo "(loadgen failed)"
    done
done
