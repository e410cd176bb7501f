//! The load loops. Each client runs on its own thread until the shared deadline and checks
//! every byte it gets back against what it sent; a mismatch is fatal (`Outcome::corrupt`).

use crate::hist::Hist;
use crate::target::{Stream, Target};
use std::io::{self, Read, Write};
use std::net::UdpSocket;
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

/// What one client thread did.
pub struct Outcome {
    pub hist: Hist,
    pub ops: u64,
    pub bytes: u64,
    pub errors: u64,
    pub lost: u64,
    pub corrupt: u64,
    pub first_error: Option<String>,
}

impl Outcome {
    pub fn new() -> Outcome {
        Outcome {
            hist: Hist::new(),
            ops: 0,
            bytes: 0,
            errors: 0,
            lost: 0,
            corrupt: 0,
            first_error: None,
        }
    }

    pub fn error(&mut self, what: &str, e: &dyn std::fmt::Display) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(format!("{what}: {e}"));
        }
    }

    pub fn merge(&mut self, o: Outcome) {
        self.hist.merge(&o.hist);
        self.ops += o.ops;
        self.bytes += o.bytes;
        self.errors += o.errors;
        self.lost += o.lost;
        self.corrupt += o.corrupt;
        if self.first_error.is_none() {
            self.first_error = o.first_error;
        }
    }
}

/// The parameters every mode shares.
#[derive(Clone)]
pub struct Load {
    pub target: Target,
    pub size: usize,
    pub deadline: Instant,
    pub io_timeout: Duration,
    pub bytes: u64,
}

/// The message a client sends for its `seq`-th operation: different every time, so a reply
/// meant for another request (or a stale datagram) cannot pass for this one.
pub fn fill(buf: &mut [u8], client: usize, seq: u64) {
    let base = (seq as usize)
        .wrapping_mul(31)
        .wrapping_add(client.wrapping_mul(7));
    for (i, b) in buf.iter_mut().enumerate() {
        *b = (base.wrapping_add(i) & 0xff) as u8;
    }
    if buf.len() >= 8 {
        buf[..8].copy_from_slice(&seq.to_le_bytes());
    }
}

pub fn nanos(since: Instant) -> u64 {
    since.elapsed().as_nanos().min(u64::MAX as u128) as u64
}

/// Request/response on one long-lived connection: write a message, read it back whole.
pub fn request_response(load: &Load, client: usize) -> Outcome {
    let mut out = Outcome::new();
    let mut s = match load.target.connect(load.io_timeout) {
        Ok(s) => s,
        Err(e) => {
            out.error("connect", &e);
            return out;
        }
    };
    let mut msg = vec![0u8; load.size];
    let mut back = vec![0u8; load.size];
    let mut seq = 0u64;
    while Instant::now() < load.deadline {
        fill(&mut msg, client, seq);
        let t0 = Instant::now();
        if let Err(e) = s.write_all(&msg).and_then(|_| s.read_exact(&mut back)) {
            out.error("request", &e);
            return out;
        }
        out.hist.record(nanos(t0));
        if back != msg {
            out.corrupt += 1;
            return out;
        }
        out.ops += 1;
        out.bytes += load.size as u64;
        seq += 1;
    }
    out
}

