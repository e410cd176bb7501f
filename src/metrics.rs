//! The Prometheus endpoint (`[daemon.metrics] address`): a tiny HTTP/1.x server that answers
//! `GET /metrics` with the text exposition format (version 0.0.4), served by socketd itself.
//!
//! Like the control socket it never runs on the loop: a thread accepts, each scrape (at most
//! `MAX_SCRAPES` at once) gets a thread that reads a bounded request head within
//! `READ_DEADLINE`, asks the loop for its status snapshot (`LoopLink`), and renders it with
//! the duration histograms, which workers keep in `stats`.

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::control::{Command, LoopLink};

/// How long a scraper may take to send its request head.
pub const READ_DEADLINE: Duration = Duration::from_secs(5);
/// The longest request head read.
pub const MAX_HEAD: usize = 8 * 1024;
/// Scrapes served at once; more get a 503 at once.
pub const MAX_SCRAPES: usize = 8;
/// How long a scrape waits for the loop's snapshot.
const ANSWER_DEADLINE: Duration = Duration::from_secs(10);

/// The bound endpoint.
#[derive(Debug)]
pub struct Endpoint {
    listener: TcpListener,
    addr: SocketAddr,
}

impl Endpoint {
    /// Bind `addr` (port 0 picks one: see `local_addr`, logged and in `socketd status`).
    /// SO_REUSEPORT: the new process of a binary upgrade binds the same address while the old
    /// one still serves it (both run as the same user; the kernel takes no other).
    pub fn bind(addr: SocketAddr) -> io::Result<Endpoint> {
        let bind = || -> io::Result<TcpListener> {
            let s = socket2::Socket::new(
                socket2::Domain::for_address(addr),
                socket2::Type::STREAM,
                None,
            )?;
            s.set_reuse_address(true)?;
            s.set_reuse_port(true)?;
            s.bind(&addr.into())?;
            s.listen(64)?;
            Ok(s.into())
        };
        let listener = bind().map_err(|e| io::Error::new(e.kind(), format!("{addr}: {e}")))?;
        let addr = listener.local_addr()?;
        Ok(Endpoint { listener, addr })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serve scrapes on a thread of their own from now on.
    pub fn serve(&self, link: LoopLink) -> io::Result<()> {
        let listener = self.listener.try_clone()?;
        let active = Arc::new(AtomicUsize::new(0));
        std::thread::Builder::new()
            .name("socketd:metrics".into())
            .spawn(move || loop {
                let mut stream = match listener.accept() {
                    Ok((s, _)) => s,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        log::warn!("metrics: accept failed: {e}");
                        std::thread::sleep(Duration::from_millis(200));
                        continue;
                    }
                };
                if active.fetch_add(1, Ordering::Relaxed) >= MAX_SCRAPES {
                    active.fetch_sub(1, Ordering::Relaxed);
                    let _ = stream.set_nonblocking(true);
                    let _ = respond(&mut stream, "503 Service Unavailable", "busy\n");
                    continue;
                }
                let (link, active) = (link.clone(), Arc::clone(&active));
                let spawned = std::thread::Builder::new()
                    .name("socketd:scrape".into())
                    .spawn(move || {
                        scrape(stream, &link);
                        active.fetch_sub(1, Ordering::Relaxed);
                    });
                if let Err(e) = spawned {
                    log::warn!("metrics: cannot start a thread: {e}");
                }
            })?;
        Ok(())
    }
}

fn respond(stream: &mut TcpStream, status: &str, body: &str) -> io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body.as_bytes())
}

/// Read the request head (up to the blank line) within the deadline.
fn read_head(stream: &mut TcpStream) -> Result<String, &'static str> {
    let deadline = Instant::now() + READ_DEADLINE;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err("408 Request Timeout");
        }
        let _ = stream.set_read_timeout(Some(left));
        match stream.read(&mut chunk) {
            Ok(0) => return Err("400 Bad Request"),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return Err("408 Request Timeout"),
        }
        if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n") {
            return Ok(String::from_utf8_lossy(&buf).into_owned());
        }
        if buf.len() > MAX_HEAD {
            return Err("431 Request Header Fields Too Large");
        }
    }
}

