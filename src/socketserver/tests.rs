//! Library servers started inside the test process (which has many threads), talked to with
//! real sockets. Every wait has a deadline; nothing sleeps for readiness.

use super::*;
use std::io::{BufRead, Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;

use crate::handler::{Context, Request};

/// How long any one step may take before the test fails (never how long it should take).
const DEADLINE: Duration = Duration::from_secs(20);

/// Answers each line with `Your msg=<line>`; a datagram with `Your msg=<data>`. `boom`
/// panics, `fail` returns an error. Counts the requests it saw.
#[derive(Default)]
struct MyHandler {
    seen: Option<Arc<AtomicUsize>>,
}

impl Handler for MyHandler {
    fn handle(&mut self, req: &mut Request, _ctx: &Context) -> io::Result<()> {
        if let Some(n) = &self.seen {
            n.fetch_add(1, Ordering::SeqCst);
        }
        match req {
            Request::Stream(s) => {
                let mut line = String::new();
                while s.rfile.read_line(&mut line)? > 0 {
                    match line.trim_end() {
                        "boom" => panic!("boom requested"),
                        "fail" => return Err(io::Error::other("fail requested")),
                        _ => {}
                    }
                    write!(s.wfile, "Your msg={line}")?;
                    s.wfile.flush()?;
                    line.clear();
                }
                Ok(())
            }
            Request::Datagram(d) => {
                let mut answer = b"Your msg=".to_vec();
                answer.extend_from_slice(d.data());
                d.reply(&answer).map(drop)
            }
        }
    }
}

fn counting(seen: &Arc<AtomicUsize>) -> impl Fn() -> MyHandler + Send + Sync + 'static {
    let seen = Arc::clone(seen);
    move || MyHandler {
        seen: Some(Arc::clone(&seen)),
    }
}

#[derive(Debug, Clone, Copy)]
enum Mix {
    Default,
    Threading,
    Forking,
}

const MIXES: [Mix; 3] = [Mix::Default, Mix::Threading, Mix::Forking];

/// What the tests need from every server type.
trait Serve: Send + 'static {
    fn mix(self, mix: Mix) -> Self;
    fn serve(&mut self) -> Result<(), Error>;
    fn handle(&self) -> ShutdownHandle;
    fn close(&mut self);
}

macro_rules! serve {
    ($ty:ident) => {
        impl Serve for $ty {
            fn mix(self, mix: Mix) -> Self {
                match mix {
                    Mix::Default => self,
                    Mix::Threading => self.threading(),
                    Mix::Forking => self.forking(),
                }
                .shutdown_timeout(Duration::from_millis(200))
            }
            fn serve(&mut self) -> Result<(), Error> {
                self.serve_forever()
            }
            fn handle(&self) -> ShutdownHandle {
                self.shutdown_handle()
            }
            fn close(&mut self) {
                self.server_close()
            }
        }
    };
}
serve!(TcpServer);
serve!(UdpServer);
serve!(UnixStreamServer);
serve!(UnixDatagramServer);

/// Run `client` on another thread while `server` serves here; the client's end (or a panic
/// in it) shuts the server down, so a failing client never leaves `serve_forever` running.
fn serve_while<S: Serve, T: Send + 'static>(
    server: &mut S,
    client: impl FnOnce() -> T + Send + 'static,
) -> T {
    let stop = server.handle();
    let t = std::thread::spawn(move || {
        struct StopOnDrop(ShutdownHandle);
        impl Drop for StopOnDrop {
            fn drop(&mut self) {
                self.0.shutdown();
            }
        }
        let _stop = StopOnDrop(stop);
        client()
    });
    server.serve().expect("serve_forever");
    server.close();
    match t.join() {
        Ok(v) => v,
        Err(p) => std::panic::resume_unwind(p),
    }
}

