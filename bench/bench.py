"""socketd's benchmark against its peers. Run through bench/run.sh, which puts it in a private
network namespace holding only loopback (xinetd would otherwise resolve client addresses
through the system resolver and send packets off the machine).

Starts socketd and every peer with private configs on fixed loopback ports (safe: the namespace
is empty), runs the same loadgen loads against each, ROUNDS rounds interleaved, and prints
markdown tables of medians with ratios, the server's CPU per operation (its whole process tree,
from /proc) and the client's, plus every issue-6 and issue-12 target as met or missed. Every
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
FORK_ECHO = os.path.join(HERE, "target/release/fork_echo")
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
[[listener]]
name = "ev-http"
protocol = "tcp"
address = "{LO}:9711"
handler = "proxy"
workers = "event"
proxy = {{ upstream = "{LO}:9700" }}
[[listener]]
name = "th-http"
protocol = "tcp"
address = "{LO}:9712"
handler = "proxy"
workers = "threaded"
max_workers = 128
proxy = {{ upstream = "{LO}:9700" }}
[[listener]]
name = "fk-http"
protocol = "tcp"
address = "{LO}:9713"
handler = "proxy"
workers = "forked"
max_workers = 128
proxy = {{ upstream = "{LO}:9700" }}
"""

# nginx serving a 1 KiB file on 9700, as the HTTP server behind every proxy.
NGINX_CONF = """
user root;
daemon off;
master_process off;
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/nginx.err warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {work}/nginx-body;
    proxy_temp_path {work}/nginx-proxy;
    fastcgi_temp_path {work}/nginx-fastcgi;
    uwsgi_temp_path {work}/nginx-uwsgi;
    scgi_temp_path {work}/nginx-scgi;
    keepalive_requests 100000000;
    keepalive_timeout 120s;
    sendfile on;
    server {{
        listen 127.0.0.1:9700 backlog=4096;
        root {work}/www;
    }}
}}
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
frontend fe_http
    bind {LO}:9402
    default_backend be_http
backend be_http
    server s1 {LO}:9700
"""


# The same event echo listener in a second daemon that keeps the old accept path (the main
# loop accepts and hands each connection to an event loop): the A/B of "accept where the work
# is" in one run.
HANDOFF_CONF = f"""
[daemon]
shutdown_timeout = "2s"
log_level = "warn"
[[listener]]
name = "ev-echo-handoff"
protocol = "tcp"
address = "{LO}:9121"
handler = "echo"
workers = "event"
[[listener]]
name = "fk-echo-handoff"
protocol = "tcp"
address = "{LO}:9122"
handler = "echo"
workers = "forked"
[[listener]]
name = "fk-cat-handoff"
protocol = "tcp"
address = "{LO}:9123"
handler = "exec"
workers = "forked"
exec = {{ argv = ["/bin/cat"] }}
"""
HANDOFF = ("socketd event, hand-off accept", "tcp:127.0.0.1:9121")
# The forked listeners in that daemon: the main loop accepts and hands each connection to a
# fork server (SOCKETD_FORKED_ACCEPT=handoff), against the fork servers accepting themselves.
FK_HANDOFF = [("socketd forked echo, hand-off accept", "tcp:127.0.0.1:9122"),
              ("socketd forked exec /bin/cat, hand-off accept", "tcp:127.0.0.1:9123")]
# And with every loop accepting from the start (SOCKETD_EVENT_ACCEPT=every) instead of the
# first loop alone until it is saturated: the A/B of the accepting spread.
EVERY_CONF = HANDOFF_CONF.split("[[listener]]")[0] + "[[listener]]" + HANDOFF_CONF.split(
    "[[listener]]")[1].replace("ev-echo-handoff", "ev-echo-every").replace(":9121", ":9124")
EVERY = ("socketd event, every loop accepts", "tcp:127.0.0.1:9124")


def write(name, text):
    path = os.path.join(WORK, name)
    with open(path, "w") as f:
        f.write(text)
    return path


