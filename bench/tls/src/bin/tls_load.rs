//! TLS load generator for the socketd TLS benchmark (bench/tls/run.sh). Loopback only.
//!
//!   tls_load hs     ADDR CA.pem SECONDS CLIENTS [PID...]   new TLS 1.3 handshakes: connect,
//!                                                         handshake, 64 B echo, close
//!   tls_load resume ADDR CA.pem SECONDS CLIENTS [PID...]   the same, resuming sessions
//!   tls_load bulk   ADDR CA.pem BYTES [PID...]             one stream of BYTES out and back
//!   tls_load idle   ADDR CA.pem COUNT PID                   RSS growth of PID per idle session
//!
//! Prints one line: operations per second (or MB/s) and the server processes' CPU time per
//! operation, read from /proc/PID/stat (utime + stime, children included) before and after.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

/// CPU seconds (user + system, with reaped children) of a process.
fn cpu(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields after the command: state is [0]; utime [11], stime [12], cutime [13], cstime [14].
    let ticks: u64 = (11..=14).filter_map(|i| f.get(i)?.parse::<u64>().ok()).sum();
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks as f64 / hz
}

/// Resident set size of a process, KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn config(ca: &str, resume: bool) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).expect("CA file") {
        roots.add(c.expect("pem")).expect("root");
    }
    let mut cfg = ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    if !resume {
        cfg.resumption = rustls::client::Resumption::disabled();
    }
    Arc::new(cfg)
}

fn one(addr: SocketAddr, cfg: &Arc<ClientConfig>) -> std::io::Result<bool> {
    let name = ServerName::try_from("localhost").expect("name");
    let conn = ClientConnection::new(Arc::clone(cfg), name).map_err(std::io::Error::other)?;
    let sock = TcpStream::connect(addr)?;
    sock.set_nodelay(true)?;
    sock.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut s = StreamOwned::new(conn, sock);
    s.write_all(&[7u8; 64])?;
    let mut got = [0u8; 64];
    s.read_exact(&mut got)?;
    let resumed = s.conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    s.conn.send_close_notify();
    let _ = s.flush();
    Ok(resumed)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mode = args[1].as_str();
    let addr: SocketAddr = args[2].parse().expect("ADDR");
    let ca = &args[3];
    match mode {
        "hs" | "resume" => {
            let secs: f64 = args[4].parse().expect("SECONDS");
            let clients: usize = args[5].parse().expect("CLIENTS");
            let pids: Vec<u32> = args[6..].iter().filter_map(|p| p.parse().ok()).collect();
            let cfg = config(ca, mode == "resume");
            let (done, resumed, errors) = (
                Arc::new(AtomicU64::new(0)),
                Arc::new(AtomicU64::new(0)),
                Arc::new(AtomicU64::new(0)),
            );
            let stop = Arc::new(AtomicBool::new(false));
            let cpu0: f64 = pids.iter().map(|p| cpu(*p)).sum();
            let t0 = Instant::now();
            let threads: Vec<_> = (0..clients)
                .map(|_| {
                    let (cfg, done, resumed, errors, stop) = (
                        Arc::clone(&cfg),
                        Arc::clone(&done),
                        Arc::clone(&resumed),
                        Arc::clone(&errors),
                        Arc::clone(&stop),
                    );
                    std::thread::spawn(move || {
                        while !stop.load(Ordering::Relaxed) {
                            match one(addr, &cfg) {
                                Ok(r) => {
                                    done.fetch_add(1, Ordering::Relaxed);
                                    if r {
                                        resumed.fetch_add(1, Ordering::Relaxed);
                                    }
                                }
                                Err(_) => {
                                    errors.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
                    })
                })
                .collect();
            std::thread::sleep(Duration::from_secs_f64(secs));
            stop.store(true, Ordering::Relaxed);
            for t in threads {
                let _ = t.join();
            }
            let took = t0.elapsed().as_secs_f64();
            let cpu1: f64 = pids.iter().map(|p| cpu(*p)).sum();
            let n = done.load(Ordering::Relaxed);
            println!(
                "{mode}: {:.0} handshakes/s ({n} in {took:.1}s, {} resumed, {} errors), server CPU {:.1} us/handshake",
                n as f64 / took,
                resumed.load(Ordering::Relaxed),
                errors.load(Ordering::Relaxed),
                (cpu1 - cpu0) * 1e6 / n.max(1) as f64
            );
        }
        "bulk" => {
            let total: u64 = args[4].parse().expect("BYTES");
            let pids: Vec<u32> = args[5..].iter().filter_map(|p| p.parse().ok()).collect();
            let cfg = config(ca, false);
            let name = ServerName::try_from("localhost").expect("name");
            let conn = ClientConnection::new(cfg, name).expect("client");
            let sock = TcpStream::connect(addr).expect("connect");
            sock.set_nodelay(true).expect("nodelay");
            sock.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
            let mut s = StreamOwned::new(conn, sock);
            let cpu0: f64 = pids.iter().map(|p| cpu(*p)).sum();
            let t0 = Instant::now();
            let chunk = vec![0x5au8; 64 * 1024];
            let (mut sent, mut got) = (0u64, 0u64);
            let mut buf = vec![0u8; 256 * 1024];
            // One owner for the rustls session: send a 1 MiB window, read it back, repeat (the
            // path's socket buffers hold a window, so neither side blocks the other).
            while got < total {
                let window = (total - sent).min(1 << 20);
                let mut w = 0;
                while w < window {
                    let n = (window - w).min(chunk.len() as u64) as usize;
                    s.write_all(&chunk[..n]).expect("write");
                    w += n as u64;
                }
                sent += window;
                while got < sent {
                    let n = s.read(&mut buf).expect("read");
                    assert!(n > 0, "closed early");
                    got += n as u64;
                }
            }
            let took = t0.elapsed().as_secs_f64();
            let cpu1: f64 = pids.iter().map(|p| cpu(*p)).sum();
            println!(
                "bulk: {:.0} MB/s each way ({} MiB out and back in {took:.2}s), server CPU {:.2}s",
                total as f64 / took / 1e6,
                total >> 20,
                cpu1 - cpu0
            );
        }
        "idle" => {
            let count: usize = args[4].parse().expect("COUNT");
            let pid: u32 = args[5].parse().expect("PID");
            let cfg = config(ca, false);
            let before = rss_kib(pid);
            let mut held = Vec::with_capacity(count);
            for _ in 0..count {
                let name = ServerName::try_from("localhost").expect("name");
                let conn = ClientConnection::new(Arc::clone(&cfg), name).expect("client");
                let sock = TcpStream::connect(addr).expect("connect");
                sock.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
                let mut s = StreamOwned::new(conn, sock);
                s.write_all(&[1u8; 64]).expect("write");
                let mut got = [0u8; 64];
                s.read_exact(&mut got).expect("echo");
                held.push(s);
            }
            std::thread::sleep(Duration::from_millis(500));
            let after = rss_kib(pid);
            println!(
                "idle: {count} TLS connections held: RSS {before} KiB -> {after} KiB, {:.1} KiB per connection",
                (after as f64 - before as f64) / count as f64
            );
        }
        _ => panic!("mode: hs | resume | bulk | idle"),
    }
}