fn tcp_exchange(addr: SocketAddr, lines: &[&str]) -> String {
    let mut c = TcpStream::connect(addr).expect("connect");
    c.set_read_timeout(Some(DEADLINE)).expect("timeout");
    for l in lines {
        c.write_all(format!("{l}\n").as_bytes()).expect("write");
    }
    c.shutdown(std::net::Shutdown::Write).expect("half-close");
    let mut answer = String::new();
    c.read_to_string(&mut answer).expect("read");
    answer
}

#[test]
fn tcp_server_serves_in_every_model() {
    for mix in MIXES {
        let mut server = TcpServer::bind("127.0.0.1:0", MyHandler::default)
            .expect("bind")
            .mix(mix);
        let addr = server.server_address();
        assert_ne!(addr.port(), 0, "server_address tells the real port");
        let answers = serve_while(&mut server, move || {
            // Two clients at once: under threading and forking both are served concurrently,
            // under the default model one after the other; all get answers.
            let a = std::thread::spawn(move || tcp_exchange(addr, &["hello", "world"]));
            let b = tcp_exchange(addr, &["你好"]);
            (a.join().expect("client a"), b)
        });
        assert_eq!(
            answers,
            (
                "Your msg=hello\nYour msg=world\n".to_string(),
                "Your msg=你好\n".to_string()
            ),
            "{mix:?}"
        );
    }
}

#[test]
fn udp_server_serves_in_every_model() {
    for mix in MIXES {
        let mut server = UdpServer::bind("127.0.0.1:0", MyHandler::default)
            .expect("bind")
            .mix(mix);
        let addr = server.server_address();
        let answer = serve_while(&mut server, move || {
            let c = UdpSocket::bind("127.0.0.1:0").expect("client");
            c.set_read_timeout(Some(DEADLINE)).expect("timeout");
            c.send_to(b"ping", addr).expect("send");
            let mut buf = [0u8; 100];
            let (n, from) = c.recv_from(&mut buf).expect("reply");
            assert_eq!(from, addr);
            buf[..n].to_vec()
        });
        assert_eq!(answer, b"Your msg=ping", "{mix:?}");
    }
}

#[test]
fn unix_stream_server_serves_in_every_model() {
    for mix in MIXES {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.sock");
        let mut server = UnixStreamServer::bind(&path, MyHandler::default)
            .expect("bind")
            .mix(mix);
        assert_eq!(server.server_address(), path);
        let p = path.clone();
        let answer = serve_while(&mut server, move || {
            let mut c = UnixStream::connect(&p).expect("connect");
            c.set_read_timeout(Some(DEADLINE)).expect("timeout");
            c.write_all(b"hi\n").expect("write");
            c.shutdown(std::net::Shutdown::Write).expect("half-close");
            let mut s = String::new();
            c.read_to_string(&mut s).expect("read");
            s
        });
        assert_eq!(answer, "Your msg=hi\n", "{mix:?}");
        assert!(
            !path.exists(),
            "server_close removes the socket file ({mix:?})"
        );
    }
}

#[test]
fn unix_datagram_server_serves_in_every_model() {
    for mix in MIXES {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("d.sock");
        let mut server = UnixDatagramServer::bind(&path, MyHandler::default)
            .expect("bind")
            .mix(mix);
        let (p, me) = (path.clone(), dir.path().join("client.sock"));
        let answer = serve_while(&mut server, move || {
            let c = UnixDatagram::bind(&me).expect("client");
            c.set_read_timeout(Some(DEADLINE)).expect("timeout");
            c.send_to(b"dgram", &p).expect("send");
            let mut buf = [0u8; 100];
            let n = c.recv(&mut buf).expect("reply");
            buf[..n].to_vec()
        });
        assert_eq!(answer, b"Your msg=dgram", "{mix:?}");
        assert!(
            !path.exists(),
            "server_close removes the socket file ({mix:?})"
        );
    }
}