def start_everything():
    start("epoll_echo", [EPOLL, "--tcp", f"{LO}:9000", "--udp", f"{LO}:9000"])
    start("fork_echo", [FORK_ECHO, "--tcp", f"{LO}:9001"])
    start("fork_echo-exec", [FORK_ECHO, "--tcp", f"{LO}:9002", "--exec", "/bin/cat"])
    start("socketd", [SOCKETD, "--config", write("socketd.toml", SOCKETD_CONF)])
    start("socketd-idle", [SOCKETD, "--config", write("idle.toml", IDLE_CONF)])
    start("socketd-handoff", [SOCKETD, "--config", write("handoff.toml", HANDOFF_CONF)],
          env=dict(os.environ, SOCKETD_EVENT_ACCEPT="handoff", SOCKETD_FORKED_ACCEPT="handoff"))
    start("socketd-every", [SOCKETD, "--config", write("every.toml", EVERY_CONF)],
          env=dict(os.environ, SOCKETD_EVENT_ACCEPT="every"))
    xconf = write("xinetd.conf", XINETD_CONF.format(work=WORK))
    start("xinetd", ["xinetd", "-dontfork", "-f", xconf, "-pidfile", os.path.join(WORK, "xinetd.pid")])
    start("socat", ["socat", f"TCP-LISTEN:9301,bind={LO},fork,reuseaddr,backlog=1024", "PIPE"])
    start("haproxy", ["haproxy", "-db", "-f", write("haproxy.cfg", HAPROXY_CONF)])
    os.makedirs(os.path.join(WORK, "www"), exist_ok=True)
    with open(os.path.join(WORK, "www", "1k.bin"), "wb") as f:
        f.write(b"x" * 1024)
    start("nginx", ["nginx", "-c", write("nginx.conf", NGINX_CONF.format(work=WORK))])
    py = os.path.join(HERE, "peers/pyecho.py")
    start("py-threading", [sys.executable, py, "threading-tcp", LO, "9501"])
    start("py-forking", [sys.executable, py, "forking-tcp", LO, "9502"])
    start("py-udp", [sys.executable, py, "udp", LO, "9503"])
    for port in (9000, 9001, 9002, 9101, 9121, 9122, 9123, 9124, 9102, 9103, 9104, 9105, 9106, 9601, 9201, 9202, 9211, 9212, 9301,
                 9401, 9402, 9501, 9502, 9700, 9711, 9712, 9713):
        wait_tcp(port)
    for port in (9000, 9101, 9102, 9201, 9211, 9503):
        wait_udp(port)


