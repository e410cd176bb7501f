//! epoll_echo: the benchmark's "kernel limit" line. A minimal single-threaded mio (epoll)
//! echo server for TCP, UDP and Unix streams with no features, no limits and no logging,
//! so it costs about what the kernel's socket calls cost and nothing else.
//!
//! `epoll_echo [--tcp IP:PORT] [--udp IP:PORT] [--unix PATH]`; prints `ready` once bound.

use mio::net::{TcpListener, UdpSocket, UnixListener};
use mio::{Events, Interest, Poll, Token};
use std::collections::HashMap;
use std::io::{self, Read, Write};

const TCP: Token = Token(0);
const UDP: Token = Token(1);
const UNIX: Token = Token(2);
const FIRST_CONN: usize = 3;

trait Conn: Read + Write + mio::event::Source {}
impl Conn for mio::net::TcpStream {}
impl Conn for mio::net::UnixStream {}

struct Client {
    sock: Box<dyn Conn>,
    pending: Vec<u8>,
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

/// Echo what is readable; returns false when the connection is finished.
fn serve(c: &mut Client, buf: &mut [u8]) -> bool {
    loop {
        while !c.pending.is_empty() {
            match c.sock.write(&c.pending) {
                Ok(n) => {
                    c.pending.drain(..n);
                }
                Err(e) if would_block(&e) => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        match c.sock.read(buf) {
            Ok(0) => return false,
            Ok(n) => c.pending.extend_from_slice(&buf[..n]),
            Err(e) if would_block(&e) => return true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
}

fn main() -> io::Result<()> {
    let mut poll = Poll::new()?;
    let mut args = std::env::args().skip(1);
    let (mut tcp, mut udp, mut unix) = (None, None, None);
    while let Some(a) = args.next() {
        let v = args
            .next()
            .ok_or_else(|| io::Error::other(format!("{a} needs a value")))?;
        let bad = |e| io::Error::other(format!("{a} {v}: {e}"));
        match a.as_str() {
            "--tcp" => {
                let mut l = TcpListener::bind(v.parse().map_err(bad)?)?;
                poll.registry().register(&mut l, TCP, Interest::READABLE)?;
                tcp = Some(l);
            }
            "--udp" => {
                let mut s = UdpSocket::bind(v.parse().map_err(bad)?)?;
                poll.registry().register(&mut s, UDP, Interest::READABLE)?;
                udp = Some(s);
            }
            "--unix" => {
                let _ = std::fs::remove_file(&v);
                let mut l = UnixListener::bind(&v)?;
                poll.registry().register(&mut l, UNIX, Interest::READABLE)?;
                unix = Some(l);
            }
            _ => return Err(io::Error::other(format!("unknown argument {a}"))),
        }
    }
    println!("ready");
    let mut events = Events::with_capacity(1024);
    let mut clients: HashMap<usize, Client> = HashMap::new();
    let mut next = FIRST_CONN;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if let Err(e) = poll.poll(&mut events, None) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        for ev in events.iter() {
            match ev.token() {
                TCP | UNIX => loop {
                    let sock: Box<dyn Conn> = match (ev.token(), &tcp, &unix) {
                        (TCP, Some(l), _) => match l.accept() {
                            Ok((s, _)) => {
                                let _ = s.set_nodelay(true);
                                Box::new(s)
                            }
                            Err(_) => break,
                        },
                        (_, _, Some(l)) => match l.accept() {
                            Ok((s, _)) => Box::new(s),
                            Err(_) => break,
                        },
                        _ => break,
                    };
                    let mut c = Client {
                        sock,
                        pending: Vec::new(),
                    };
                    let t = Token(next);
                    next += 1;
                    if poll
                        .registry()
                        .register(&mut c.sock, t, Interest::READABLE | Interest::WRITABLE)
                        .is_ok()
                    {
                        clients.insert(t.0, c);
                    }
                },
                UDP => {
                    if let Some(s) = &udp {
                        while let Ok((n, from)) = s.recv_from(&mut buf) {
                            let _ = s.send_to(&buf[..n], from);
                        }
                    }
                }
                Token(t) => {
                    let done = match clients.get_mut(&t) {
                        Some(c) => !serve(c, &mut buf),
                        None => false,
                    };
                    if done {
                        if let Some(mut c) = clients.remove(&t) {
                            let _ = poll.registry().deregister(&mut c.sock);
                        }
                    }
                }
            }
        }
    }
}
