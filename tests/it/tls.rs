//! TLS on stream listeners (issue 11) with real clients: `openssl s_client` (TLS 1.2 and 1.3,
//! SNI, ALPN, client certificates), `curl` through TLS proxies, and an in-test rustls client
//! for precise checks (peer certificate, long connections across a reload). Every key and
//! certificate is generated here with rcgen; nothing that expires is checked in.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

use crate::harness::*;

const MODELS: [&str; 3] = ["threaded", "forked", "event"];

/// A CA, a server certificate for `localhost`, one for `other.test` (SNI), a client
/// certificate from the CA, and a client certificate from an unrelated CA, as PEM files.
struct Pki {
    dir: TestDir,
}

fn ca(name: &str) -> (CertificateParams, KeyPair, String) {
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let cert = params.self_signed(&key).expect("self-sign the CA");
    (params, key, cert.pem())
}

fn leaf(issuer: &Issuer<'_, KeyPair>, cn: &str, names: &[&str]) -> (String, String) {
    let key = KeyPair::generate().expect("key");
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let mut params = CertificateParams::new(names).expect("params");
    params.distinguished_name.push(DnType::CommonName, cn);
    let cert = params.signed_by(&key, issuer).expect("sign");
    (cert.pem(), key.serialize_pem())
}

impl Pki {
    fn new() -> Pki {
        let dir = TestDir::new();
        let (ca_params, ca_key, ca_pem) = ca("socketd test CA");
        let issuer = Issuer::new(ca_params, ca_key);
        let (rogue_params, rogue_key, rogue_pem) = ca("rogue CA");
        let rogue = Issuer::new(rogue_params, rogue_key);
        let write = |name: &str, text: &str| {
            std::fs::write(dir.path().join(name), text).expect("write a PEM file");
        };
        write("ca.pem", &ca_pem);
        write("rogue-ca.pem", &rogue_pem);
        for (name, cn, sans, by) in [
            ("server", "localhost", vec!["localhost"], &issuer),
            ("server2", "localhost rotated", vec!["localhost"], &issuer),
            ("other", "other.test", vec!["other.test"], &issuer),
            ("client", "test client", vec![], &issuer),
            ("rogue-client", "rogue client", vec![], &rogue),
        ] {
            let (cert, key) = leaf(by, cn, &sans);
            write(&format!("{name}.pem"), &cert);
            write(&format!("{name}.key"), &key);
        }
        Pki { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn p(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }

    /// `cert = "...", key = "..."` for the server certificate `name`.
    fn server(&self, name: &str) -> String {
        format!(
            "cert = \"{}\", key = \"{}\"",
            self.p(&format!("{name}.pem")),
            self.p(&format!("{name}.key"))
        )
    }
}

fn listener(name: &str, workers: &str, handler: &str, extra: &str) -> String {
    format!(
        "[[listener]]\nname = \"{name}\"\nprotocol = \"tcp\"\naddress = \"127.0.0.1:0\"\n\
         handler = \"{handler}\"\nworkers = \"{workers}\"\n{extra}\n"
    )
}

const DAEMON: &str = "[daemon]\nshutdown_timeout = \"2s\"\naccess_log = \"stderr\"\n";

/// An in-test rustls client; `Err` carries the handshake error.
fn rustls_client(
    addr: SocketAddr,
    pki: &Pki,
    client: Option<&str>,
) -> Result<rustls::StreamOwned<rustls::ClientConnection, TcpStream>, String> {
    let mut roots = rustls::RootCertStore::empty();
    let ca = std::fs::read(pki.path("ca.pem")).expect("ca");
    use rustls::pki_types::pem::PemObject;
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(&ca) {
        roots.add(c.expect("pem")).expect("root");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots);
    let config = match client {
        Some(name) => {
            let chain =
                rustls::pki_types::CertificateDer::pem_file_iter(pki.path(&format!("{name}.pem")))
                    .expect("client cert")
                    .collect::<Result<Vec<_>, _>>()
                    .expect("pem");
            let key =
                rustls::pki_types::PrivateKeyDer::from_pem_file(pki.path(&format!("{name}.key")))
                    .expect("client key");
            builder
                .with_client_auth_cert(chain, key)
                .expect("client auth")
        }
        None => builder.with_no_client_auth(),
    };
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let conn = rustls::ClientConnection::new(Arc::new(config), name).expect("client");
    let sock = TcpStream::connect(addr).expect("connect");
    sock.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    let mut s = rustls::StreamOwned::new(conn, sock);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock).map_err(|e| e.to_string())?;
    }
    // TLS 1.3: a refused client certificate shows on the first read, not in the handshake.
    Ok(s)
}

/// The CN of the certificate the server showed.
fn server_cn(s: &rustls::StreamOwned<rustls::ClientConnection, TcpStream>) -> String {
    let der = s
        .conn
        .peer_certificates()
        .and_then(|c| c.first())
        .expect("a server certificate")
        .as_ref()
        .to_vec();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).expect("parse");
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .unwrap_or_default()
        .to_string();
    cn
}

