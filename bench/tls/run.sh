#!/bin/sh
# socketd's TLS benchmark (issue 11) against stunnel4 and haproxy `ssl crt`, all three
# terminating TLS 1.3 in front of the same backend (bench's epoll_echo), compared in one run:
#   1. server-side handshake cost by crypto provider (ring vs aws-lc-rs, in memory);
#   2. new TLS 1.3 handshakes/s, 16 clients (connect, handshake, 64 B echo, close);
#   3. the same with session resumption (tickets);
#   4. 1 GiB out and back through the TLS-terminating proxy;
#   5. RSS per idle TLS connection held by socketd in event mode.
# Needs root (private network namespace), cargo, cmake, openssl, stunnel4, haproxy.
# Not run by CI.   SECS=5 bench/tls/run.sh
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
if [ "${SOCKETD_BENCH_NETNS:-}" != 1 ]; then
    (cd "$root" && cargo build --release --quiet --bin socketd)
    (cd "$root/bench" && cargo build --release --quiet --bin epoll_echo)
    (cd "$here" && cargo build --release --quiet)
    export SOCKETD_BENCH_NETNS=1
    exec timeout --signal=TERM --kill-after=30 1800 unshare -n -- "$0" "$@"
fi
ip link set lo up
SECS=${SECS:-5}
work=$(mktemp -d)
pids=""
cleanup() { for p in $pids; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
cd "$work"
# A CA and a localhost certificate from it: ECDSA P-256 (what the load runs use) and RSA 2048.
printf 'subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n' > leaf.ext
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key \
    -out ca.pem -days 2 -subj /CN=bench-ca 2>/dev/null
for kind in ec rsa; do
    case $kind in ec) new="ec -pkeyopt ec_paramgen_curve:P-256" ;; rsa) new="rsa:2048" ;; esac
    # shellcheck disable=SC2086 # two words
    openssl req -newkey $new -nodes -keyout "$kind.key" -out "$kind.csr" -subj /CN=localhost 2>/dev/null
    openssl x509 -req -in "$kind.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
        -extfile leaf.ext -out "$kind.pem" 2>/dev/null
done
cp ec.pem cert.pem; cp ec.key key.pem
cat cert.pem key.pem > both.pem
tls_load="$here/target/release/tls_load"

for kind in ec rsa; do
    echo "== crypto provider: server CPU per full TLS 1.3 handshake ($kind) =="
    "$here/target/release/tls_provider" ca.pem "$kind.pem" "$kind.key" "$SECS"
done

"$root/bench/target/release/epoll_echo" --tcp 127.0.0.1:9500 > echo.out & pids="$pids $!"
cat > socketd.toml <<CONF
[[listener]]
name = "tls-proxy"
protocol = "tcp"
address = "127.0.0.1:9501"
handler = "proxy"
workers = "event"
threads = 1
proxy = { upstream = "127.0.0.1:9500" }
tls = { cert = "$work/cert.pem", key = "$work/key.pem" }
CONF
"$root/target/release/socketd" --config socketd.toml 2> socketd.log & sd=$!; pids="$pids $sd"
cat > stunnel.conf <<CONF
foreground = yes
pid =
[tls]
accept = 127.0.0.1:9502
connect = 127.0.0.1:9500
cert = $work/cert.pem
key = $work/key.pem
sslVersionMin = TLSv1.3
CONF
stunnel4 stunnel.conf 2> stunnel.log & st=$!; pids="$pids $st"
cat > haproxy.cfg <<CONF
global
    maxconn 4000
    nbthread 1
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend tls
    bind 127.0.0.1:9503 ssl crt $work/both.pem ssl-min-ver TLSv1.3
    default_backend echo
backend echo
    server e 127.0.0.1:9500
CONF
haproxy -db -f haproxy.cfg 2> haproxy.log & hp=$!; pids="$pids $hp"
sleep 1

for mode in hs resume; do
    echo "== $mode: 16 clients, ${SECS}s =="
    for peer in "socketd:9501:$sd" "stunnel4:9502:$st" "haproxy:9503:$hp"; do
        name=${peer%%:*}; rest=${peer#*:}; port=${rest%%:*}; pid=${rest#*:}
        printf '%-9s ' "$name"; "$tls_load" "$mode" "127.0.0.1:$port" ca.pem "$SECS" 16 "$pid"
    done
done
echo "== bulk: 1 GiB out and back =="
for peer in "socketd:9501:$sd" "stunnel4:9502:$st" "haproxy:9503:$hp"; do
    name=${peer%%:*}; rest=${peer#*:}; port=${rest%%:*}; pid=${rest#*:}
    printf '%-9s ' "$name"; "$tls_load" bulk "127.0.0.1:$port" ca.pem 1073741824 "$pid"
done
echo "== RSS per idle TLS connection (socketd event mode, 1000 connections) =="
"$tls_load" idle 127.0.0.1:9501 ca.pem 1000 "$sd"