/// socketserver's shutdown(): returns once serve_forever has, even while a client is connected
/// and silent; server_close then cuts that client off after shutdown_timeout.
#[test]
fn shutdown_from_another_thread_returns_while_a_client_is_idle() {
    for mix in [Mix::Threading, Mix::Forking] {
        let seen = Arc::new(AtomicUsize::new(0));
        let mut server = TcpServer::bind("127.0.0.1:0", counting(&seen))
            .expect("bind")
            .mix(mix);
        let addr = server.server_address();
        let stop = server.shutdown_handle();
        let (tx, rx) = mpsc::channel();
        let seen2 = Arc::clone(&seen);
        let idle = std::thread::spawn(move || {
            let mut c = TcpStream::connect(addr).expect("connect");
            c.set_read_timeout(Some(DEADLINE)).expect("timeout");
            // Under forking the handler runs in a child: wait for its answer instead of the
            // counter, which the child cannot raise in this process.
            c.write_all(b"first\n").expect("write");
            let mut r = std::io::BufReader::new(c.try_clone().expect("clone"));
            let mut line = String::new();
            r.read_line(&mut line).expect("answer");
            assert_eq!(line, "Your msg=first\n");
            // Connected and idle: now ask for the stop from this other thread.
            stop.shutdown();
            tx.send(()).expect("report");
            // Still connected: server_close cuts us off, so the read ends (EOF or reset).
            let mut rest = Vec::new();
            let _ = r.read_to_end(&mut rest);
            let _ = seen2;
        });
        server.serve_forever().expect("serve_forever");
        rx.recv_timeout(DEADLINE)
            .expect("shutdown() returned while the client was still connected");
        server.server_close();
        idle.join().expect("client");
    }
}

#[test]
fn handle_request_serves_one_and_honours_the_timeout() {
    let timeouts = Arc::new(AtomicUsize::new(0));
    let t = Arc::clone(&timeouts);
    let seen = Arc::new(AtomicUsize::new(0));
    let mut server = TcpServer::bind("127.0.0.1:0", counting(&seen))
        .expect("bind")
        .handle_timeout(move || {
            t.fetch_add(1, Ordering::SeqCst);
        });
    let addr = server.server_address();

    // With a timeout and nobody there: false, and handle_timeout ran.
    server.set_timeout(Some(Duration::from_millis(50)));
    assert_eq!(server.timeout(), Some(Duration::from_millis(50)));
    assert!(!server.handle_request().expect("handle_request"));
    assert_eq!(timeouts.load(Ordering::SeqCst), 1);

    // Two clients waiting: one handle_request serves exactly one of them, to the end (the
    // default model returns once the handler has).
    let a = std::thread::spawn(move || tcp_exchange(addr, &["a"]));
    let b = std::thread::spawn(move || tcp_exchange(addr, &["b"]));
    server.set_timeout(None);
    assert!(server.handle_request().expect("handle_request"));
    assert_eq!(seen.load(Ordering::SeqCst), 1, "exactly one request served");
    // With a timeout and a client waiting: true, no timeout call.
    server.set_timeout(Some(DEADLINE));
    assert!(server.handle_request().expect("handle_request"));
    assert_eq!(seen.load(Ordering::SeqCst), 2);
    assert_eq!(timeouts.load(Ordering::SeqCst), 1);
    let mut answers = [a.join().expect("a"), b.join().expect("b")];
    answers.sort();
    assert_eq!(answers, ["Your msg=a\n", "Your msg=b\n"]);
    server.server_close();
}

#[test]
fn server_close_then_binding_the_same_port_succeeds() {
    let mut server = TcpServer::bind("127.0.0.1:0", MyHandler::default).expect("bind");
    let addr = server.server_address();
    // A served connection first, so the port has a connection in TIME_WAIT.
    let answer = serve_while(&mut server, move || tcp_exchange(addr, &["x"]));
    assert_eq!(answer, "Your msg=x\n");
    let mut again = TcpServer::bind(addr, MyHandler::default).expect("rebind the same port");
    assert_eq!(again.server_address(), addr);
    let answer = serve_while(&mut again, move || tcp_exchange(addr, &["y"]));
    assert_eq!(answer, "Your msg=y\n");
}

