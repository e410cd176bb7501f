//! `--mux T`: request/response with the connections multiplexed over T mio (epoll) threads
//! instead of one blocking thread each, so the load generator spends as little CPU as it can
//! and, on a small machine, the server under test gets the rest.

use crate::hist::Hist;
use crate::modes::{fill, nanos, Load, Outcome};
use crate::target::Target;
use mio::net::{TcpStream, UnixStream};
use mio::{Events, Interest, Poll, Token};
use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

/// The largest message a multiplexed client sends: it must fit the socket buffer in one write.
pub const MAX_SIZE: usize = 16 * 1024;

enum Sock {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Sock {
    fn connect(t: &Target, timeout: Duration) -> io::Result<Sock> {
        Ok(match t {
            Target::Tcp(a) => {
                let s = std::net::TcpStream::connect_timeout(a, timeout)?;
                s.set_nodelay(true)?;
                s.set_nonblocking(true)?;
                Sock::Tcp(TcpStream::from_std(s))
            }
            Target::Unix(p) => {
                let s = std::os::unix::net::UnixStream::connect(p)?;
                s.set_nonblocking(true)?;
                Sock::Unix(UnixStream::from_std(s))
            }
            _ => return Err(io::Error::new(io::ErrorKind::InvalidInput, "stream target")),
        })
    }

    fn source(&mut self) -> &mut dyn mio::event::Source {
        match self {
            Sock::Tcp(s) => s,
            Sock::Unix(s) => s,
        }
    }

    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.read(b),
            Sock::Unix(s) => s.read(b),
        }
    }

    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.write(b),
            Sock::Unix(s) => s.write(b),
        }
    }
}

struct Client {
    sock: Sock,
    id: usize,
    seq: u64,
    msg: Vec<u8>,
    back: Vec<u8>,
    got: usize,
    sent_at: Instant,
}

impl Client {
    fn send(&mut self) -> io::Result<()> {
        fill(&mut self.msg, self.id, self.seq);
        self.got = 0;
        self.sent_at = Instant::now();
        match self.sock.write(&self.msg) {
            Ok(n) if n == self.msg.len() => Ok(()),
            Ok(_) => Err(io::Error::other(
                "short write: use --size <= 16384 with --mux",
            )),
            Err(e) => Err(e),
        }
    }
}

