"""socketd's benchmark against its peers. Run through bench/run.sh, which puts it in a private
network namespace holding only loopback (xinetd would otherwise resolve client addresses
through the system resolver and send packets off the machine).

Starts socketd and every peer with private configs on fixed loopback ports (safe: the namespace
is empty), runs the same loadgen loads against each, ROUNDS rounds interleaved, and prints
markdown tables of medians with ratios plus every issue-6 target as met or missed. Every
process it starts is stopped by PID (SIGTERM, then SIGKILL); every run is bounded in time.
"""
import json
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SOCKETD = os.path.join(ROOT, "target/release/socketd")
LOADGEN = os.path.join(HERE, "target/release/loadgen")
EPOLL = os.path.join(HERE, "target/release/epoll_echo")
SECS = float(os.environ.get("BENCH_SECS", "5"))
ROUNDS = int(os.environ.get("ROUNDS", "3"))
BULK = os.environ.get("BULK_BYTES", "1G")
IDLE = int(os.environ.get("IDLE_CONNS", "10000"))
LO = "127.0.0.1"

procs = []  # (name, Popen)


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def start(name, argv, **kw):
    log = open(os.path.join(WORK, name + ".log"), "w")
    p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                         preexec_fn=raise_nofile, **kw)
    procs.append((name, p))
    return p