fn echo_line(
    s: &mut rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
    line: &str,
) -> String {
    s.write_all(line.as_bytes()).expect("write");
    s.flush().expect("flush");
    let mut got = vec![0u8; line.len()];
    s.read_exact(&mut got).expect("echo");
    String::from_utf8_lossy(&got).into_owned()
}

/// Run `openssl s_client` on `addr` with `args`, feeding `input` and keeping its stdin open
/// until its output shows `until` (or it exits, or the deadline passes); then close stdin and
/// stop it by pid. Returns stdout and stderr together.
fn s_client(addr: SocketAddr, args: &[&str], input: &str, until: &str) -> String {
    let target = ["-connect".to_string(), addr.to_string()];
    s_client_at(&target, args, input, until)
}

fn s_client_at(target: &[String], args: &[&str], input: &str, until: &str) -> String {
    let mut child = Command::new("openssl")
        .arg("s_client")
        .args(target)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl s_client (install openssl)");
    let out = Arc::new(std::sync::Mutex::new(String::new()));
    let readers: Vec<_> = [
        Box::new(child.stdout.take().expect("stdout")) as Box<dyn Read + Send>,
        Box::new(child.stderr.take().expect("stderr")) as Box<dyn Read + Send>,
    ]
    .into_iter()
    .map(|mut r| {
        let out = Arc::clone(&out);
        std::thread::spawn(move || {
            let mut b = [0u8; 4096];
            while let Ok(n) = r.read(&mut b) {
                if n == 0 {
                    break;
                }
                out.lock()
                    .expect("lock")
                    .push_str(&String::from_utf8_lossy(&b[..n]));
            }
        })
    })
    .collect();
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(input.as_bytes()).expect("feed s_client");
    let started = Instant::now();
    while started.elapsed() < OP_DEADLINE {
        if out.lock().expect("lock").contains(until) {
            break;
        }
        if child.try_wait().ok().flatten().is_some() {
            break;
        }
        std::thread::sleep(POLL);
    }
    drop(stdin);
    let closing = Instant::now();
    while child.try_wait().ok().flatten().is_none() {
        if closing.elapsed() > Duration::from_secs(2) {
            // SAFETY: kill(2) on our own unreaped child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
            break;
        }
        std::thread::sleep(POLL);
    }
    for r in readers {
        let _ = r.join();
    }
    let text = out.lock().expect("lock").clone();
    text
}

/// A program that answers one line with its `SSL_*` environment and exits.
const ENV_PROGRAM: &str = "exec = { argv = [\"/bin/sh\", \"-c\", \"read x; echo got=$x; env | grep ^SSL_ | sort; echo end\"] }";

#[test]
fn tls_s_client_versions_sni_alpn_in_every_model() {
    let pki = Pki::new();
    let mut config = DAEMON.to_string();
    for m in MODELS {
        let tls = format!(
            "tls = {{ {}, alpn = [\"h2\", \"x-test\"], sni = [{{ names = [\"other.test\"], {} }}] }}",
            pki.server("server"),
            pki.server("other")
        );
        config.push_str(&listener(&format!("echo-{m}"), m, "echo", &tls));
    }
    let d = Daemon::start(&config);
    for m in MODELS {
        let addr = d.addr(&format!("echo-{m}"));
        for (flag, version) in [("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")] {
            let out = s_client(
                addr,
                &[
                    flag,
                    "-servername",
                    "other.test",
                    "-alpn",
                    "x-test",
                    "-CAfile",
                    &pki.p("ca.pem"),
                    "-quiet",
                    "-no_ign_eof",
                ],
                "ping\n",
                "ping",
            );
            // -quiet prints only the data; a second run with -brief shows the parameters.
            assert!(
                out.contains("ping"),
                "{m} {version}: no echo\n{out}\n{}",
                d.log_dump()
            );
        }
        let out = s_client(
            addr,
            &[
                "-tls1_3",
                "-servername",
                "other.test",
                "-alpn",
                "x-test",
                "-CAfile",
                &pki.p("ca.pem"),
                "-brief",
            ],
            "",
            "Verification",
        );
        assert_contains(
            &out,
            &[
                "Protocol version: TLSv1.3",
                "Peer certificate: CN = other.test",
                "Verification: OK",
            ],
        );
        let out = s_client(
            addr,
            &["-tls1_2", "-alpn", "x-test", "-CAfile", &pki.p("ca.pem")],
            "",
            "Verify return code",
        );
        assert_contains(
            &out,
            &[
                "Protocol  : TLSv1.2",
                "ALPN protocol: x-test",
                "CN = localhost",
            ],
        );
    }
    // Every model's access line carries the session.
    for m in MODELS {
        wait_access_line(
            &d,
            &format!("echo-{m}"),
            &["tls=TLSv1.3 cipher=TLS_", "sni=other.test alpn=x-test"],
        );
    }
}