/// Run clients `first..first + n` on this thread until the deadline.
pub fn request_response(load: &Load, first: usize, n: usize) -> Outcome {
    let mut out = Outcome::new();
    let mut poll = match Poll::new() {
        Ok(p) => p,
        Err(e) => {
            out.error("poll", &e);
            return out;
        }
    };
    let mut clients = Vec::with_capacity(n);
    for id in first..first + n {
        let mut sock = match Sock::connect(&load.target, load.io_timeout) {
            Ok(s) => s,
            Err(e) => {
                out.error("connect", &e);
                return out;
            }
        };
        let token = Token(clients.len());
        if let Err(e) = poll
            .registry()
            .register(sock.source(), token, Interest::READABLE)
        {
            out.error("register", &e);
            return out;
        }
        let mut c = Client {
            sock,
            id,
            seq: 0,
            msg: vec![0; load.size],
            back: vec![0; load.size],
            got: 0,
            sent_at: Instant::now(),
        };
        if let Err(e) = c.send() {
            out.error("send", &e);
            return out;
        }
        clients.push(c);
    }
    let mut events = Events::with_capacity(1024);
    let mut hist = Hist::new();
    let mut last_progress = Instant::now();
    while Instant::now() < load.deadline {
        match wait(&mut poll, &mut events, load, last_progress, &mut out) {
            Wait::Ready => {}
            Wait::Again => continue,
            Wait::Stop => break,
        }
        for ev in events.iter() {
            let Some(c) = clients.get_mut(ev.token().0) else {
                continue;
            };
            loop {
                let got = c.got;
                match c.sock.read(&mut c.back[got..]) {
                    Ok(0) => {
                        out.error("read", &"server closed the connection");
                        out.hist = hist;
                        return out;
                    }
                    Ok(k) => {
                        c.got += k;
                        if c.got < c.back.len() {
                            continue;
                        }
                        if c.back != c.msg {
                            out.corrupt += 1;
                            out.hist = hist;
                            return out;
                        }
                        hist.record(nanos(c.sent_at));
                        out.ops += 1;
                        out.bytes += c.msg.len() as u64;
                        last_progress = Instant::now();
                        c.seq += 1;
                        if let Err(e) = c.send() {
                            out.error("send", &e);
                            out.hist = hist;
                            return out;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        out.error("read", &e);
                        out.hist = hist;
                        return out;
                    }
                }
            }
        }
    }
    out.hist = hist;
    out
}

/// One connect-per-request client slot on the multiplexed thread.
struct Cps {
    sock: Option<TcpStream>,
    id: usize,
    seq: u64,
    msg: Vec<u8>,
    back: Vec<u8>,
    got: usize,
    sent: bool,
    t0: Instant,
}

impl Cps {
    /// Start a non-blocking connect and register it; the request goes out once writable.
    fn start(&mut self, addr: std::net::SocketAddr, poll: &Poll, token: Token) -> io::Result<()> {
        let mut s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        poll.registry()
            .register(&mut s, token, Interest::READABLE | Interest::WRITABLE)?;
        fill(&mut self.msg, self.id, self.seq);
        self.seq += 1;
        (self.got, self.sent, self.t0) = (0, false, Instant::now());
        self.sock = Some(s);
        Ok(())
    }

    /// Advance on readiness: `Ok(true)` when the reply is complete (and the socket closed).
    fn step(&mut self) -> io::Result<bool> {
        let Some(s) = self.sock.as_mut() else {
            return Ok(false);
        };
        if !self.sent {
            if let Some(e) = s.take_error()? {
                return Err(e);
            }
            match s.write(&self.msg) {
                Ok(n) if n == self.msg.len() => self.sent = true,
                Ok(_) => return Err(io::Error::other("short write")),
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.raw_os_error() == Some(libc_enotconn()) =>
                {
                    return Ok(false)
                }
                Err(e) => return Err(e),
            }
        }
        loop {
            let got = self.got;
            match s.read(&mut self.back[got..]) {
                Ok(0) => return Err(io::Error::other("server closed before the reply")),
                Ok(k) => {
                    self.got += k;
                    if self.got == self.back.len() {
                        self.sock = None; // close
                        return Ok(true);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// ENOTCONN on Linux (no libc dependency here).
/// What one poll turn of a client loop says.
enum Wait {
    /// Events (or none, but still within `--io-timeout`) to handle.
    Ready,
    /// Interrupted: poll again.
    Again,
    /// A poll error, or no reply within `--io-timeout` (both recorded in `out`).
    Stop,
}

/// Poll once (50 ms at most) for the client loops of both modes.
fn wait(
    poll: &mut Poll,
    events: &mut Events,
    load: &Load,
    last_progress: Instant,
    out: &mut Outcome,
) -> Wait {
    if let Err(e) = poll.poll(events, Some(Duration::from_millis(50))) {
        if e.kind() == io::ErrorKind::Interrupted {
            return Wait::Again;
        }
        out.error("poll", &e);
        return Wait::Stop;
    }
    if events.is_empty() && last_progress.elapsed() > load.io_timeout {
        out.error("request", &"no reply within --io-timeout");
        return Wait::Stop;
    }
    Wait::Ready
}

fn libc_enotconn() -> i32 {
    107
}

/// `--mode cps --mux T`: connect, send, receive, close, with `n` clients multiplexed on this
/// one thread (non-blocking connects), the shape of a single-threaded epoll load generator.
pub fn connect_per_request(load: &Load, first: usize, n: usize) -> Outcome {
    let mut out = Outcome::new();
    let Target::Tcp(addr) = load.target else {
        out.error("target", &"--mode cps --mux needs a tcp target");
        return out;
    };
    let mut poll = match Poll::new() {
        Ok(p) => p,
        Err(e) => {
            out.error("poll", &e);
            return out;
        }
    };
    let mut clients: Vec<Cps> = (first..first + n)
        .map(|id| Cps {
            sock: None,
            id,
            seq: 0,
            msg: vec![0; load.size],
            back: vec![0; load.size],
            got: 0,
            sent: false,
            t0: Instant::now(),
        })
        .collect();
    for (i, c) in clients.iter_mut().enumerate() {
        if let Err(e) = c.start(addr, &poll, Token(i)) {
            out.error("connect", &e);
            return out;
        }
    }
    let mut events = Events::with_capacity(1024);
    let mut hist = Hist::new();
    let mut last_progress = Instant::now();
    while Instant::now() < load.deadline {
        match wait(&mut poll, &mut events, load, last_progress, &mut out) {
            Wait::Ready => {}
            Wait::Again => continue,
            Wait::Stop => break,
        }
        for ev in events.iter() {
            let i = ev.token().0;
            let Some(c) = clients.get_mut(i) else {
                continue;
            };
            let restart = match c.step() {
                Ok(false) => false,
                Ok(true) => {
                    if c.back != c.msg {
                        out.corrupt += 1;
                        out.hist = hist;
                        return out;
                    }
                    hist.record(nanos(c.t0));
                    out.ops += 1;
                    out.bytes += c.msg.len() as u64;
                    last_progress = Instant::now();
                    true
                }
                Err(e) => {
                    out.error("connect-send-receive", &e);
                    c.sock = None;
                    true
                }
            };
            if restart && Instant::now() < load.deadline {
                if let Err(e) = c.start(addr, &poll, Token(i)) {
                    out.error("connect", &e);
                    // Out of ports or refused: do not spin.
                    std::thread::sleep(Duration::from_millis(1));
                    let _ = c.start(addr, &poll, Token(i));
                }
            }
        }
    }
    out.hist = hist;
    out
}