# (load id, description, loadgen args, metric, [(row, target)])
LOADS = [
    ("rr64", "echo request/response, 64 connections, 64-byte messages",
     ["--mode", "rr", "--conns", "64", "--size", "64"], "ops_per_s",
     [("epoll_echo (kernel limit)", "tcp:127.0.0.1:9000"),
      ("socketd event", "tcp:127.0.0.1:9101"),
      HANDOFF,
      EVERY,
      ("socketd threaded", "tcp:127.0.0.1:9102"),
      ("xinetd internal echo", "tcp:127.0.0.1:9201"),
      ("socat fork PIPE", "tcp:127.0.0.1:9301"),
      ("python ThreadingTCPServer", "tcp:127.0.0.1:9501")]),
    ("rr64mux", "the same with the 64 connections multiplexed on 2 epoll client threads "
     "(loadgen --mux 2: the client takes less CPU, so this measures the servers more)",
     ["--mode", "rr", "--conns", "64", "--size", "64", "--mux", "2"], "ops_per_s",
     [("epoll_echo (kernel limit)", "tcp:127.0.0.1:9000"),
      ("socketd event", "tcp:127.0.0.1:9101"),
      HANDOFF,
      EVERY,
      ("socketd threaded", "tcp:127.0.0.1:9102"),
      ("xinetd internal echo", "tcp:127.0.0.1:9201"),
      ("socat fork PIPE", "tcp:127.0.0.1:9301"),
      ("python ThreadingTCPServer", "tcp:127.0.0.1:9501")]),
    ("cps16", "connect, send 64 B, receive, close; 16 concurrent clients",
     ["--mode", "cps", "--conns", "16", "--size", "64"], "ops_per_s",
     [("epoll_echo (kernel limit)", "tcp:127.0.0.1:9000"),
      ("socketd event", "tcp:127.0.0.1:9101"),
      HANDOFF,
      EVERY,
      ("socketd threaded", "tcp:127.0.0.1:9102"),
      ("socketd forked echo", "tcp:127.0.0.1:9103"),
      ("socketd forked exec /bin/cat", "tcp:127.0.0.1:9104"),
      *FK_HANDOFF,
      ("fork_echo (process per connection)", "tcp:127.0.0.1:9001"),
      ("fork_echo --exec /bin/cat", "tcp:127.0.0.1:9002"),
      ("xinetd internal echo", "tcp:127.0.0.1:9201"),
      ("xinetd exec /bin/cat", "tcp:127.0.0.1:9202"),
      ("xinetd internal echo, cps limit lifted", "tcp:127.0.0.1:9211"),
      ("xinetd exec /bin/cat, cps limit lifted", "tcp:127.0.0.1:9212"),
      ("socat fork PIPE", "tcp:127.0.0.1:9301"),
      ("haproxy tcp -> epoll_echo", "tcp:127.0.0.1:9401"),
      ("python ThreadingTCPServer", "tcp:127.0.0.1:9501"),
      ("python ForkingTCPServer", "tcp:127.0.0.1:9502")]),
    ("rr64mux1", "echo request/response, 64 connections on ONE epoll client thread (loadgen "
     "--mux 1: the shape of a single-threaded epoll load generator, leaving the server one core)",
     ["--mode", "rr", "--conns", "64", "--size", "64", "--mux", "1"], "ops_per_s",
     [("epoll_echo (kernel limit)", "tcp:127.0.0.1:9000"),
      ("socketd event", "tcp:127.0.0.1:9101"),
      HANDOFF,
      EVERY,
      ("socketd threaded", "tcp:127.0.0.1:9102"),
      ("xinetd internal echo", "tcp:127.0.0.1:9201")]),
    ("cps16mux1", "connect, send 64 B, receive, close; 16 clients on ONE epoll client thread "
     "(non-blocking connects)",
     ["--mode", "cps", "--conns", "16", "--size", "64", "--mux", "1"], "ops_per_s",
     [("epoll_echo (kernel limit)", "tcp:127.0.0.1:9000"),
      ("socketd event", "tcp:127.0.0.1:9101"),
      HANDOFF,
      EVERY,
      ("socketd threaded", "tcp:127.0.0.1:9102"),
      ("socketd forked echo", "tcp:127.0.0.1:9103"),
      ("socketd forked exec /bin/cat", "tcp:127.0.0.1:9104"),
      *FK_HANDOFF,
      ("fork_echo (process per connection)", "tcp:127.0.0.1:9001"),
      ("fork_echo --exec /bin/cat", "tcp:127.0.0.1:9002"),
      ("xinetd internal echo, cps limit lifted", "tcp:127.0.0.1:9211"),
      ("xinetd exec /bin/cat, cps limit lifted", "tcp:127.0.0.1:9212")]),
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


CLK_TCK = os.sysconf("SC_CLK_TCK")

# Which process (by the name `start` gave it) serves each port: its whole tree is the server.
SERVER_OF_PORT = {9000: "epoll_echo", 9201: "xinetd", 9202: "xinetd", 9211: "xinetd",
                  9212: "xinetd", 9301: "socat", 9401: "haproxy", 9402: "haproxy",
                  9501: "py-threading", 9502: "py-forking", 9503: "py-udp", 9700: "nginx",
                  9121: "socketd-handoff", 9122: "socketd-handoff", 9123: "socketd-handoff",
                  9124: "socketd-every", 9001: "fork_echo", 9002: "fork_echo-exec"}
for _port in (9101, 9102, 9103, 9104, 9105, 9106, 9711, 9712, 9713):
    SERVER_OF_PORT[_port] = "socketd"


def tree_cpu(root):
    """CPU seconds of `root` and its live descendants, including the children each has reaped
    (cutime/cstime), from /proc. A process that exits and is reaped in between moves from its
    own entry into its parent's cutime, so a difference of two readings counts it once."""
    stat = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                text = f.read()
        except OSError:
            continue
        rest = text[text.rfind(")") + 2:].split()
        stat[int(d)] = (int(rest[1]), sum(int(x) for x in rest[11:15]))
    kids = {}
    for pid, (ppid, _) in stat.items():
        kids.setdefault(ppid, []).append(pid)
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        if pid in stat:
            total += stat[pid][1]
            todo.extend(kids.get(pid, []))
    return total / CLK_TCK


def server_pid(target):
    port = int(target.rsplit(":", 1)[1])
    name = SERVER_OF_PORT.get(port)
    return next((p.pid for n, p in procs if n == name), None)


def client_cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def with_cpu(target, run):
    """Run `run()` (which returns a dict with `ops`), adding the server's and the client's
    CPU microseconds per operation."""
    pid = server_pid(target)
    s0, c0 = (tree_cpu(pid) if pid else 0.0), client_cpu()
    kv = run()
    s1, c1 = (tree_cpu(pid) if pid else 0.0), client_cpu()
    ops = float(kv.get("ops", 0) or 0)
    if ops > 0:
        kv["server_us_per_op"] = (s1 - s0) * 1e6 / ops if pid else None
        kv["client_us_per_op"] = (c1 - c0) * 1e6 / ops
    return kv


def run_load(args, target, metric):
    dur = "120s" if metric == "mib_per_s" else f"{SECS}s"
    argv = [LOADGEN, *args, "--target", target, "--duration", dur]

    def run():
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=SECS + 150,
                                 preexec_fn=raise_nofile)
        except subprocess.TimeoutExpired:
            return {"ok": False, "why": "timed out"}
        line = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
        kv = dict(f.split("=", 1) for f in line.split() if "=" in f)
        kv["ok"] = out.returncode == 0
        kv["why"] = out.stderr.strip().replace("\n", "; ")
        if metric == "mib_per_s":  # per MiB moved, not per operation
            kv["ops"] = float(kv.get("mib_per_s", 0)) * float(kv.get("secs", 0))
        return kv
    return with_cpu(target, run)