/// Waits (up to `IO_TIMEOUT`) for an access line of `listener` that contains every one of
/// `parts`; fails with the daemon's log otherwise.
fn wait_access_line(d: &Daemon, listener: &str, parts: &[&str]) {
    let start = format!("access: listener `{listener}` peer ");
    let deadline = Instant::now() + IO_TIMEOUT;
    loop {
        let log = d.log();
        if log
            .lines()
            .any(|l| l.contains(&start) && parts.iter().all(|p| l.contains(p)))
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{listener}: no access line with {parts:?}\n{}",
            d.log_dump()
        );
        std::thread::sleep(POLL);
    }
}

#[test]
fn tls_exec_sees_plaintext_and_ssl_env_with_a_client_certificate() {
    let pki = Pki::new();
    let mut config = DAEMON.to_string();
    for m in ["threaded", "forked"] {
        let tls = format!(
            "tls = {{ {}, client_ca = \"{}\", client_auth = \"optional\", alpn = [\"x-test\"] }}\n{ENV_PROGRAM}",
            pki.server("server"),
            pki.p("ca.pem")
        );
        config.push_str(&listener(&format!("env-{m}"), m, "exec", &tls));
    }
    let d = Daemon::start(&config);
    for m in ["threaded", "forked"] {
        let addr = d.addr(&format!("env-{m}"));
        let out = s_client(
            addr,
            &[
                "-servername",
                "localhost",
                "-alpn",
                "x-test",
                "-cert",
                &pki.p("client.pem"),
                "-key",
                &pki.p("client.key"),
                "-CAfile",
                &pki.p("ca.pem"),
                "-quiet",
                "-ign_eof",
            ],
            "hello\n",
            "end",
        );
        assert_contains(
            &out,
            &[
                "got=hello",
                "SSL_ALPN=x-test",
                "SSL_CIPHER=TLS_",
                "SSL_CLIENT_CERT=-----BEGIN CERTIFICATE-----",
                "SSL_CLIENT_I_DN=CN=socketd test CA",
                "SSL_CLIENT_S_DN=CN=test client",
                "SSL_CLIENT_VERIFY=SUCCESS",
                "SSL_PROTOCOL=TLSv1.3",
                "SSL_SERVER_NAME=localhost",
                "end",
            ],
        );
        // Without a certificate (optional): verified NONE, no client DN.
        let out = s_client(addr, &["-tls1_2", "-quiet", "-ign_eof"], "bye\n", "end");
        assert_contains(
            &out,
            &["got=bye", "SSL_CLIENT_VERIFY=NONE", "SSL_PROTOCOL=TLSv1.2"],
        );
        assert!(!out.contains("SSL_CLIENT_S_DN"), "{out}");
        // The program's access line carries the session too (a forked program's is written
        // when the fork server reaps it).
        wait_access_line(
            &d,
            &format!("env-{m}"),
            &["tls=TLSv1.3 cipher=TLS_", "alpn=x-test", "CN=test client"],
        );
    }
}

#[test]
fn tls_mutual_auth_refuses_no_certificate_and_another_cas_certificate() {
    let pki = Pki::new();
    let tls = format!(
        "tls = {{ {}, client_ca = \"{}\", client_auth = \"required\" }}",
        pki.server("server"),
        pki.p("ca.pem")
    );
    let d = Daemon::start(&format!(
        "{DAEMON}{}",
        listener("m", "threaded", "echo", &tls)
    ));
    let addr = d.addr("m");
    let mut good = rustls_client(addr, &pki, Some("client")).expect("a CA-signed client is let in");
    assert_eq!(echo_line(&mut good, "in\n"), "in\n");
    for (who, cert) in [
        ("no certificate", None),
        ("another CA's certificate", Some("rogue-client")),
    ] {
        let refused = match rustls_client(addr, &pki, cert) {
            Err(_) => true,
            Ok(mut s) => {
                let _ = s.write_all(b"x\n");
                let mut b = [0u8; 1];
                !matches!(s.read(&mut b), Ok(1))
            }
        };
        assert!(refused, "{who}: was served\n{}", d.log_dump());
    }
    d.wait_log("TLS handshake failed: no client certificate", IO_TIMEOUT);
    d.wait_log("TLS handshake failed: unknown CA", IO_TIMEOUT);
}

/// A plain HTTP/1.0 server that answers every request with `body` (bounded count).
fn http_upstream(body: &'static str, count: usize) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind http");
    let addr = l.local_addr().expect("addr");
    std::thread::spawn(move || {
        for s in l.incoming().take(count) {
            let Ok(mut s) = s else { continue };
            let _ = s.set_read_timeout(Some(IO_TIMEOUT));
            let mut req = Vec::new();
            let mut b = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut b) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&b[..n]),
                }
            }
            let reply = format!(
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(reply.as_bytes());
        }
    });
    addr
}

