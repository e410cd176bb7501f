//! The proxy on an event loop: a `Relay` pumps client->upstream and upstream->client with one
//! bounded pending chunk per direction (a side whose peer cannot take more is not read), turns
//! each EOF into a half-close of the other side, and ends when both directions are shut.
//! `Assoc` is one UDP client's upstream socket, expired by the loop after `udp_idle`.

use std::io::{self, Read};
use std::net::{Shutdown, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use super::splice::{self, Pipe, Pumped};
use super::stream::{closed_by, interrupted, would_block, EvStream, Pending, Step};
use crate::conn::PeerAddr;
use crate::handler::proxy::{header, ProxySettings, Upstream};
use crate::handler::DatagramSocket;
use crate::worker::Outcome;

/// One direction of a relay.
#[derive(Debug, Default)]
struct Dir {
    pending: Pending,
    eof: bool,
    shut: bool,
    /// Bytes copied so far; past `splice::SWITCH_AFTER` the direction splices.
    moved: u64,
    pipe: Option<Pipe>,
    /// A pipe could not be made: keep copying.
    no_pipe: bool,
}

/// Which directions an event can move: client readable or upstream writable moves
/// client->upstream, and the other way round; the rest would only meet `EAGAIN`.
#[derive(Debug, Clone, Copy)]
pub struct Wake {
    pub c2u: bool,
    pub u2c: bool,
}

impl Wake {
    /// The directions a readiness event on `side` (0 client, 1 upstream) can move.
    pub fn from_event(side: usize, ev: &mio::event::Event) -> Wake {
        let err = ev.is_error();
        let rd = ev.is_readable() || ev.is_read_closed() || err;
        let wr = ev.is_writable() || ev.is_write_closed() || err;
        if side == 0 {
            Wake { c2u: rd, u2c: wr }
        } else {
            Wake { c2u: wr, u2c: rd }
        }
    }
}

/// A proxied connection's state; the client stream is held by the loop's entry.
#[derive(Debug)]
pub struct Relay {
    pub up: EvStream,
    pub connecting: bool,
    pub deadline: Instant,
    target: String,
    c2u: Dir,
    u2c: Dir,
}

impl Relay {
    /// Start a non-blocking connect; the PROXY header, if any, is queued as the first bytes.
    pub fn start(
        settings: &ProxySettings,
        peer: &PeerAddr,
        local: Option<SocketAddr>,
    ) -> io::Result<Relay> {
        let up = match &settings.upstream {
            Upstream::Inet(a) => {
                let s = mio::net::TcpStream::connect(*a)?;
                let _ = s.set_nodelay(true);
                EvStream::Tcp(s)
            }
            Upstream::Unix(p) => EvStream::Unix(mio::net::UnixStream::connect(p)?),
        };
        let mut c2u = Dir::default();
        let preamble = settings.proxy_protocol.map(|v| header(v, peer, local));
        let up = match (&settings.tls, up) {
            // TLS upstream: the front finishes the connect, sends the header in the clear,
            // runs the handshake and relays; this loop talks plaintext to its socketpair end.
            (Some(tls), up) => {
                let wire = match up {
                    EvStream::Tcp(s) => crate::tls::front::Wire::Tcp(s),
                    EvStream::Unix(s) => crate::tls::front::Wire::Unix(s),
                };
                let label = format!("proxy upstream {peer}");
                let end = tls.wrap(wire, preamble.unwrap_or_default(), label)?;
                end.set_nonblocking(true)?;
                EvStream::Unix(mio::net::UnixStream::from_std(end))
            }
            (None, up) => {
                if let Some(h) = preamble {
                    c2u.pending.set(&h);
                }
                up
            }
        };
        let target = match &settings.upstream {
            Upstream::Inet(a) => a.to_string(),
            Upstream::Unix(p) => format!("unix:{}", p.display()),
        };
        Ok(Relay {
            up,
            connecting: true,
            deadline: Instant::now() + settings.connect_timeout,
            target,
            c2u,
            u2c: Dir::default(),
        })
    }

    /// The connect did not finish in time.
    pub fn timed_out(&self) -> Step {
        Step::Close(Outcome::Error(format!(
            "proxy: upstream {} did not accept within connect_timeout; closing the client",
            self.target
        )))
    }

    /// Move whatever can move in both directions.
    pub fn drive(&mut self, client: &mut EvStream, scratch: &mut [u8], mut wake: Wake) -> Step {
        if self.connecting {
            match self.up.connected() {
                Ok(true) => {
                    self.connecting = false;
                    wake = Wake {
                        c2u: true,
                        u2c: true,
                    };
                }
                Ok(false) => return Step::Wait,
                Err(e) => {
                    return Step::Close(Outcome::Error(format!(
                        "proxy: upstream {} refused: {e}; closing the client",
                        self.target
                    )))
                }
            }
        }
        if wake.c2u {
            if let Err(e) = pump(client, &mut self.up, &mut self.c2u, scratch) {
                return closed_by(e);
            }
        }
        if wake.u2c {
            if let Err(e) = pump(&mut self.up, client, &mut self.u2c, scratch) {
                return closed_by(e);
            }
        }
        if self.c2u.shut && self.u2c.shut {
            return Step::Close(Outcome::Ok);
        }
        Step::Wait
    }
}

/// Copy `src` to `dst` until one of them would block; at `src`'s EOF, half-close `dst`.
/// A bulk direction moves to `splice(2)` (see `splice`); the one pending chunk or the pipe is
/// all a direction holds, so a `dst` that cannot take more stops the reading of `src`.
fn pump(
    src: &mut EvStream,
    dst: &mut EvStream,
    dir: &mut Dir,
    scratch: &mut [u8],
) -> io::Result<()> {
    loop {
        if let Some(pipe) = &mut dir.pipe {
            if !dir.eof && splice::pump(&*src, &*dst, pipe)? == Pumped::Blocked {
                return Ok(());
            }
            dir.eof = true;
        }
        if !dir.pending.flush(dst)? {
            return Ok(()); // back-pressure: leave `src` unread until `dst` drains
        }
        if dir.eof {
            if !dir.shut {
                match dst.shutdown(Shutdown::Write) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotConnected => {}
                    Err(e) => return Err(e),
                }
                dir.shut = true;
            }
            return Ok(());
        }
        if dir.moved >= splice::SWITCH_AFTER && !dir.no_pipe && dir.pending.is_empty() {
            match Pipe::new() {
                Ok(p) => dir.pipe = Some(p),
                Err(e) => {
                    log::debug!("proxy: no pipe for splice ({e}); copying");
                    dir.no_pipe = true;
                }
            }
            continue;
        }
        match src.read(scratch) {
            Ok(0) => dir.eof = true,
            Ok(n) => {
                dir.moved += n as u64;
                dir.pending.write_through(dst, &scratch[..n])?;
            }
            Err(e) if would_block(&e) => return Ok(()),
            Err(e) if interrupted(&e) => {}
            Err(e) => return Err(e),
        }
    }
}