/// Connect, send one message, read it back, close; repeat.
pub fn connect_per_request(load: &Load, client: usize) -> Outcome {
    let mut out = Outcome::new();
    let mut msg = vec![0u8; load.size];
    let mut back = vec![0u8; load.size];
    let mut seq = 0u64;
    while Instant::now() < load.deadline {
        fill(&mut msg, client, seq);
        seq += 1;
        let t0 = Instant::now();
        let r = load
            .target
            .connect(load.io_timeout)
            .and_then(|mut s: Stream| {
                s.write_all(&msg)?;
                s.read_exact(&mut back)?;
                Ok(())
            });
        match r {
            Ok(()) if back == msg => {
                out.hist.record(nanos(t0));
                out.ops += 1;
                out.bytes += load.size as u64;
            }
            Ok(()) => {
                out.corrupt += 1;
                return out;
            }
            Err(e) => {
                out.error("connect-send-receive", &e);
                // A peer that refuses (xinetd's cps limit) must not turn this into a spin.
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
    out
}

/// A datagram socket connected to the target, for either family.
enum Dgram {
    Udp(UdpSocket),
    Unix(UnixDatagram, std::path::PathBuf),
}

impl Dgram {
    fn send(&self, b: &[u8]) -> io::Result<usize> {
        match self {
            Dgram::Udp(s) => s.send(b),
            Dgram::Unix(s, _) => s.send(b),
        }
    }
    fn recv(&self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            Dgram::Udp(s) => s.recv(b),
            Dgram::Unix(s, _) => s.recv(b),
        }
    }
}

impl Drop for Dgram {
    fn drop(&mut self) {
        if let Dgram::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn dgram(target: &Target, client: usize, timeout: Duration) -> io::Result<Dgram> {
    let d = match target {
        Target::Udp(a) => {
            let bind = if a.is_ipv4() {
                "127.0.0.1:0"
            } else {
                "[::1]:0"
            };
            let s = UdpSocket::bind(bind)?;
            s.connect(a)?;
            s.set_read_timeout(Some(timeout))?;
            Dgram::Udp(s)
        }
        Target::UnixDgram(p) => {
            let me =
                std::env::temp_dir().join(format!("loadgen-{}-{client}.sock", std::process::id()));
            let _ = std::fs::remove_file(&me);
            let s = UnixDatagram::bind(&me)?;
            s.connect(p)?;
            s.set_read_timeout(Some(timeout))?;
            Dgram::Unix(s, me)
        }
        _ => return Err(io::Error::new(io::ErrorKind::InvalidInput, "stream target")),
    };
    Ok(d)
}

/// Datagram request/response; a reply that does not come within the timeout counts as lost.
pub fn datagram(load: &Load, client: usize) -> Outcome {
    let mut out = Outcome::new();
    let d = match dgram(&load.target, client, load.io_timeout) {
        Ok(d) => d,
        Err(e) => {
            out.error("socket", &e);
            return out;
        }
    };
    let mut msg = vec![0u8; load.size.max(8)];
    let mut back = vec![0u8; msg.len() + 1];
    let mut seq = 0u64;
    while Instant::now() < load.deadline {
        fill(&mut msg, client, seq);
        seq += 1;
        let t0 = Instant::now();
        if let Err(e) = d.send(&msg) {
            out.error("send", &e);
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        loop {
            match d.recv(&mut back) {
                Ok(n) if back[..n] == msg[..] => {
                    out.hist.record(nanos(t0));
                    out.ops += 1;
                    out.bytes += n as u64;
                    break;
                }
                // A late reply to an earlier, already-counted-lost request: keep waiting.
                Ok(n) if n >= 8 && back[..8] != msg[..8] => continue,
                Ok(_) => {
                    out.corrupt += 1;
                    return out;
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    out.lost += 1;
                    break;
                }
                Err(e) => {
                    out.error("recv", &e);
                    break;
                }
            }
        }
    }
    out
}

const BULK_CHUNK: usize = 64 * 1024;

const BULK_PERIOD: usize = 251;

/// The bulk stream's bytes: byte `i` is `i % 251`, a period no power-of-two chunking aligns
/// with, so a lost, repeated or reordered chunk shows. Long enough to slice any chunk from.
fn bulk_pattern() -> Vec<u8> {
    (0..BULK_CHUNK + BULK_PERIOD)
        .map(|i| (i % BULK_PERIOD) as u8)
        .collect()
}

fn bulk_slice(pattern: &[u8], offset: u64, n: usize) -> &[u8] {
    let start = (offset % BULK_PERIOD as u64) as usize;
    &pattern[start..start + n]
}

/// One stream of `load.bytes` written while a second thread reads the echo and checks every
/// byte; the write side is shut down at the end and the read side waits for EOF.
pub fn bulk(load: &Load, _client: usize) -> Outcome {
    let mut out = Outcome::new();
    let t0 = Instant::now();
    let s = match load.target.connect(load.io_timeout) {
        Ok(s) => s,
        Err(e) => {
            out.error("connect", &e);
            return out;
        }
    };
    let mut w = match s.try_clone() {
        Ok(w) => w,
        Err(e) => {
            out.error("clone", &e);
            return out;
        }
    };
    let total = load.bytes;
    let deadline = load.deadline;
    let writer = std::thread::spawn(move || -> io::Result<()> {
        let pattern = bulk_pattern();
        let mut off = 0u64;
        while off < total {
            if Instant::now() >= deadline {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "bulk deadline"));
            }
            let n = (total - off).min(BULK_CHUNK as u64) as usize;
            w.write_all(bulk_slice(&pattern, off, n))?;
            off += n as u64;
        }
        w.shutdown_write()
    });
    let mut r = s;
    let pattern = bulk_pattern();
    let mut buf = vec![0u8; BULK_CHUNK];
    let mut got = 0u64;
    loop {
        if Instant::now() >= load.deadline {
            out.error("read", &"bulk deadline passed");
            break;
        }
        match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if buf[..n] != *bulk_slice(&pattern, got, n) {
                    out.corrupt += 1;
                    break;
                }
                got += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                out.error("read", &e);
                break;
            }
        }
    }
    match writer.join() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => out.error("write", &e),
        Err(_) => out.error("write", &"writer thread panicked"),
    }
    if got != total && out.corrupt == 0 {
        out.error("bulk", &format!("received {got} of {total} bytes"));
    } else if out.errors == 0 && out.corrupt == 0 {
        out.ops = 1;
        out.hist.record(nanos(t0));
    }
    out.bytes = got;
    out
}

/// Opens `conns` connections from one thread, says so on stderr, holds them until the
/// deadline, then proves each still echoes one message. Measures memory per idle connection.
pub fn idle(load: &Load, conns: usize) -> Outcome {
    let mut out = Outcome::new();
    let mut open = Vec::with_capacity(conns);
    for _ in 0..conns {
        match load.target.connect(load.io_timeout) {
            Ok(s) => open.push(s),
            Err(e) => out.error("connect", &e),
        }
    }
    eprintln!("loadgen: idle: {} connections open", open.len());
    while Instant::now() < load.deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut msg = vec![0u8; load.size];
    let mut back = vec![0u8; load.size];
    for (client, s) in open.iter_mut().enumerate() {
        fill(&mut msg, client, 0);
        let t0 = Instant::now();
        match s.write_all(&msg).and_then(|_| s.read_exact(&mut back)) {
            Ok(()) if back == msg => {
                out.hist.record(nanos(t0));
                out.ops += 1;
            }
            Ok(()) => out.corrupt += 1,
            Err(e) => out.error("echo after idle", &e),
        }
    }
    out
}