fn curl(args: &[&str]) -> String {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .args(args)
        .output()
        .expect("curl (install curl)");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn tls_proxy_in_out_and_both_ways_with_curl() {
    let pki = Pki::new();
    let http = http_upstream("hello from plain http", 18);
    for m in MODELS {
        // tls-in: TLS in, plain out. A port for `plain-out` is only known after start, so
        // the TLS-out proxies point at a second daemon's TLS-in listener.
        let front = Daemon::start(&format!(
            "{DAEMON}{}",
            listener(
                "tls-in",
                m,
                "proxy",
                &format!(
                    "tls = {{ {} }}\nproxy = {{ upstream = \"{http}\" }}",
                    pki.server("server")
                )
            )
        ));
        let tls_in = front.addr("tls-in");
        let out = curl(&[
            "--cacert",
            &pki.p("ca.pem"),
            &format!("https://localhost:{}/", tls_in.port()),
            "--resolve",
            &format!("localhost:{}:127.0.0.1", tls_in.port()),
        ]);
        assert!(
            out.contains("hello from plain http"),
            "{m} TLS in, plain out: {out}\n{}",
            front.log_dump()
        );
        let up_tls = format!(
            "tls = {{ server_name = \"localhost\", ca = \"{}\" }}",
            pki.p("ca.pem")
        );
        let back = Daemon::start(&format!(
            "{DAEMON}{}{}",
            listener(
                "plain-in",
                m,
                "proxy",
                &format!("proxy = {{ upstream = \"{tls_in}\", {up_tls} }}")
            ),
            listener(
                "both",
                m,
                "proxy",
                &format!(
                    "tls = {{ {} }}\nproxy = {{ upstream = \"{tls_in}\", {up_tls} }}",
                    pki.server("server")
                )
            )
        ));
        let plain_in = back.addr("plain-in");
        let out = curl(&[&format!("http://{plain_in}/")]);
        assert!(
            out.contains("hello from plain http"),
            "{m} plain in, TLS out: {out}\n{}",
            back.log_dump()
        );
        let both = back.addr("both");
        let out = curl(&[
            "--cacert",
            &pki.p("ca.pem"),
            &format!("https://localhost:{}/", both.port()),
            "--resolve",
            &format!("localhost:{}:127.0.0.1", both.port()),
        ]);
        assert!(
            out.contains("hello from plain http"),
            "{m} TLS both ways: {out}\n{}",
            back.log_dump()
        );
    }
}

#[test]
fn tls_proxy_upstream_with_the_wrong_ca_is_refused_and_logged() {
    let pki = Pki::new();
    let http = http_upstream("never", 2);
    let front = Daemon::start(&format!(
        "{DAEMON}{}",
        listener(
            "tls-in",
            "threaded",
            "proxy",
            &format!(
                "tls = {{ {} }}\nproxy = {{ upstream = \"{http}\" }}",
                pki.server("server")
            )
        )
    ));
    let tls_in = front.addr("tls-in");
    let back = Daemon::start(&format!(
        "{DAEMON}{}",
        listener(
            "p",
            "threaded",
            "proxy",
            &format!("proxy = {{ upstream = \"{tls_in}\", tls = {{ server_name = \"localhost\", ca = \"{}\" }} }}", pki.p("rogue-ca.pem"))
        )
    ));
    let out = curl(&[&format!("http://{}/", back.addr("p"))]);
    assert!(!out.contains("never"), "{out}");
    back.wait_log("TLS handshake failed: unknown CA", IO_TIMEOUT);
}

#[test]
fn tls_certificate_rotated_by_sighup_while_a_connection_stays_up() {
    let pki = Pki::new();
    let live = TestDir::new();
    let (cert, key) = (live.path().join("cert.pem"), live.path().join("key.pem"));
    std::fs::copy(pki.path("server.pem"), &cert).expect("copy");
    std::fs::copy(pki.path("server.key"), &key).expect("copy");
    let config = format!(
        "{DAEMON}{}",
        listener(
            "r",
            "threaded",
            "echo",
            &format!(
                "tls = {{ cert = \"{}\", key = \"{}\" }}",
                cert.display(),
                key.display()
            )
        )
    );
    let d = Daemon::start(&config);
    let addr = d.addr("r");
    let mut long = rustls_client(addr, &pki, None).expect("handshake");
    assert_eq!(server_cn(&long), "localhost");
    assert_eq!(echo_line(&mut long, "before\n"), "before\n");

    // A broken new certificate (the key does not match) is refused; the old one serves on.
    std::fs::copy(pki.path("server2.pem"), &cert).expect("copy");
    d.signal(libc::SIGHUP);
    d.wait_log("reload refused", IO_TIMEOUT);
    assert_contains(&d.log(), &["does not match the certificate"]);
    let s = rustls_client(addr, &pki, None).expect("old certificate still serves");
    assert_eq!(server_cn(&s), "localhost");

    // The matching key arrives: the reload takes, new sessions get the new certificate.
    std::fs::copy(pki.path("server2.key"), &key).expect("copy");
    d.signal(libc::SIGHUP);
    d.wait_log("reload: done", IO_TIMEOUT);
    let s = rustls_client(addr, &pki, None).expect("new certificate serves");
    assert_eq!(server_cn(&s), "localhost rotated");
    // The long connection kept its session and its listener socket was never re-bound.
    assert_eq!(echo_line(&mut long, "after\n"), "after\n");
    assert_eq!(d.addr("r"), addr);
}

#[test]
fn tls_garbage_and_stalled_handshakes_are_cut_without_taking_the_worker() {
    let pki = Pki::new();
    let tls = format!(
        "tls = {{ {}, handshake_timeout = \"500ms\" }}",
        pki.server("server")
    );
    // One worker place: stalled handshakes must not hold it.
    let d = Daemon::start(&format!(
        "{DAEMON}{}",
        listener("g", "threaded", "echo", &format!("max_workers = 1\n{tls}"))
    ));
    let addr = d.addr("g");
    let mut garbage = Stream::tcp(addr);
    garbage.write_all(b"GET / HTTP/1.0\r\n\r\n").expect("write");
    // At most a TLS alert record (type 21) comes back, then the close.
    let answer = garbage.read_to_end_vec();
    assert!(
        answer.is_empty() || answer[0] == 21,
        "not an alert: {answer:?}"
    );
    d.wait_log("TLS handshake failed: not TLS", IO_TIMEOUT);

    // Silent clients and one that stops mid-handshake (half a ClientHello).
    let silent: Vec<Stream> = (0..3).map(|_| Stream::tcp(addr)).collect();
    let mut half = Stream::tcp(addr);
    half.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc])
        .expect("write");
    // Meanwhile a real client is served at once by the one worker.
    let mut ok = rustls_client(addr, &pki, None).expect("handshake beside stalled clients");
    assert_eq!(echo_line(&mut ok, "served\n"), "served\n");
    drop(ok);
    assert!(
        half.closed_within(IO_TIMEOUT),
        "a half handshake was not cut"
    );
    for mut s in silent {
        assert!(s.closed_within(IO_TIMEOUT), "a silent client was not cut");
    }
    d.wait_log("timeout (handshake not finished in time)", IO_TIMEOUT);
    // Failures are counted: garbage, the half handshake and the three silent clients.
    d.signal(libc::SIGUSR1);
    let log = d.wait_log("status: tls: ", IO_TIMEOUT);
    assert_contains(
        &log,
        &["0 handshakes in progress or waiting for a worker, 5 failed since start"],
    );
}