def stop_all():
    for name, p in reversed(procs):
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.time() + 10
    for name, p in reversed(procs):
        try:
            p.wait(max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def wait_tcp(port, timeout=15):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection((LO, port), 0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on tcp {port} after {timeout}s; see logs in {WORK}")


def wait_udp(port, timeout=15):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(0.2)
    deadline = time.time() + timeout
    while time.time() < deadline:
        s.sendto(b"probe", (LO, port))
        try:
            if s.recv(64) == b"probe":
                return
        except OSError:
            pass
    raise SystemExit(f"no UDP echo on {port} after {timeout}s; see logs in {WORK}")


SOCKETD_CONF = f"""
[daemon]
shutdown_timeout = "2s"
log_level = "warn"
[[listener]]
name = "ev-echo"
protocol = "tcp"
address = "{LO}:9101"
handler = "echo"
workers = "event"
[[listener]]
name = "ev-echo-udp"
protocol = "udp"
address = "{LO}:9101"
handler = "echo"
workers = "event"
[[listener]]
name = "th-echo"
protocol = "tcp"
address = "{LO}:9102"
handler = "echo"
workers = "threaded"
max_workers = 128
[[listener]]
name = "th-echo-udp"
protocol = "udp"
address = "{LO}:9102"
handler = "echo"
workers = "threaded"
[[listener]]
name = "fk-echo"
protocol = "tcp"
address = "{LO}:9103"
handler = "echo"
workers = "forked"
[[listener]]
name = "fk-cat"
protocol = "tcp"
address = "{LO}:9104"
handler = "exec"
workers = "forked"
exec = {{ argv = ["/bin/cat"] }}
[[listener]]
name = "ev-proxy"
protocol = "tcp"
address = "{LO}:9105"
handler = "proxy"
workers = "event"
proxy = {{ upstream = "{LO}:9000" }}
[[listener]]
name = "th-proxy"
protocol = "tcp"
address = "{LO}:9106"
handler = "proxy"
workers = "threaded"
proxy = {{ upstream = "{LO}:9000" }}
"""

IDLE_CONF = f"""
[daemon]
log_level = "warn"
[[listener]]
name = "idle"
protocol = "tcp"
address = "{LO}:9601"
handler = "echo"
workers = "event"
max_workers = 20000
"""

XINETD_CONF = """
defaults
{{
    log_type = FILE {work}/xinetd.events
}}
service echo
{{
    id = echo-stream
    type = INTERNAL UNLISTED
    socket_type = stream
    protocol = tcp
    port = 9201
    bind = 127.0.0.1
    wait = no
    user = root
    flags = NOLIBWRAP
}}
service echo
{{
    id = echo-dgram
    type = INTERNAL UNLISTED
    socket_type = dgram
    protocol = udp
    port = 9201
    bind = 127.0.0.1
    wait = yes
    user = root
    flags = NOLIBWRAP
}}
service echo
{{
    id = echo-stream-nolimit
    type = INTERNAL UNLISTED
    socket_type = stream
    protocol = tcp
    port = 9211
    bind = 127.0.0.1
    wait = no
    user = root
    flags = NOLIBWRAP
    cps = 1000000 1
    instances = UNLIMITED
}}
service echo
{{
    id = echo-dgram-nolimit
    type = INTERNAL UNLISTED
    socket_type = dgram
    protocol = udp
    port = 9211
    bind = 127.0.0.1
    wait = yes
    user = root
    flags = NOLIBWRAP
    cps = 1000000 1
    instances = UNLIMITED
}}
service bcatnl
{{
    type = UNLISTED
    socket_type = stream
    protocol = tcp
    port = 9212
    bind = 127.0.0.1
    wait = no
    user = root
    server = /bin/cat
    flags = NOLIBWRAP
    cps = 1000000 1
    instances = UNLIMITED
}}
service bcat
{{
    type = UNLISTED
    socket_type = stream
    protocol = tcp
    port = 9202
    bind = 127.0.0.1
    wait = no
    user = root
    server = /bin/cat
    flags = NOLIBWRAP
}}
"""

HAPROXY_CONF = f"""
global
    maxconn 9000
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend fe
    bind {LO}:9401
    default_backend be
backend be
    server s1 {LO}:9000
"""


def write(name, text):
    path = os.path.join(WORK, name)
    with open(path, "w") as f:
        f.write(text)
    return path


def start_everything():
    start("epoll_echo", [EPOLL, "--tcp", f"{LO}:9000", "--udp", f"{LO}:9000"])
    start("socketd", [SOCKETD, "--config", write("socketd.toml", SOCKETD_CONF)])
    start("socketd-idle", [SOCKETD, "--config", write("idle.toml", IDLE_CONF)])
    xconf = write("xinetd.conf", XINETD_CONF.format(work=WORK))
    start("xinetd", ["xinetd", "-dontfork", "-f", xconf, "-pidfile", os.path.join(WORK, "xinetd.pid")])
    start("socat", ["socat", f"TCP-LISTEN:9301,bind={LO},fork,reuseaddr,backlog=1024", "PIPE"])
    start("haproxy", ["haproxy", "-db", "-f", write("haproxy.cfg", HAPROXY_CONF)])
    py = os.path.join(HERE, "peers/pyecho.py")
    start("py-threading", [sys.executable, py, "threading-tcp", LO, "9501"])
    start("py-forking", [sys.executable, py, "forking-tcp", LO, "9502"])
    start("py-udp", [sys.executable, py, "udp", LO, "9503"])
    for port in (9000, 9101, 9102, 9103, 9104, 9105, 9106, 9601, 9201, 9202, 9211, 9212, 9301,
                 9401, 9501, 9502):
        wait_tcp(port)
    for port in (9000, 9101, 9102, 9201, 9211, 9503):
        wait_udp(port)


# (load id, description, loadgen args, metric, [(row, target)])
LOADS = [
    ("rr64", "echo request/response, 64 connections, 64-byte messages",
     ["--mode", "rr", "--conns", "64", "--size", "64"], "ops_per_s",
     [("epoll_echo (kernel limit)", "tcp:127.0.0.1:9000"),
      ("socketd event", "tcp:127.0.0.1:9101"),
      ("socketd threaded", "tcp:127.0.0.1:9102"),
      ("xinetd internal echo", "tcp:127.0.0.1:9201"),
      ("socat fork PIPE", "tcp:127.0.0.1:9301"),
      ("python ThreadingTCPServer", "tcp:127.0.0.1:9501")]),
    ("rr64mux", "the same with the 64 connections multiplexed on 2 epoll client threads "
     "(loadgen --mux 2: the client takes less CPU, so this measures the servers more)",
     ["--mode", "rr", "--conns", "64", "--size", "64", "--mux", "2"], "ops_per_s",
     [("epoll_echo (kernel limit)", "tcp:127.0.0.1:9000"),
      ("socketd event", "tcp:127.0.0.1:9101"),
      ("socketd threaded", "tcp:127.0.0.1:9102"),
      ("xinetd internal echo", "tcp:127.0.0.1:9201"),
      ("socat fork PIPE", "tcp:127.0.0.1:9301"),
      ("python ThreadingTCPServer", "tcp:127.0.0.1:9501")]),
    ("cps16", "connect, send 64 B, receive, close; 16 concurrent clients",
     ["--mode", "cps", "--conns", "16", "--size", "64"], "ops_per_s",
     [("epoll_echo (kernel limit)", "tcp:127.0.0.1:9000"),
      ("socketd event", "tcp:127.0.0.1:9101"),
      ("socketd threaded", "tcp:127.0.0.1:9102"),
      ("socketd forked echo", "tcp:127.0.0.1:9103"),
      ("socketd forked exec /bin/cat", "tcp:127.0.0.1:9104"),
      ("xinetd internal echo", "tcp:127.0.0.1:9201"),
      ("xinetd exec /bin/cat", "tcp:127.0.0.1:9202"),
      ("xinetd internal echo, cps limit lifted", "tcp:127.0.0.1:9211"),
      ("xinetd exec /bin/cat, cps limit lifted", "tcp:127.0.0.1:9212"),
      ("socat fork PIPE", "tcp:127.0.0.1:9301"),
      ("haproxy tcp -> epoll_echo", "tcp:127.0.0.1:9401"),
      ("python ThreadingTCPServer", "tcp:127.0.0.1:9501"),
      ("python ForkingTCPServer", "tcp:127.0.0.1:9502")]),
    ("udp16", "UDP echo request/response, 16 clients, 64-byte datagrams",
     ["--mode", "udp", "--conns", "16", "--size", "64", "--io-timeout", "200ms"], "ops_per_s",
     [("epoll_echo (kernel limit)", "udp:127.0.0.1:9000"),
      ("socketd event", "udp:127.0.0.1:9101"),
      ("socketd threaded", "udp:127.0.0.1:9102"),
      ("xinetd internal echo", "udp:127.0.0.1:9201"),
      ("xinetd internal echo, cps limit lifted", "udp:127.0.0.1:9211"),
      ("python UDPServer", "udp:127.0.0.1:9503")]),
    ("bulk", f"one {BULK} stream through a TCP proxy to epoll_echo and back",
     ["--mode", "bulk", "--bytes", BULK], "mib_per_s",
     [("direct to epoll_echo (no proxy)", "tcp:127.0.0.1:9000"),
      ("socketd event proxy", "tcp:127.0.0.1:9105"),
      ("socketd threaded proxy", "tcp:127.0.0.1:9106"),
      ("haproxy tcp", "tcp:127.0.0.1:9401")]),
]


def run_load(args, target, metric):
    dur = "120s" if metric == "mib_per_s" else f"{SECS}s"
    argv = [LOADGEN, *args, "--target", target, "--duration", dur]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=SECS + 150,
                             preexec_fn=raise_nofile)
    except subprocess.TimeoutExpired:
        return {"ok": False, "why": "timed out"}
    line = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    kv = dict(f.split("=", 1) for f in line.split() if "=" in f)
    kv["ok"] = out.returncode == 0
    kv["why"] = out.stderr.strip().replace("\n", "; ")
    return kv


def idle_memory():
    pid = next(p.pid for n, p in procs if n == "socketd-idle")
    def rss():
        with open(f"/proc/{pid}/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
    before = rss()
    gen = subprocess.Popen([LOADGEN, "--mode", "idle", "--target", f"tcp:{LO}:9601",
                            "--conns", str(IDLE), "--duration", "6s", "--io-timeout", "20s"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           preexec_fn=raise_nofile)
    line = gen.stderr.readline()  # "loadgen: idle: N connections open"
    time.sleep(1)
    during = rss()
    out, err = gen.communicate(timeout=120)
    return {"before_kib": before, "during_kib": during, "opened": line.strip(),
            "result": out.strip(), "ok": gen.returncode == 0}


def median(vals):
    return statistics.median(vals) if vals else 0.0


def main():
    global WORK
    WORK = tempfile.mkdtemp(prefix="socketd-bench.")
    for path, value in (("net/ipv4/ip_local_port_range", "1024 65000"),
                        ("net/ipv4/tcp_tw_reuse", "1")):
        try:
            with open(f"/proc/sys/{path}", "w") as f:
                f.write(value)
        except OSError as e:
            print(f"note: cannot set {path}: {e}", file=sys.stderr)
    results = {}  # (load, row) -> [kv...]
    try:
        start_everything()
        for r in range(ROUNDS):
            for load, _desc, args, metric, rows in LOADS:
                for row, target in rows:
                    kv = run_load(args, target, metric)
                    results.setdefault((load, row), []).append(kv)
                    print(f"round {r + 1} {load:6} {row:32} {kv.get(metric, '-'):>10} "
                          f"{'' if kv['ok'] else 'FAILED ' + kv['why']}", file=sys.stderr, flush=True)
        mem = idle_memory()
    finally:
        stop_all()
    report(results, mem)
    with open(os.path.join(WORK, "results.json"), "w") as f:
        json.dump({f"{k[0]}/{k[1]}": v for k, v in results.items()} | {"idle": mem}, f, indent=1)
    print(f"\nraw results and logs: {WORK}", file=sys.stderr)


def report(results, mem):
    med = {}
    for load, desc, _args, metric, rows in LOADS:
        unit = "MiB/s" if metric == "mib_per_s" else "ops/s"
        ref = rows[0][0]
        print(f"\n### {load}: {desc}\n")
        print(f"| server | {unit} (median of {ROUNDS}) | p50 µs | p99 µs | errors / lost | ÷ {ref.split(' ')[0]} |")
        print("|---|---:|---:|---:|---:|---:|")
        for row, _t in rows:
            runs = results.get((load, row), [])
            vals = [float(k.get(metric, 0)) for k in runs if k.get("ok")]
            m = median(vals)
            med[(load, row)] = m
            p50 = median([float(k.get("p50_us", 0)) for k in runs if k.get("ok")])
            p99 = median([float(k.get("p99_us", 0)) for k in runs if k.get("ok")])
            errs = sum(int(k.get("errors", 0)) for k in runs)
            lost = sum(int(k.get("lost", 0)) for k in runs)
            failed = len(runs) - len(vals)
            base = med.get((load, ref)) or 0
            ratio = f"{m / base:.2f}" if base else "-"
            note = f" ({failed} failed)" if failed else ""
            lat = (f"{p50:.0f} | {p99:.0f}") if metric != "mib_per_s" else "- | -"
            print(f"| {row}{note} | {m:,.0f} | {lat} | {errs} / {lost} | {ratio} |")

    def ratio(load, a, b):
        x, y = med.get((load, a), 0), med.get((load, b), 0)
        return x / y if y else float("inf") if x else 0.0

    targets = [
        ("rr64", "socketd event", "epoll_echo (kernel limit)", 0.9),
        ("rr64", "socketd event", "xinetd internal echo", 2),
        ("rr64", "socketd event", "socat fork PIPE", 2),
        ("rr64", "socketd event", "python ThreadingTCPServer", 2),
        ("rr64mux", "socketd event", "epoll_echo (kernel limit)", 0.9),
        ("rr64mux", "socketd event", "xinetd internal echo", 2),
        ("rr64mux", "socketd event", "socat fork PIPE", 2),
        ("rr64mux", "socketd event", "python ThreadingTCPServer", 2),
        ("cps16", "socketd event", "epoll_echo (kernel limit)", 0.8),
        ("cps16", "socketd threaded", "python ThreadingTCPServer", 2),
        ("cps16", "socketd forked echo", "xinetd exec /bin/cat", 1.5),
        ("cps16", "socketd forked exec /bin/cat", "xinetd exec /bin/cat", 1.5),
        ("cps16", "socketd forked echo", "xinetd exec /bin/cat, cps limit lifted", 1.5),
        ("cps16", "socketd forked exec /bin/cat", "xinetd exec /bin/cat, cps limit lifted", 1.5),
        ("udp16", "socketd event", "epoll_echo (kernel limit)", 0.9),
        ("udp16", "socketd threaded", "python UDPServer", 1),
        ("bulk", "socketd event proxy", "haproxy tcp", 1.5),
    ]
    print("\n### Targets (issue 6)\n")
    print("| load | socketd | peer | target | measured | |")
    print("|---|---|---|---:|---:|---|")
    for load, a, b, want in targets:
        r = ratio(load, a, b)
        print(f"| {load} | {a} | {b} | ≥ {want} | {r:.2f} | {'met' if r >= want else 'MISSED'} |")
    lost = sum(int(k.get("lost", 0)) for k in results.get(("udp16", "socketd event"), []))
    print(f"| udp16 | socketd event | (loss) | 0 lost | {lost} lost | {'met' if lost == 0 else 'MISSED'} |")
    mib = mem["during_kib"] / 1024
    print(f"| idle | socketd event, {IDLE} idle connections | (RSS) | < 64 MB | {mib:.1f} MiB "
          f"(before {mem['before_kib'] / 1024:.1f}) | {'met' if mib < 64 and mem['ok'] else 'MISSED'} |")
    print(f"\n{mem['opened']}; after the hold: {mem['result']}")


if __name__ == "__main__":
    main()