#[test]
fn verify_request_refuses_before_the_handler_runs() {
    let seen = Arc::new(AtomicUsize::new(0));
    let asked = Arc::new(AtomicUsize::new(0));
    let a = Arc::clone(&asked);
    // Refuse the first peer, admit the next.
    let mut server = TcpServer::bind("127.0.0.1:0", counting(&seen))
        .expect("bind")
        .threading()
        .verify_request(move |peer| {
            assert!(matches!(peer, PeerAddr::Inet(_)));
            a.fetch_add(1, Ordering::SeqCst) > 0
        });
    let addr = server.server_address();
    let (refused, admitted) = serve_while(&mut server, move || {
        // Closed unanswered: EOF, or a reset since our line was never read.
        let mut c = TcpStream::connect(addr).expect("connect");
        c.set_read_timeout(Some(DEADLINE)).expect("timeout");
        let _ = c.write_all(b"first\n");
        let mut got = Vec::new();
        let refused = match c.read_to_end(&mut got) {
            Ok(_) => String::from_utf8_lossy(&got).into_owned(),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => String::new(),
            Err(e) => panic!("refused client: {e}"),
        };
        let admitted = tcp_exchange(addr, &["second"]);
        (refused, admitted)
    });
    assert_eq!(
        refused, "",
        "a refused peer gets its connection closed unanswered"
    );
    assert_eq!(admitted, "Your msg=second\n");
    assert_eq!(asked.load(Ordering::SeqCst), 2);
    assert_eq!(
        seen.load(Ordering::SeqCst),
        1,
        "the handler never saw the refused peer"
    );
}

#[test]
fn handle_error_sees_a_panic_and_serving_goes_on() {
    let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
    let f = Arc::clone(&failures);
    let mut server = TcpServer::bind("127.0.0.1:0", MyHandler::default)
        .expect("bind")
        .threading()
        .handle_error(move |peer, failure| {
            let what = match failure {
                Failure::Panic(m) => format!("panic: {m}"),
                Failure::Error(e) => format!("error: {e}"),
            };
            assert!(matches!(peer, PeerAddr::Inet(_)));
            f.lock().expect("lock").push(what);
        });
    let addr = server.server_address();
    let answers = serve_while(&mut server, move || {
        let boom = tcp_exchange(addr, &["boom"]);
        let fail = tcp_exchange(addr, &["fail"]);
        let fine = tcp_exchange(addr, &["still here"]);
        (boom, fail, fine)
    });
    assert_eq!(
        answers,
        (
            String::new(),
            String::new(),
            "Your msg=still here\n".to_string()
        )
    );
    assert_eq!(
        *failures.lock().expect("lock"),
        ["panic: boom requested", "error: fail requested"]
    );
}

#[test]
fn two_servers_in_one_process() {
    let mut one = TcpServer::bind("127.0.0.1:0", MyHandler::default)
        .expect("bind")
        .threading();
    let mut two = UdpServer::bind("127.0.0.1:0", MyHandler::default)
        .expect("bind")
        .threading();
    let (a1, a2) = (one.server_address(), two.server_address());
    let (s1, s2) = (one.shutdown_handle(), two.shutdown_handle());
    let t1 = std::thread::spawn(move || {
        one.serve_forever().expect("one");
        one.server_close();
    });
    let t2 = std::thread::spawn(move || {
        two.serve_forever().expect("two");
        two.server_close();
    });
    let tcp = tcp_exchange(a1, &["to one"]);
    let c = UdpSocket::bind("127.0.0.1:0").expect("client");
    c.set_read_timeout(Some(DEADLINE)).expect("timeout");
    c.send_to(b"to two", a2).expect("send");
    let mut buf = [0u8; 64];
    let n = c.recv(&mut buf).expect("reply");
    // Stopping one leaves the other serving.
    s1.shutdown();
    t1.join().expect("server one");
    c.send_to(b"again", a2).expect("send");
    let m = c.recv(&mut buf[n..]).expect("reply after one stopped");
    s2.shutdown();
    t2.join().expect("server two");
    assert_eq!(tcp, "Your msg=to one\n");
    assert_eq!(&buf[..n + m], b"Your msg=to twoYour msg=again");
}

