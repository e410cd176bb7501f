//! The library's tutorial programs (`examples/tcp_server.rs`, `makefile_server.rs`,
//! `threading_server.rs`, `udp_server.rs`) run as real processes: each binds the address given
//! as its first argument (port 0 here), prints `listening on ADDR`, and a real client checks
//! its answers. The library leaves signal dispositions alone, so SIGTERM ends a server by the
//! default action: the tests stop them by PID and check it was that signal that ended them.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use crate::harness::*;

/// A running example server: its process and the lines it prints on stdout.
struct Example {
    name: &'static str,
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
    addr: SocketAddr,
}

impl Example {
    /// Start example `name` on `127.0.0.1:0` and wait for its `listening on ADDR` line.
    fn start(name: &'static str) -> Example {
        let mut cmd = command(&example_bin(name));
        cmd.arg("127.0.0.1:0").stdout(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn the example");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut ex = Example {
            name,
            child,
            lines,
            seen: Vec::new(),
            addr: "127.0.0.1:0".parse().expect("addr"),
        };
        let first = ex.wait_line("listening on ", READY_TIMEOUT);
        ex.addr = first["listening on ".len()..]
            .parse()
            .unwrap_or_else(|e| panic!("{name}: {first:?} does not name an address: {e}"));
        assert_ne!(
            ex.addr.port(),
            0,
            "{name}: server_address() tells the real port"
        );
        ex
    }

    /// The next stdout line that starts with `prefix` (panics after `timeout`).
    fn wait_line(&mut self, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.starts_with(prefix) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "{}: no stdout line starting with {prefix:?} within {timeout:?}; saw {:?}",
                    self.name, self.seen
                ),
            }
        }
    }

    /// SIGTERM by PID; returns how the process ended.
    fn terminate(mut self) -> ExitStatus {
        let pid = self.child.id() as i32;
        // SAFETY: kill(2) on our own child's pid, which has not been reaped yet.
        assert_eq!(
            unsafe { libc::kill(pid, libc::SIGTERM) },
            0,
            "kill -TERM {pid}"
        );
        let mut status = None;
        wait_until("the example to exit after SIGTERM", STOP_BUDGET, || {
            status = self.child.try_wait().expect("waitpid");
            status.is_some()
        });
        status.expect("exited")
    }
}

impl Drop for Example {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The library changed no signal disposition: SIGTERM's default action ended the process.
fn assert_ended_by_sigterm(status: ExitStatus, name: &str) {
    assert_eq!(
        status.signal(),
        Some(libc::SIGTERM),
        "{name}: expected death by the default SIGTERM action, got {status:?}"
    );
}

#[test]
fn tcp_server_example_answers_received_data() {
    let ex = Example::start("tcp_server");
    for round in 0..2 {
        // One client at a time, each answered chunk by chunk until it closes.
        let mut s = Stream::tcp(ex.addr);
        s.write_all(b"hello").expect("send");
        let expected = "已接收到数据 hello".as_bytes();
        assert_bytes_eq(expected, &s.read_n(expected.len()));
        s.write_all("第二块".as_bytes()).expect("send");
        let expected = "已接收到数据 第二块".as_bytes();
        assert_bytes_eq(expected, &s.read_n(expected.len()));
        s.shutdown_write();
        assert_eq!(
            s.read_to_end_vec(),
            b"",
            "round {round}: the server closes after the client does"
        );
    }
    let status = ex.terminate();
    assert_ended_by_sigterm(status, "tcp_server");
}

#[test]
fn makefile_server_example_reads_a_line_and_writes_it_upper_cased() {
    let mut ex = Example::start("makefile_server");
    let mut s = Stream::tcp(ex.addr);
    s.write_all(b"hello world\n").expect("send");
    assert_eq!(s.read_line(), "HELLO WORLD\n");
    assert_eq!(
        s.read_to_end_vec(),
        b"",
        "one line per connection, then close"
    );
    let line = ex.wait_line("127.0.0.1:", READY_TIMEOUT);
    assert!(
        line.ends_with(" wrote: hello world"),
        "stdout line {line:?}"
    );

    // A second client is served the same way (the first one's request is over).
    let mut s = Stream::tcp(ex.addr);
    s.write_all(b"  Mixed Case  \n").expect("send");
    assert_eq!(s.read_line(), "MIXED CASE\n");
    drop(s);
    let status = ex.terminate();
    assert_ended_by_sigterm(status, "makefile_server");
}

#[test]
fn udp_server_example_answers_each_datagram() {
    let mut ex = Example::start("udp_server");
    let c = Dgram::udp(ex.addr);
    assert_eq!(lossy(&c.request(b"hello")), "已接收到数据 hello");
    assert_eq!(lossy(&c.request(b"again")), "已接收到数据 again");
    let line = ex.wait_line("127.0.0.1:", READY_TIMEOUT);
    assert!(line.ends_with(" wrote: hello"), "stdout line {line:?}");
    let status = ex.terminate();
    assert_ended_by_sigterm(status, "udp_server");
}

#[test]
fn threading_server_example_serves_then_shuts_down_and_closes() {
    // The example is its own client: three requests, then shutdown() from the main thread
    // and server_close() on the serving thread, then it binds the same address again.
    let out = run_with_timeout(command(&example_bin("threading_server")), READY_TIMEOUT);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(
        lines[..3],
        [
            "Your msg=Hello World 1",
            "Your msg=Hello World 2",
            "Your msg=Hello World 3"
        ],
        "{}",
        out.describe()
    );
    assert_eq!(lines.len(), 4, "{}", out.describe());
    assert!(
        lines[3].starts_with("stopped; 127.0.0.1:") && lines[3].ends_with(" is free again"),
        "{}",
        out.describe()
    );
}