fn scrape(mut stream: TcpStream, link: &LoopLink) {
    let _ = stream.set_write_timeout(Some(READ_DEADLINE));
    let head = match read_head(&mut stream) {
        Ok(h) => h,
        Err(status) => {
            let _ = respond(&mut stream, status, "");
            return;
        }
    };
    let mut words = head.lines().next().unwrap_or("").split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    if method != "GET" {
        let _ = respond(&mut stream, "405 Method Not Allowed", "only GET\n");
        return;
    }
    if path != "/metrics" {
        let _ = respond(&mut stream, "404 Not Found", "try /metrics\n");
        return;
    }
    match link.ask(Command::Status, ANSWER_DEADLINE) {
        Ok(mut reply) => {
            crate::control::add_process(&mut reply.body);
            let body = render(&reply.body["status"]);
            let _ = respond(&mut stream, "200 OK", &body);
        }
        Err(e) => {
            let _ = respond(&mut stream, "503 Service Unavailable", &format!("{e}\n"));
        }
    }
}

/// A label value with `\`, `"` and newlines escaped.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }
    fn sample(&mut self, name: &str, labels: &str, value: impl std::fmt::Display) {
        if labels.is_empty() {
            let _ = writeln!(self.0, "{name} {value}");
        } else {
            let _ = writeln!(self.0, "{name}{{{labels}}} {value}");
        }
    }
}

fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or(0.0)
}