# HTTP through each proxy to nginx (1 KiB file, keep-alive): (row, port).
HTTP_ROWS = [("direct to nginx", 9700), ("socketd event proxy", 9711),
             ("socketd threaded proxy", 9712), ("socketd forked proxy", 9713),
             ("haproxy mode tcp", 9402)]
HTTP_LOADS = [("http32", "HTTP keep-alive GET of a 1 KiB file, ab -k -c 32", 32),
              ("http1", "the same with one client (ab -k -c 1): latency added by the proxy", 1)]


def run_http(port, conc):
    argv = ["ab", "-k", "-q", "-c", str(conc), "-t", str(SECS), "-n", "100000000",
            f"http://{LO}:{port}/1k.bin"]

    def run():
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=SECS + 60)
        except subprocess.TimeoutExpired:
            return {"ok": False, "why": "timed out"}
        kv = {"ok": out.returncode == 0, "why": out.stderr.strip().replace("\n", "; ")}
        for line in out.stdout.splitlines():
            if line.startswith("Complete requests:"):
                kv["ops"] = int(line.split()[2])
            elif line.startswith("Failed requests:"):
                kv["errors"] = int(line.split()[2])
            elif line.startswith("Non-2xx responses:"):
                kv["errors"] = int(kv.get("errors", 0)) + int(line.split()[2])
            elif line.startswith("Requests per second:"):
                kv["ops_per_s"] = float(line.split()[3])
            elif line.startswith("Time per request:") and "(mean)" in line:
                kv["mean_ms"] = float(line.split()[3])
        kv["ok"] = kv["ok"] and kv.get("ops", 0) > 0
        return kv
    return with_cpu(f"tcp:{LO}:{port}", run)


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
    with open("/proc/loadavg") as f:
        print(f"load average at the start: {f.read().split()[:3]}", file=sys.stderr)
    try:
        start_everything()
        only = set(filter(None, os.environ.get("BENCH_ONLY", "").split(",")))
        for r in range(ROUNDS):
            for load, _desc, args, metric, rows in LOADS:
                if only and load not in only:
                    continue
                for row, target in rows:
                    kv = run_load(args, target, metric)
                    results.setdefault((load, row), []).append(kv)
                    print(f"round {r + 1} {load:6} {row:32} {kv.get(metric, '-'):>10} "
                          f"cpu/op {kv.get('server_us_per_op')} "
                          f"{'' if kv['ok'] else 'FAILED ' + kv['why']}", file=sys.stderr, flush=True)
            for load, _desc, conc in HTTP_LOADS:
                if only and load not in only:
                    continue
                for row, port in HTTP_ROWS:
                    kv = run_http(port, conc)
                    results.setdefault((load, row), []).append(kv)
                    print(f"round {r + 1} {load:6} {row:32} {kv.get('ops_per_s', '-'):>10} "
                          f"cpu/op {kv.get('server_us_per_op')} "
                          f"{'' if kv['ok'] else 'FAILED ' + kv['why']}", file=sys.stderr, flush=True)
        mem = idle_memory() if not only or "idle" in only else \
            {"before_kib": 0, "during_kib": 0, "opened": "idle not run", "result": "", "ok": False}
    finally:
        stop_all()
    report(results, mem)
    with open(os.path.join(WORK, "results.json"), "w") as f:
        json.dump({f"{k[0]}/{k[1]}": v for k, v in results.items()} | {"idle": mem}, f, indent=1)
    print(f"\nraw results and logs: {WORK}", file=sys.stderr)