/// One UDP client's association with the upstream.
#[derive(Debug)]
pub struct Assoc {
    pub sock: mio::net::UdpSocket,
    pub client: SocketAddr,
    pub reply: DatagramSocket,
    pub last: Instant,
    pub listener: usize,
    pub settings: Arc<ProxySettings>,
}

impl Assoc {
    /// A fresh socket connected to the upstream for `client`.
    pub fn open(
        settings: Arc<ProxySettings>,
        client: SocketAddr,
        reply: DatagramSocket,
        listener: usize,
    ) -> io::Result<Assoc> {
        let Upstream::Inet(up) = settings.upstream else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "UDP proxy needs an ip:port upstream",
            ));
        };
        let bind: SocketAddr = if up.is_ipv4() {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let sock = mio::net::UdpSocket::bind(bind)?;
        sock.connect(up)?;
        Ok(Assoc {
            sock,
            client,
            reply,
            last: Instant::now(),
            listener,
            settings,
        })
    }

    /// Forward one client datagram upstream; a full socket drops it, as UDP may.
    pub fn forward(&mut self, data: &[u8]) {
        self.last = Instant::now();
        if let Err(e) = self.sock.send(data) {
            log::debug!("proxy: UDP to upstream for {}: {e}", self.client);
        }
    }

    /// Relay every waiting upstream reply to the client through the listening socket.
    pub fn relay_back(&mut self, scratch: &mut [u8]) {
        loop {
            match self.sock.recv(scratch) {
                Ok(n) => {
                    self.last = Instant::now();
                    let sent = match &self.reply {
                        DatagramSocket::Udp(s) => s.send_to(&scratch[..n], self.client),
                        DatagramSocket::Unix(_) => return,
                    };
                    if let Err(e) = sent {
                        log::debug!("proxy: UDP reply to {}: {e}", self.client);
                    }
                }
                Err(e) if would_block(&e) => return,
                Err(e) if interrupted(&e) => {}
                // ICMP errors (upstream port closed) surface here; the datagram is lost.
                Err(e) => {
                    log::debug!("proxy: UDP from upstream for {}: {e}", self.client);
                    return;
                }
            }
        }
    }
}