/// The exposition text for a status document (`socketd status --json`'s `status`).
pub fn render(status: &Value) -> String {
    let mut o = Out(String::new());
    let empty = Vec::new();
    let listeners = status["listeners"].as_array().unwrap_or(&empty);
    let per = |o: &mut Out, name: &str, kind: &str, help: &str, key: &str| {
        o.family(name, kind, help);
        for l in listeners {
            let lbl = format!("listener=\"{}\"", label(l["name"].as_str().unwrap_or("")));
            o.sample(name, &lbl, num(&l[key]));
        }
    };
    per(
        &mut o,
        "socketd_connections_accepted_total",
        "counter",
        "Connections (or datagrams) accepted and admitted.",
        "accepted",
    );
    o.family(
        "socketd_connections_refused_total",
        "counter",
        "Connections or datagrams refused (or connections cut), by reason.",
    );
    for l in listeners {
        let name = label(l["name"].as_str().unwrap_or(""));
        for reason in crate::stats::REFUSAL_LABELS {
            let lbl = format!("listener=\"{name}\",reason=\"{reason}\"");
            o.sample(
                "socketd_connections_refused_total",
                &lbl,
                num(&l["refused"][reason]),
            );
        }
    }
    per(
        &mut o,
        "socketd_handler_errors_total",
        "counter",
        "Jobs that ended with a handler error, a panic or a failed worker process.",
        "handler_errors",
    );
    per(
        &mut o,
        "socketd_received_bytes_total",
        "counter",
        "Bytes received on connections (TCP) and in datagrams.",
        "bytes_in",
    );
    per(
        &mut o,
        "socketd_sent_bytes_total",
        "counter",
        "Bytes sent on connections (TCP).",
        "bytes_out",
    );
    per(
        &mut o,
        "socketd_connections_open",
        "gauge",
        "Connections (or datagrams) being handled now.",
        "open",
    );
    per(
        &mut o,
        "socketd_workers_busy",
        "gauge",
        "Worker threads or processes busy (event listeners: open connections).",
        "busy",
    );
    per(
        &mut o,
        "socketd_workers_max",
        "gauge",
        "The listener's max_workers.",
        "max_workers",
    );
    o.family(
        "socketd_listener_paused",
        "gauge",
        "1 while the listener is paused by socketd pause.",
    );
    for l in listeners {
        let lbl = format!("listener=\"{}\"", label(l["name"].as_str().unwrap_or("")));
        o.sample(
            "socketd_listener_paused",
            &lbl,
            u8::from(l["paused"] == Value::Bool(true)),
        );
    }
    o.family(
        "socketd_connection_duration_seconds",
        "histogram",
        "How long connections lasted, from accept to close.",
    );
    let mut seen = std::collections::HashSet::new();
    for l in listeners {
        let name = l["name"].as_str().unwrap_or("");
        if !seen.insert(name.to_string()) {
            continue; // a listener draining beside its successor of the same name
        }
        let h = crate::stats::listener(name).durations();
        let n = label(name);
        for (i, c) in h.cumulative.iter().enumerate() {
            let le = crate::stats::DURATION_BUCKETS
                .get(i)
                .map_or("+Inf".to_string(), |b| b.to_string());
            o.sample(
                "socketd_connection_duration_seconds_bucket",
                &format!("listener=\"{n}\",le=\"{le}\""),
                c,
            );
        }
        let lbl = format!("listener=\"{n}\"");
        o.sample(
            "socketd_connection_duration_seconds_sum",
            &lbl,
            h.sum_seconds,
        );
        o.sample("socketd_connection_duration_seconds_count", &lbl, h.count);
    }
    o.family(
        "socketd_reloads_total",
        "counter",
        "Reloads (SIGHUP or socketd reload), by result.",
    );
    let reloads = &status["reloads"];
    o.sample(
        "socketd_reloads_total",
        "result=\"ok\"",
        num(&reloads["ok"]),
    );
    o.sample(
        "socketd_reloads_total",
        "result=\"refused\"",
        num(&reloads["refused"]),
    );
    let access = &status["access_log"];
    o.family(
        "socketd_access_log_lines_total",
        "counter",
        "Access log lines written, and dropped (queue full or write failed).",
    );
    o.sample(
        "socketd_access_log_lines_total",
        "result=\"written\"",
        num(&access["written"]),
    );
    o.sample(
        "socketd_access_log_lines_total",
        "result=\"dropped\"",
        num(&access["dropped"]),
    );
    let p = &status["process"];
    o.family(
        "socketd_process_open_fds",
        "gauge",
        "Open file descriptors of the daemon process.",
    );
    o.sample("socketd_process_open_fds", "", num(&p["fds"]));
    o.family(
        "socketd_process_resident_memory_bytes",
        "gauge",
        "Resident memory of the daemon process.",
    );
    o.sample(
        "socketd_process_resident_memory_bytes",
        "",
        num(&p["rss_bytes"]),
    );
    o.family(
        "socketd_tls_handshake_failures_total",
        "counter",
        "TLS handshakes that failed (bad or no client certificate, not TLS, timeout, ...).",
    );
    o.sample(
        "socketd_tls_handshake_failures_total",
        "",
        num(&p["tls_handshake_failures"]),
    );
    o.family(
        "socketd_process_start_time_seconds",
        "gauge",
        "When the daemon started, in seconds since the Unix epoch.",
    );
    o.sample(
        "socketd_process_start_time_seconds",
        "",
        num(&p["started_unix"]),
    );
    o.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_listener_and_escapes_labels() {
        let status = serde_json::json!({
            "listeners": [{"name": "a\"b", "accepted": 3, "refused": {"rate": 2},
                           "open": 1, "busy": 1, "max_workers": 4, "paused": true}],
            "reloads": {"ok": 1, "refused": 2},
            "access_log": {"written": 5, "dropped": 6},
            "process": {"fds": 9, "rss_bytes": 1000, "started_unix": 7,
                        "tls_handshake_failures": 4},
        });
        let text = render(&status);
        assert!(text.contains("socketd_connections_accepted_total{listener=\"a\\\"b\"} 3\n"));
        assert!(text.contains(
            "socketd_connections_refused_total{listener=\"a\\\"b\",reason=\"rate\"} 2\n"
        ));
        assert!(text.contains("socketd_listener_paused{listener=\"a\\\"b\"} 1\n"));
        assert!(text.contains("socketd_reloads_total{result=\"refused\"} 2\n"));
        assert!(text.contains("socketd_access_log_lines_total{result=\"dropped\"} 6\n"));
        assert!(text.contains("socketd_process_open_fds 9\n"));
        assert!(text.contains("socketd_tls_handshake_failures_total 4\n"));
        assert!(text.contains("le=\"+Inf\""));
    }
}
