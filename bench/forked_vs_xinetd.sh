#!/usr/bin/env bash
# bench/forked_vs_xinetd.sh: connections per second, connect-send-receive-close, for
#   socketd `workers = "forked"` echo, socketd exec of /bin/cat (forked and threaded),
#   and Debian's xinetd running /bin/cat — in one run, on loopback only.
#
# It re-runs itself inside a private network namespace (`unshare -n`, loopback only) so that
# xinetd's per-client name lookups never leave the machine. Needs root, xinetd, and the release
# builds of socketd and bench/loadgen:
#   cargo build --release && (cd bench && cargo build --release)
#   sudo bench/forked_vs_xinetd.sh [DURATION (default 10s)] [CONNS (default 8)]
# Ports 9101-9104 are used inside the namespace only. Every step is bounded in time.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION="${1:-10s}"
CONNS="${2:-8}"
if [ -z "${IN_NETNS:-}" ]; then
    exec env IN_NETNS=1 unshare -n -- "$0" "$@"
fi
ip link set lo up
SOCKETD=target/release/socketd
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

cat > "$WORK/socketd.toml" <<TOML
[daemon]
shutdown_timeout = "2s"
log_level = "warn"

[[listener]]
name = "forked-echo"
protocol = "tcp"
address = "127.0.0.1:9101"
handler = "echo"
workers = "forked"
max_workers = 256

[[listener]]
name = "forked-cat"
protocol = "tcp"
address = "127.0.0.1:9102"
handler = "exec"
workers = "forked"
max_workers = 256
exec = { argv = ["/bin/cat"], stderr = "null" }

[[listener]]
name = "threaded-cat"
protocol = "tcp"
address = "127.0.0.1:9104"
handler = "exec"
max_workers = 256
exec = { argv = ["/bin/cat"], stderr = "null" }
TOML

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
xinetd -dontfork -f "$WORK/xinetd.conf" -pidfile "$WORK/xinetd.pid" 2> "$WORK/xinetd.err" &
PIDS+=($!)
for port in 9101 9102 9103 9104; do
    for _ in $(seq 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then break; fi
        sleep 0.1
    done
done

echo "cps, connect-send(64 B)-receive-close, $CONNS client threads, $DURATION each, $(nproc) CPUs"
for t in "socketd forked echo:9101" "socketd forked exec /bin/cat:9102" "socketd threaded exec /bin/cat:9104" "xinetd /bin/cat:9103"; do
    name="${t%%:*}"; port="${t##*:}"
    printf '%-36s ' "$name"
    timeout 120 "$LOADGEN" --mode cps --target "tcp:127.0.0.1:$port" --conns "$CONNS" --size 64 --duration "$DURATION" || echo "(loadgen failed)"
done