#[test]
fn tls_refused_peers_cost_no_handshake() {
    let pki = Pki::new();
    let tls = format!("tls = {{ {} }}", pki.server("server"));
    let d = Daemon::start(&format!(
        "{DAEMON}{}",
        listener(
            "deny",
            "threaded",
            "echo",
            &format!("deny = [\"127.0.0.0/8\"]\n{tls}")
        )
    ));
    let mut s = Stream::tcp(d.addr("deny"));
    // Refused before any TLS byte: the server sends nothing (no ServerHello, no alert).
    let _ = s.write_all(b"\x16\x03\x01\x00\x05hello");
    assert!(s.closed_within(IO_TIMEOUT));
    assert!(
        !d.log().contains("TLS handshake failed"),
        "{}",
        d.log_dump()
    );
}

#[test]
fn tls_check_names_file_key_and_position() {
    let pki = Pki::new();
    let empty = pki.path("empty.pem");
    std::fs::write(&empty, "no certificates here\n").expect("write");
    let text = format!(
        "[[listener]]\nname = \"a\"\nprotocol = \"tcp\"\naddress = \"127.0.0.1:0\"\nhandler = \"echo\"\n\
         tls = {{ cert = \"{}\", key = \"{}\", client_ca = \"{}\" }}\n\
         [[listener]]\nname = \"b\"\nprotocol = \"tcp\"\naddress = \"127.0.0.1:0\"\nhandler = \"echo\"\n\
         tls = {{ cert = \"/nonexistent/cert.pem\", key = \"{}\", min_version = \"1.1\" }}\n\
         [[listener]]\nname = \"u\"\nprotocol = \"udp\"\naddress = \"127.0.0.1:0\"\nhandler = \"echo\"\n\
         tls = {{ cert = \"{}\", key = \"{}\" }}\n",
        pki.p("server.pem"),
        pki.p("other.key"),
        empty.display(),
        pki.p("server.key"),
        pki.p("server.pem"),
        pki.p("server.key"),
    );
    let (out, file, _dir) = check(&text);
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    let lines = out.diagnostics(&file).join("\n");
    for needle in [
        ":6:",
        "listener `a`: key `tls.key`:",
        "other.key: this private key does not match the certificate",
        "key `tls.client_ca`:",
        "empty.pem: holds no certificate",
        ":12:",
        "listener `b`: key `tls.cert`: /nonexistent/cert.pem: cannot read",
        "key `tls.min_version`: unknown TLS version \"1.1\"",
        "valid values: 1.2, 1.3",
        ":18:",
        "listener `u`: key `tls`: TLS needs a stream listener",
    ] {
        assert!(lines.contains(needle), "missing {needle:?} in:\n{lines}");
    }
}

