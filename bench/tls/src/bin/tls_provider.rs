//! Server-side TLS 1.3 handshake cost by rustls crypto provider (`ring` vs `aws-lc-rs`): full
//! handshakes between an in-memory client and server, timing only the server's calls in
//! thread CPU time, so the number is handshakes per second of one server core. This is what chose socketd's provider.
//!
//!   tls_provider CA.pem CERT.pem KEY.pem [SECONDS]
//!
//! Prints one line per provider: handshakes, server CPU seconds, handshakes/s per core.

use std::io::Cursor;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};

/// This thread's CPU time: robust to a loaded machine, unlike wall-clock time.
#[derive(Clone, Copy)]
struct Cpu(Duration);

impl Cpu {
    fn now() -> Cpu {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes the timespec we own.
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        Cpu(Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
    }

    fn elapsed(self) -> Duration {
        Cpu::now().0.saturating_sub(self.0)
    }
}

/// Move every pending record from one side to the other.
fn pump(from: &mut dyn FnMut(&mut Vec<u8>), to: &mut dyn FnMut(&[u8])) -> bool {
    let mut buf = Vec::new();
    from(&mut buf);
    if buf.is_empty() {
        return false;
    }
    to(&buf);
    true
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (ca, cert, key) = (&args[1], &args[2], &args[3]);
    let secs: f64 = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(3.0);
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .expect("cert")
        .collect::<Result<_, _>>()
        .expect("pem");
    let key = PrivateKeyDer::from_pem_file(key).expect("key");
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).expect("CA") {
        roots.add(c.expect("pem")).expect("root");
    }
    let providers: [(&str, CryptoProvider); 2] = [
        ("ring", rustls::crypto::ring::default_provider()),
        ("aws-lc-rs", rustls::crypto::aws_lc_rs::default_provider()),
    ];
    // One client config (ring) for all runs: only the server side is timed.
    let mut client =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
    // Full handshakes only: a resumed one skips the signature that dominates the cost.
    client.resumption = rustls::client::Resumption::disabled();
    let client = Arc::new(client);
    for (name, provider) in providers {
        let server = Arc::new(
            ServerConfig::builder_with_provider(Arc::new(provider))
                .with_protocol_versions(&[&rustls::version::TLS13])
                .expect("versions")
                .with_no_client_auth()
                .with_single_cert(chain.clone(), key.clone_key())
                .expect("server cert"),
        );
        let (mut n, mut server_time) = (0u64, Duration::ZERO);
        let started = Instant::now();
        while started.elapsed().as_secs_f64() < secs {
            let sname = ServerName::try_from("localhost").expect("name");
            let mut c = ClientConnection::new(Arc::clone(&client), sname).expect("client");
            let t = Cpu::now();
            let mut s = ServerConnection::new(Arc::clone(&server)).expect("server");
            server_time += t.elapsed();
            while c.is_handshaking() || s.is_handshaking() {
                let moved_c = pump(
                    &mut |b| {
                        c.write_tls(b).expect("client write");
                    },
                    &mut |b| {
                        let t = Cpu::now();
                        s.read_tls(&mut Cursor::new(b)).expect("server read");
                        s.process_new_packets().expect("server process");
                        server_time += t.elapsed();
                    },
                );
                let moved_s = pump(
                    &mut |b| {
                        let t = Cpu::now();
                        s.write_tls(b).expect("server write");
                        server_time += t.elapsed();
                    },
                    &mut |b| {
                        c.read_tls(&mut Cursor::new(b)).expect("client read");
                        c.process_new_packets().expect("client process");
                    },
                );
                if !moved_c && !moved_s {
                    break;
                }
            }
            assert!(!s.is_handshaking(), "handshake did not finish");
            n += 1;
        }
        println!(
            "{name:>10}: {n} handshakes, server {:.3}s CPU, {:.0} handshakes/s per core",
            server_time.as_secs_f64(),
            n as f64 / server_time.as_secs_f64()
        );
    }
}