#[test]
fn event_model_serves_a_builtin_and_refuses_a_custom_handler() {
    let mut server = TcpServer::bind_builtin("127.0.0.1:0", "echo")
        .expect("bind")
        .event()
        .expect("echo has an event loop");
    let addr = server.server_address();
    let mut c = TcpStream::connect(addr).expect("connect");
    c.set_read_timeout(Some(DEADLINE)).expect("timeout");
    let answer = serve_while(&mut server, move || {
        c.write_all(b"echo me").expect("write");
        c.shutdown(std::net::Shutdown::Write).expect("half-close");
        let mut s = String::new();
        c.read_to_string(&mut s).expect("read");
        s
    });
    assert_eq!(answer, "echo me");
    let custom = TcpServer::bind("127.0.0.1:0", MyHandler::default).expect("bind");
    assert!(matches!(custom.event(), Err(Error::NoEventLoop { .. })));
    assert!(matches!(
        TcpServer::bind_builtin("127.0.0.1:0", "nope"),
        Err(Error::UnknownBuiltin { .. })
    ));
}

/// Every catchable signal's disposition (handler, flags, mask), as `sigaction` reports it.
fn dispositions() -> Vec<(i32, usize, i32, Vec<bool>)> {
    (1..=libc::SIGRTMAX())
        .filter(|&s| s != libc::SIGKILL && s != libc::SIGSTOP)
        .filter_map(|sig| {
            // SAFETY: a query only (null new action) into a zeroed struct we own.
            let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
            let r = unsafe { libc::sigaction(sig, std::ptr::null(), &mut old) };
            (r == 0).then(|| {
                let mask = (1..=libc::SIGRTMAX())
                    // SAFETY: reads the mask sigaction filled in.
                    .map(|m| unsafe { libc::sigismember(&old.sa_mask, m) } == 1)
                    .collect();
                (sig, old.sa_sigaction, old.sa_flags, mask)
            })
        })
        .collect()
}

#[test]
fn no_signal_disposition_is_changed() {
    let before = dispositions();
    for mix in MIXES {
        let mut server = TcpServer::bind("127.0.0.1:0", MyHandler::default)
            .expect("bind")
            .mix(mix);
        let addr = server.server_address();
        let answer = serve_while(&mut server, move || tcp_exchange(addr, &["sig"]));
        assert_eq!(answer, "Your msg=sig\n");
        assert_eq!(dispositions(), before, "after serving with {mix:?}");
    }
}

/// serve_forever may run again after a shutdown, on another thread: a forking server's fork
/// server outlives the thread that started it (it ends with server_close, not with a thread).
#[test]
fn serve_forever_runs_again_on_another_thread_after_shutdown() {
    let mut server = TcpServer::bind("127.0.0.1:0", MyHandler::default)
        .expect("bind")
        .mix(Mix::Forking);
    let addr = server.server_address();
    let stop = server.shutdown_handle();
    let first = std::thread::spawn(move || {
        let client = std::thread::spawn(move || {
            let a = tcp_exchange(addr, &["one"]);
            stop.shutdown();
            a
        });
        server.serve_forever().expect("first serve_forever");
        (server, client.join().expect("client"))
    });
    // The thread that started the fork server has ended once join returns.
    let (mut server, one) = first.join().expect("first thread");
    assert_eq!(one, "Your msg=one\n");
    let two = serve_while(&mut server, move || tcp_exchange(addr, &["two"]));
    assert_eq!(two, "Your msg=two\n");
}

