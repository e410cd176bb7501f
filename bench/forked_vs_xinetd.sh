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

# Targets are NAME:PORT:SERVER_PID. Besides the load generator's numbers, each line gets the
# server side's CPU time per 1000 connections (user+system of the server process, its direct
# children such as socketd's fork server, and the children they reaped, from /proc), which
# other load on the machine hardly changes, unlike connections per second.
"$SOCKETD" --config "$WORK/socketd.toml" 2> "$WORK/socketd.log" &
PIDS+=($!)
SOCKETD_PID=$!
PORTS="9101 9102 9103 9104"
TARGETS=("socketd forked echo:9101:$SOCKETD_PID" "socketd forked exec /bin/cat:9102:$SOCKETD_PID" "socketd threaded exec /bin/cat:9104:$SOCKETD_PID")
if [ -n "$SOCKETD_BEFORE" ]; then
    "$SOCKETD_BEFORE" --config "$WORK/socketd-before.toml" 2> "$WORK/socketd-before.log" &
    PIDS+=($!)
    PORTS="$PORTS 9111 9112 9114"
    TARGETS+=("before, forked echo:9111:$!" "before, forked exec /bin/cat:9112:$!" "before, threaded exec /bin/cat:9114:$!")
fi
xinetd -dontfork -f "$WORK/xinetd.conf" -pidfile "$WORK/xinetd.pid" 2> "$WORK/xinetd.err" &
PIDS+=($!)
TARGETS+=("xinetd /bin/cat:9103:$!")

# cpu_ticks PID: utime+stime+cutime+cstime of PID and of each of its direct children.
cpu_ticks() {
    local total=0 p
    for p in "$1" $(cat /proc/"$1"/task/*/children 2>/dev/null); do
        total=$((total + $(awk '{print $14+$15+$16+$17}' /proc/"$p"/stat 2>/dev/null || echo 0)))
    done
    echo "$total"
}
TICK_MS=$((1000 / $(getconf CLK_TCK)))
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
        IFS=: read -r name port pid <<< "$t"
        before=$(cpu_ticks "$pid")
        out=$(timeout 120 "$LOADGEN" --mode cps --target "tcp:127.0.0.1:$port" --conns "$CONNS" --size 64 --duration "$DURATION" || echo "(loadgen failed)")
        sleep 0.2 # the last children are reaped and counted
        used=$(( ($(cpu_ticks "$pid") - before) * TICK_MS ))
        ops=$(sed -n 's/.* ops=\([0-9]*\) .*/\1/p' <<< "$out")
        per_k=$(awk -v u="$used" -v o="${ops:-0}" 'BEGIN { if (o > 0) printf "%.0f", u * 1000 / o; else print "-" }')
        printf '%-36s %s server_cpu_ms_per_1k=%s\n' "$name" "$out" "$per_k" | tee -a "$WORK/results"
    done
done
echo
echo "| target | conn/s (median) | server CPU ms per 1000 conn (median) | conn/s vs xinetd |"
echo "|---|---|---|---|"
awk '
    { name = substr($0, 1, 36); sub(/ +$/, "", name)
      for (i = 1; i <= NF; i++) { if ($i ~ /^ops_per_s=/) { split($i, a, "="); r[name] = r[name] " " a[2] }
                                  if ($i ~ /^server_cpu_ms_per_1k=/) { split($i, b, "="); c[name] = c[name] " " b[2] } }
      if (!(name in seen)) { seen[name] = 1; order[++n] = name } }
    function median(list,   v, k, i, j, t) {
        k = split(list, v, " ")
        for (i = 1; i <= k; i++) for (j = i + 1; j <= k; j++) if (v[j] + 0 < v[i] + 0) { t = v[i]; v[i] = v[j]; v[j] = t }
        return k % 2 ? v[(k + 1) / 2] : (v[k / 2] + v[k / 2 + 1]) / 2
    }
    END {
        x = median(r["xinetd /bin/cat"])
        for (i = 1; i <= n; i++) { m = median(r[order[i]]); printf "| %s | %d | %s | %.2f |\n", order[i], m, median(c[order[i]]), (x > 0 ? m / x : 0) }
    }' "$WORK/results"