#[test]
fn tls_check_warns_about_an_expired_certificate_with_its_date() {
    let dir = TestDir::new();
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).expect("params");
    params.not_before = rcgen::date_time_ymd(2001, 1, 1);
    params.not_after = rcgen::date_time_ymd(2002, 2, 3);
    let cert = params.self_signed(&key).expect("cert");
    std::fs::write(dir.path().join("old.pem"), cert.pem()).expect("write");
    std::fs::write(dir.path().join("old.key"), key.serialize_pem()).expect("write");
    let text = format!(
        "[[listener]]\nname = \"old\"\nprotocol = \"tcp\"\naddress = \"127.0.0.1:0\"\nhandler = \"echo\"\n\
         tls = {{ cert = \"{0}/old.pem\", key = \"{0}/old.key\" }}\n",
        dir.path().display()
    );
    let (out, _file, _dir) = check(&text);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert_contains(
        &out.describe(),
        &[
            "warning: ",
            ":6:",
            "key `tls.cert`",
            "certificate expired on 2002-02-03",
        ],
    );
}

#[test]
fn tls_unix_listener_and_session_resumption() {
    let pki = Pki::new();
    let d =
        Daemon::start(&format!(
        "{DAEMON}[[listener]]\nname = \"u\"\nprotocol = \"unix\"\naddress = \"{{dir}}/tls.sock\"\n\
         handler = \"echo\"\ntls = {{ {} }}\n{}",
        pki.server("server"),
        listener("t", "event", "echo", &format!("tls = {{ {} }}", pki.server("server")))
    ));
    // Unix: s_client speaks TLS over a unix socket too.
    let out = s_client_unix(&d.path("u"), &pki);
    assert!(out.contains("ping"), "{out}\n{}", d.log_dump());
    // Resumption: the second connection resumes the first one's session (tickets).
    let sess = d.dir().join("sess.pem");
    let addr = d.addr("t");
    let sess = sess.display().to_string();
    let ca = pki.p("ca.pem");
    let first = s_client(
        addr,
        &["-tls1_3", "-sess_out", &sess, "-CAfile", &ca],
        "resume-one\n",
        "resume-one",
    );
    assert!(first.contains("New, TLSv1.3"), "{first}");
    let again = s_client(
        addr,
        &["-tls1_3", "-sess_in", &sess, "-CAfile", &ca],
        "resume-two\n",
        "resume-two",
    );
    assert!(again.contains("Reused, TLSv1.3"), "{again}");
}

fn s_client_unix(path: &Path, pki: &Pki) -> String {
    let target = ["-unix".to_string(), path.display().to_string()];
    let args = [
        "-CAfile",
        &pki.p("ca.pem"),
        "-quiet",
        "-no_ign_eof",
        "-servername",
        "localhost",
    ];
    s_client_at(&target, &args, "ping\n", "ping")
}

/// An upstream that reads a PROXY v1 line in the clear, then accepts TLS on the same
/// connection (as a server behind haproxy's `send-proxy` + `ssl` would) and answers one line
/// with the header it saw. Returns its address.
fn proxy_then_tls_upstream(pki: &Pki) -> SocketAddr {
    use rustls::pki_types::pem::PemObject;
    let chain = rustls::pki_types::CertificateDer::pem_file_iter(pki.path("server.pem"))
        .expect("cert")
        .collect::<Result<Vec<_>, _>>()
        .expect("pem");
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(pki.path("server.key")).expect("key");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("server config");
    let config = Arc::new(config);
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    std::thread::spawn(move || {
        let Ok((mut s, _)) = l.accept() else { return };
        let _ = s.set_read_timeout(Some(IO_TIMEOUT));
        // The header line, byte by byte so no TLS byte is consumed.
        let mut header = Vec::new();
        let mut b = [0u8; 1];
        while !header.ends_with(b"\r\n") && header.len() < 108 {
            match s.read(&mut b) {
                Ok(1) => header.push(b[0]),
                _ => return,
            }
        }
        let conn = rustls::ServerConnection::new(config).expect("server conn");
        let mut tls = rustls::StreamOwned::new(conn, s);
        let mut line = [0u8; 6];
        if tls.read_exact(&mut line).is_ok() {
            let _ = tls.write_all(&header);
            let _ = tls.flush();
            tls.conn.send_close_notify();
            let _ = tls.flush();
        }
    });
    addr
}

#[test]
fn tls_proxy_sends_the_proxy_header_in_the_clear_before_upstream_tls() {
    let pki = Pki::new();
    for m in MODELS {
        let up = proxy_then_tls_upstream(&pki);
        let d = Daemon::start(&format!(
            "{DAEMON}{}",
            listener(
                "p",
                m,
                "proxy",
                &format!(
                    "proxy = {{ upstream = \"{up}\", proxy_protocol = \"v1\", tls = {{ server_name = \"localhost\", ca = \"{}\" }} }}",
                    pki.p("ca.pem")
                )
            )
        ));
        let addr = d.addr("p");
        let mut c = Stream::tcp(addr);
        c.write_all(b"hello\n").expect("write");
        let got = String::from_utf8_lossy(&c.read_to_end_vec()).into_owned();
        assert!(
            got.starts_with("PROXY TCP4 127.0.0.1 127.0.0.1 ")
                && got.contains(&format!(" {}\r\n", addr.port())),
            "{m}: upstream saw {got:?}\n{}",
            d.log_dump()
        );
    }
}