/// `shutdown_now` from another thread: `serve_forever` returns, the idle client is cut off at
/// once and `server_close` has nothing left to wait for, though `shutdown_timeout` is an hour.
#[test]
fn shutdown_now_cuts_idle_clients_off_without_waiting() {
    for mix in [Mix::Threading, Mix::Forking] {
        let mut server = TcpServer::bind("127.0.0.1:0", MyHandler::default)
            .expect("bind")
            .mix(mix)
            .shutdown_timeout(Duration::from_secs(3600));
        let addr = server.server_address();
        let stop = server.shutdown_handle();
        let client = std::thread::spawn(move || {
            let mut c = TcpStream::connect(addr).expect("connect");
            c.set_read_timeout(Some(DEADLINE)).expect("timeout");
            c.write_all(b"first\n").expect("write");
            let mut r = std::io::BufReader::new(c.try_clone().expect("clone"));
            let mut line = String::new();
            r.read_line(&mut line).expect("answer");
            assert_eq!(line, "Your msg=first\n");
            stop.shutdown_now();
            // Cut off: EOF or a reset, well before the read timeout.
            let mut rest = Vec::new();
            match r.read_to_end(&mut rest) {
                Ok(_) => assert!(rest.is_empty(), "{mix:?}: got {rest:?} after the cut"),
                Err(e) => assert!(
                    !matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ),
                    "{mix:?}: the connection stayed open: {e}"
                ),
            }
        });
        server.serve_forever().expect("serve_forever");
        let (tx, rx) = mpsc::channel();
        let closer = std::thread::spawn(move || {
            server.server_close();
            tx.send(()).expect("report");
        });
        rx.recv_timeout(DEADLINE)
            .expect("server_close waited for the hour-long shutdown_timeout");
        closer.join().expect("closer");
        client.join().expect("client");
    }
}

/// `reload()` on a handle re-reads the config file of a server made from one (what SIGHUP does
/// to the daemon), from another thread.
#[test]
fn reload_from_a_handle_applies_the_changed_file() {
    use crate::config::Config;
    use crate::handler::Registry;
    use crate::server::Server;

    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("socketd.toml");
    let listener = |name: &str| {
        format!(
            "[[listener]]\nname = \"{name}\"\nprotocol = \"unix\"\naddress = \"{}\"\nhandler = \"echo\"\n",
            dir.path().join(format!("{name}.sock")).display()
        )
    };
    std::fs::write(&path, listener("a")).expect("write config");
    let registry = Registry::with_builtins();
    let config = Config::load(&path, &registry).expect("config");
    let mut server = Server::bind(config, registry).expect("bind");
    let handle = server.shutdown_handle();
    let serving = std::thread::spawn(move || {
        server.serve_forever(&mut || {}).expect("serve_forever");
        server.server_close();
    });
    let echo = |name: &str| -> Option<String> {
        let mut c = UnixStream::connect(dir.path().join(format!("{name}.sock"))).ok()?;
        c.set_read_timeout(Some(DEADLINE)).ok()?;
        c.write_all(b"hi").ok()?;
        c.shutdown(std::net::Shutdown::Write).ok()?;
        let mut answer = String::new();
        c.read_to_string(&mut answer).ok()?;
        Some(answer)
    };
    let wait_for = |what: &str, cond: &dyn Fn() -> bool| {
        let deadline = std::time::Instant::now() + DEADLINE;
        while !cond() {
            assert!(std::time::Instant::now() < deadline, "timed out: {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    wait_for("listener a answers", &|| echo("a").as_deref() == Some("hi"));
    assert_eq!(echo("b"), None, "b is not configured yet");

    std::fs::write(&path, format!("{}{}", listener("a"), listener("b"))).expect("write");
    handle.reload();
    wait_for("listener b answers after reload()", &|| {
        echo("b").as_deref() == Some("hi")
    });
    assert_eq!(echo("a").as_deref(), Some("hi"), "a kept serving");

    handle.shutdown();
    serving.join().expect("server thread");
}