def report(results, mem):
    med, cpu = {}, {}

    def ok_runs(load, row):
        return [k for k in results.get((load, row), []) if k.get("ok")]

    def table(load, desc, rows, metric, latency):
        unit = "MiB/s" if metric == "mib_per_s" else "ops/s"
        per = "MiB" if metric == "mib_per_s" else "op"
        ref = rows[0]
        if not any((load, row) in results for row in rows):
            return  # not run (BENCH_ONLY)
        print(f"\n### {load}: {desc}\n")
        print(f"| server | {unit} (median of {ROUNDS}) | {latency} | errors / lost | "
              f"÷ {ref.split(' ')[0]} | server CPU µs/{per} | ÷ {ref.split(' ')[0]} | "
              f"client CPU µs/{per} |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for row in rows:
            runs = results.get((load, row), [])
            good = ok_runs(load, row)
            m = median([float(k.get(metric, 0)) for k in good])
            med[(load, row)] = m
            scpu = median([k["server_us_per_op"] for k in good if k.get("server_us_per_op") is not None])
            ccpu = median([k["client_us_per_op"] for k in good if k.get("client_us_per_op") is not None])
            cpu[(load, row)] = scpu
            if latency.startswith("p50"):
                p50 = median([float(k.get("p50_us", 0)) for k in good])
                p99 = median([float(k.get("p99_us", 0)) for k in good])
                lat = f"{p50:.0f} / {p99:.0f}" if metric != "mib_per_s" else "-"
            else:
                lat = f"{median([float(k.get('mean_ms', 0)) for k in good]):.3f}"
            errs = sum(int(k.get("errors", 0)) for k in runs)
            lost = sum(int(k.get("lost", 0)) for k in runs)
            failed = len(runs) - len(good)
            base, cbase = med.get((load, ref)) or 0, cpu.get((load, ref)) or 0
            ratio = f"{m / base:.2f}" if base else "-"
            cratio = f"{scpu / cbase:.2f}" if cbase else "-"
            note = f" ({failed} failed)" if failed else ""
            print(f"| {row}{note} | {m:,.0f} | {lat} | {errs} / {lost} | {ratio} | "
                  f"{scpu:.1f} | {cratio} | {ccpu:.1f} |")

    for load, desc, _args, metric, rows in LOADS:
        table(load, desc, [r for r, _t in rows], metric, "p50 / p99 µs")
    for load, desc, _conc in HTTP_LOADS:
        table(load, desc, [r for r, _p in HTTP_ROWS], "ops_per_s", "mean ms per request")

    def ratio(load, a, b, of=None):
        of = of or med
        x, y = of.get((load, a), 0), of.get((load, b), 0)
        return x / y if y else float("inf") if x else 0.0

    line = "epoll_echo (kernel limit)"
    # (load, socketd row, peer row, op, target, of): ratio a/b must be >= or <= target.
    targets = [
        ("rr64", "socketd event", line, ">=", 0.9, med),
        ("rr64", "socketd event", "xinetd internal echo", ">=", 2, med),
        ("rr64", "socketd event", "socat fork PIPE", ">=", 2, med),
        ("rr64", "socketd event", "python ThreadingTCPServer", ">=", 2, med),
        ("rr64mux", "socketd event", line, ">=", 0.9, med),
        ("cps16", "socketd event", line, ">=", 0.8, med),
        ("cps16", "socketd threaded", "python ThreadingTCPServer", ">=", 2, med),
        ("cps16", "socketd forked echo", "xinetd exec /bin/cat", ">=", 1.5, med),
        ("cps16", "socketd forked exec /bin/cat", "xinetd exec /bin/cat", ">=", 1.5, med),
        ("udp16", "socketd event", line, ">=", 0.9, med),
        ("udp16", "socketd threaded", "python UDPServer", ">=", 1, med),
        ("bulk", "socketd event proxy", "haproxy tcp", ">=", 1.5, med),
        # issue 12: CPU per operation against the single-threaded epoll echo, and throughput
        # with a single-threaded epoll client.
        ("rr64mux1", "socketd event", line, "<=", 1.1, cpu),
        ("cps16mux1", "socketd event", line, "<=", 1.2, cpu),
        ("cps16mux1", "socketd threaded", line, "<=", 2, cpu),
        ("rr64mux1", "socketd event", line, ">=", 0.95, med),
        ("cps16mux1", "socketd event", line, ">=", 0.9, med),
        ("cps16mux1", "socketd forked exec /bin/cat", "xinetd exec /bin/cat, cps limit lifted",
         ">=", 2, med),
        ("cps16mux1", "socketd forked echo", "xinetd internal echo, cps limit lifted", ">=", 2, med),
        ("cps16", "socketd forked exec /bin/cat", "xinetd exec /bin/cat, cps limit lifted",
         ">=", 2, med),
        ("cps16", "socketd forked echo", "xinetd internal echo, cps limit lifted", ">=", 2, med),
        ("http32", "socketd event proxy", "haproxy mode tcp", ">=", 1.0, med),
        ("http32", "socketd threaded proxy", "haproxy mode tcp", ">=", 1.0, med),
    ]
    print("\n### Targets (issues 6 and 12)\n")
    print("| load | socketd | peer | measure | target | measured | |")
    print("|---|---|---|---|---:|---:|---|")
    ran = {load for load, _row in results}
    for load, a, b, op, want, of in targets:
        if load not in ran:
            continue
        r = ratio(load, a, b, of)
        met = r >= want if op == ">=" else r <= want
        what = "CPU/op ratio" if of is cpu else "throughput ratio"
        print(f"| {load} | {a} | {b} | {what} | {op} {want} | {r:.2f} | {'met' if met else 'MISSED'} |")
    mean = {}
    for row, _p in HTTP_ROWS if "http1" in ran else []:
        mean[row] = median([float(k.get("mean_ms", 0)) for k in ok_runs("http1", row)])
    for row in ("socketd event proxy", "socketd threaded proxy", "socketd forked proxy"):
        if not mean:
            break
        add = mean[row] - mean["direct to nginx"]
        print(f"| http1 | {row} | direct to nginx | added ms per request | < 0.2 | {add:.3f} | "
              f"{'met' if add < 0.2 else 'MISSED'} |")
    # No target: what a process per connection costs on this machine at all, which bounds
    # every forked row (and xinetd's) from above.
    for load in ("cps16", "cps16mux1"):
        if load not in ran:
            continue
        fl = "fork_echo (process per connection)"
        for a, b in ((fl, "xinetd internal echo, cps limit lifted"),
                     ("socketd forked echo", fl)):
            print(f"| {load} | {a} | {b} | throughput ratio (context) | - | {ratio(load, a, b):.2f} | |")
            print(f"| {load} | {a} | {b} | CPU/op ratio (context) | - | {ratio(load, a, b, cpu):.2f} | |")
    lost = sum(int(k.get("lost", 0)) for k in results.get(("udp16", "socketd event"), []))
    if "udp16" in ran:
        print(f"| udp16 | socketd event | (loss) | lost | 0 | {lost} | {'met' if lost == 0 else 'MISSED'} |")
    mib = mem["during_kib"] / 1024
    if mem["ok"]:
        print(f"| idle | socketd event, {IDLE} idle connections | (RSS) | MiB | < 64 | {mib:.1f} "
              f"(before {mem['before_kib'] / 1024:.1f}) | {'met' if mib < 64 and mem['ok'] else 'MISSED'} |")
    print(f"\n{mem['opened']}; after the hold: {mem['result']}")
    with open("/proc/loadavg") as f:
        print(f"\nload average at the end: {f.read().split()[:3]}; {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