#[test]
fn tls_idle_timeout_cuts_a_silent_session_in_front_of_an_exec_program() {
    let pki = Pki::new();
    let mut config = DAEMON.to_string();
    for m in ["threaded", "forked"] {
        let extra = format!(
            "idle_timeout = \"300ms\"\ntls = {{ {} }}\nexec = {{ argv = [\"/bin/cat\"] }}",
            pki.server("server")
        );
        config.push_str(&listener(&format!("cat-{m}"), m, "exec", &extra));
    }
    let d = Daemon::start(&config);
    for m in ["threaded", "forked"] {
        let mut s = rustls_client(d.addr(&format!("cat-{m}")), &pki, None).expect("handshake");
        // Traffic keeps it open past the idle time...
        for i in 0..3 {
            assert_eq!(
                echo_line(&mut s, &format!("line {i}\n")),
                format!("line {i}\n")
            );
            std::thread::sleep(Duration::from_millis(150));
        }
        // ...silence closes it.
        let started = Instant::now();
        let mut b = [0u8; 16];
        let end = s.read(&mut b);
        assert!(
            matches!(end, Ok(0) | Err(_)),
            "{m}: got data instead of the close: {end:?}"
        );
        assert!(
            started.elapsed() < IO_TIMEOUT,
            "{m}: not cut at idle_timeout"
        );
    }
    // The programs saw EOF and exited.
    d.wait_log_count("/bin/cat (pid", 2, IO_TIMEOUT);
}

#[test]
fn tls_check_refuses_bad_proxy_upstream_tls_settings() {
    let text = "[[listener]]\nname = \"p\"\nprotocol = \"tcp\"\naddress = \"127.0.0.1:0\"\n\
                handler = \"proxy\"\nproxy = { upstream = \"127.0.0.1:9\", tls = { ca = \"/nonexistent/ca.pem\", \
                client_cert = \"/x.pem\", bogus = 1 } }\n";
    let (out, file, _dir) = check(text);
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    let lines = out.diagnostics(&file).join("\n");
    assert!(
        lines.contains(
            "proxy: unknown key `tls.bogus`; valid keys: server_name, ca, client_cert, client_key"
        ),
        "{lines}"
    );
}

/// A client CA with two client certificates (serials 0x1a "good", 0x2b "revoked") and a CRL
/// from that CA revoking 0x2b, written as `crl-ca.pem`, `good.pem/.key`, `revoked.pem/.key`
/// and `crl.pem` next to `pki`'s files, and `crl-empty.pem`, the same CA's CRL revoking nothing.
fn write_crl_pki(pki: &Pki) {
    let (params, key, ca_pem) = ca("crl test CA");
    let issuer = Issuer::new(params, key);
    let write = |name: &str, text: &str| {
        std::fs::write(pki.path(name), text).expect("write a PEM file");
    };
    write("crl-ca.pem", &ca_pem);
    for (name, serial) in [("good", 0x1a_u8), ("revoked", 0x2b)] {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} client"));
        params.serial_number = Some(rcgen::SerialNumber::from(vec![serial]));
        let cert = params.signed_by(&key, &issuer).expect("sign");
        write(&format!("{name}.pem"), &cert.pem());
        write(&format!("{name}.key"), &key.serialize_pem());
    }
    let crl = |revoked: &[u8]| {
        rcgen::CertificateRevocationListParams {
            this_update: rcgen::date_time_ymd(2020, 1, 1),
            next_update: rcgen::date_time_ymd(4000, 1, 1),
            crl_number: rcgen::SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|serial| rcgen::RevokedCertParams {
                    serial_number: rcgen::SerialNumber::from(vec![*serial]),
                    revocation_time: rcgen::date_time_ymd(2021, 1, 1),
                    reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        }
        .signed_by(&issuer)
        .expect("sign the CRL")
        .pem()
        .expect("CRL PEM")
    };
    write("crl.pem", &crl(&[0x2b]));
    write("crl-empty.pem", &crl(&[]));
}

#[test]
fn tls_crl_refuses_a_revoked_client_certificate_and_serves_a_good_one() {
    let pki = Pki::new();
    write_crl_pki(&pki);
    let tls = format!(
        "tls = {{ {}, client_ca = \"{}\", client_auth = \"required\", crl = \"{}\" }}",
        pki.server("server"),
        pki.p("crl-ca.pem"),
        pki.p("crl.pem")
    );
    let mut config = DAEMON.to_string();
    for m in MODELS {
        config.push_str(&listener(&format!("crl-{m}"), m, "echo", &tls));
    }
    let d = Daemon::start(&config);
    let client = |addr: SocketAddr, name: &str, version: &str| {
        let (cert, key) = (pki.p(&format!("{name}.pem")), pki.p(&format!("{name}.key")));
        let args = [
            version,
            "-servername",
            "localhost",
            "-CAfile",
            &pki.p("ca.pem"),
            "-cert",
            &cert,
            "-key",
            &key,
            "-quiet",
            "-ign_eof",
        ];
        s_client(addr, &args, "crl-ping\n", "crl-ping")
    };
    for m in MODELS {
        let addr = d.addr(&format!("crl-{m}"));
        for version in ["-tls1_3", "-tls1_2"] {
            let good = client(addr, "good", version);
            assert!(
                good.contains("crl-ping"),
                "{m} {version}: the good certificate was not served:\n{good}\n{}",
                d.log_dump()
            );
            let revoked = client(addr, "revoked", version);
            assert!(
                !revoked.contains("crl-ping"),
                "{m} {version}: the revoked certificate was served:\n{revoked}\n{}",
                d.log_dump()
            );
            assert!(
                revoked.contains("certificate revoked"),
                "{m} {version}: s_client shows no `certificate revoked` alert:\n{revoked}"
            );
        }
    }
    d.wait_log(
        "TLS handshake failed: certificate revoked (listed in the `crl` file)",
        IO_TIMEOUT,
    );
}

#[test]
fn tls_check_names_the_crl_file_key_and_position() {
    let pki = Pki::new();
    let garbage = pki.path("garbage-crl.pem");
    std::fs::write(
        &garbage,
        "-----BEGIN X509 CRL-----\naGVsbG8gd29ybGQ=\n-----END X509 CRL-----\n",
    )
    .expect("write");
    let mut text = String::new();
    for (name, crl) in [
        ("a", "/nonexistent/revoked.pem".to_string()),
        ("b", pki.p("ca.pem")),
        ("c", garbage.display().to_string()),
    ] {
        text.push_str(&format!(
            "[[listener]]\nname = \"{name}\"\nprotocol = \"tcp\"\naddress = \"127.0.0.1:0\"\n\
             handler = \"echo\"\n\
             tls = {{ {}, client_ca = \"{}\", crl = \"{crl}\" }}\n",
            pki.server("server"),
            pki.p("ca.pem"),
        ));
    }
    let (out, file, _dir) = check(&text);
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    let lines = out.diagnostics(&file);
    for (line, needles) in [
        (
            ":6:",
            [
                "listener `a`: key `tls.crl`:",
                "/nonexistent/revoked.pem: cannot read",
            ],
        ),
        (
            ":12:",
            [
                "listener `b`: key `tls.crl`:",
                "ca.pem: holds no CRL (expected -----BEGIN X509 CRL----- blocks)",
            ],
        ),
        (
            ":18:",
            [
                "listener `c`: key `tls.crl`:",
                "garbage-crl.pem: CRL number 1 in the file is not a valid X.509 CRL",
            ],
        ),
    ] {
        let prefix = format!("{}{line}", file.display());
        let found = lines
            .iter()
            .find(|l| l.starts_with(&prefix) && needles.iter().all(|n| l.contains(n)));
        assert!(
            found.is_some(),
            "no line {prefix}… with {needles:?} in:\n{}",
            lines.join("\n")
        );
    }
}

#[test]
fn tls_crl_updated_by_sighup_revokes_without_a_restart() {
    let pki = Pki::new();
    write_crl_pki(&pki);
    let live = TestDir::new();
    let crl = live.path().join("crl.pem");
    std::fs::copy(pki.path("crl-empty.pem"), &crl).expect("copy");
    let tls = format!(
        "tls = {{ {}, client_ca = \"{}\", crl = \"{}\" }}",
        pki.server("server"),
        pki.p("crl-ca.pem"),
        crl.display()
    );
    let d = Daemon::start(&format!("{DAEMON}{}", listener("c", "event", "echo", &tls)));
    let addr = d.addr("c");
    let served = |name: &str| {
        let (cert, key) = (pki.p(&format!("{name}.pem")), pki.p(&format!("{name}.key")));
        let args = [
            "-servername",
            "localhost",
            "-cert",
            &cert,
            "-key",
            &key,
            "-quiet",
            "-ign_eof",
        ];
        s_client(addr, &args, "crl-ping\n", "crl-ping").contains("crl-ping")
    };
    assert!(served("revoked"), "not yet revoked\n{}", d.log_dump());

    // A broken CRL is refused by the reload; the old one keeps serving.
    std::fs::write(&crl, "not a CRL\n").expect("write");
    d.signal(libc::SIGHUP);
    d.wait_log("reload refused", IO_TIMEOUT);
    assert_contains(&d.log(), &["key `tls.crl`", "holds no CRL"]);
    assert!(
        served("revoked"),
        "old CRL after a refused reload\n{}",
        d.log_dump()
    );

    // The CA's new CRL revokes the certificate on SIGHUP; the good one is still served.
    std::fs::copy(pki.path("crl.pem"), &crl).expect("copy");
    d.signal(libc::SIGHUP);
    d.wait_log("reload: done", IO_TIMEOUT);
    assert!(!served("revoked"), "revoked after reload\n{}", d.log_dump());
    assert!(served("good"), "good after reload\n{}", d.log_dump());
    assert_eq!(d.addr("c"), addr);
}
