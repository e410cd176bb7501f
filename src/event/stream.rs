//! The non-blocking stream an event loop owns (TCP or Unix) and the small state machines of
//! the built-in services: echo, discard, chargen, daytime, time and file.
//!
//! Machines are driven with both read and write interest registered once (edge-triggered):
//! every event runs the machine until the socket says `WouldBlock`. A machine that cannot
//! write stops reading (back-pressure), and nothing is buffered per connection beyond the one
//! bounded chunk the peer has not taken yet, so an idle connection costs a few hundred bytes.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};

use mio::event::Source;
use mio::{Interest, Registry, Token};

use crate::conn::Conn;
use crate::worker::Outcome;

/// A connection registered with an event loop.
#[derive(Debug)]
pub enum EvStream {
    Tcp(mio::net::TcpStream),
    Unix(mio::net::UnixStream),
}

impl EvStream {
    /// Take over an accepted blocking connection.
    /// An accepted connection for a loop (`nonblocking`: it is already, no `ioctl` needed).
    pub fn from_conn(conn: Conn, nonblocking: bool) -> io::Result<EvStream> {
        if !nonblocking {
            conn.set_nonblocking(true)?;
        }
        Ok(match conn {
            Conn::Tcp(s) => {
                let _ = s.set_nodelay(true);
                EvStream::Tcp(mio::net::TcpStream::from_std(s))
            }
            Conn::Unix(s) => EvStream::Unix(mio::net::UnixStream::from_std(s)),
        })
    }

    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            EvStream::Tcp(s) => s.shutdown(how),
            EvStream::Unix(s) => s.shutdown(how),
        }
    }

    /// A pending connect's result: `Ok(true)` connected, `Ok(false)` still in progress.
    pub fn connected(&self) -> io::Result<bool> {
        let (err, peer) = match self {
            EvStream::Tcp(s) => (s.take_error()?, s.peer_addr().map(|_| ())),
            EvStream::Unix(s) => (s.take_error()?, s.peer_addr().map(|_| ())),
        };
        if let Some(e) = err {
            return Err(e);
        }
        match peer {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(false),
            Err(e) => Err(e),
        }
    }
}

impl Read for EvStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            EvStream::Tcp(s) => s.read(buf),
            EvStream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for EvStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            EvStream::Tcp(s) => s.write(buf),
            EvStream::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Source for EvStream {
    fn register(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        match self {
            EvStream::Tcp(s) => s.register(r, t, i),
            EvStream::Unix(s) => s.register(r, t, i),
        }
    }
    fn reregister(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        match self {
            EvStream::Tcp(s) => s.reregister(r, t, i),
            EvStream::Unix(s) => s.reregister(r, t, i),
        }
    }
    fn deregister(&mut self, r: &Registry) -> io::Result<()> {
        match self {
            EvStream::Tcp(s) => s.deregister(r),
            EvStream::Unix(s) => s.deregister(r),
        }
    }
}

impl AsFd for EvStream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            EvStream::Tcp(s) => s.as_fd(),
            EvStream::Unix(s) => s.as_fd(),
        }
    }
}

impl AsRawFd for EvStream {
    fn as_raw_fd(&self) -> RawFd {
        self.as_fd().as_raw_fd()
    }
}

/// What a machine wants after running.
#[derive(Debug)]
pub enum Step {
    /// Waiting for the next readiness event.
    Wait,
    /// Finished: close the connection and report this outcome.
    Close(Outcome),
}

pub fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

pub fn interrupted(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::Interrupted
}

/// A peer that went away is a normal end; anything else is reported.
pub fn closed_by(e: io::Error) -> Step {
    if crate::worker::is_peer_gone(&e) {
        Step::Close(Outcome::Ok)
    } else {
        Step::Close(Outcome::Error(e.to_string()))
    }
}

/// Bytes read but not yet written on: at most one scratch buffer's worth. Empty costs nothing.
#[derive(Debug, Default)]
pub struct Pending {
    buf: Vec<u8>,
    off: usize,
}

/// Above this, an emptied pending buffer gives its memory back.
const KEEP_CAPACITY: usize = 4096;

impl Pending {
    pub fn is_empty(&self) -> bool {
        self.off >= self.buf.len()
    }

    pub fn set(&mut self, bytes: &[u8]) {
        self.buf.clear();
        self.buf.extend_from_slice(bytes);
        self.off = 0;
    }

    /// Write what is pending; `Ok(true)` when all of it went.
    pub fn flush(&mut self, to: &mut impl Write) -> io::Result<bool> {
        while !self.is_empty() {
            match to.write(&self.buf[self.off..]) {
                Ok(n) => self.off += n,
                Err(e) if would_block(&e) => return Ok(false),
                Err(e) if interrupted(&e) => {}
                Err(e) => return Err(e),
            }
        }
        if self.buf.capacity() > KEEP_CAPACITY {
            self.buf = Vec::new();
        } else {
            self.buf.clear();
        }
        self.off = 0;
        Ok(true)
    }

    /// Write `bytes` straight through, keeping what the socket would not take.
    pub fn write_through(&mut self, to: &mut impl Write, bytes: &[u8]) -> io::Result<bool> {
        let mut sent = 0;
        while sent < bytes.len() {
            match to.write(&bytes[sent..]) {
                Ok(n) => sent += n,
                Err(e) if would_block(&e) => break,
                Err(e) if interrupted(&e) => {}
                Err(e) => return Err(e),
            }
        }
        if sent < bytes.len() {
            self.set(&bytes[sent..]);
            return Ok(false);
        }
        Ok(true)
    }
}

/// A built-in service's per-connection state.
#[derive(Debug)]
pub enum Machine {
    Echo {
        pending: Pending,
        eof: bool,
    },
    Discard,
    Chargen {
        pos: usize,
    },
    /// daytime and time: one reply, then close.
    Reply {
        pending: Pending,
    },
    File {
        file: File,
        offset: i64,
        len: u64,
    },
    Proxy(Box<super::proxy::Relay>),
}

/// Echo until EOF, then close once everything read has been written back.
///
/// `peer_shut` is the event's read-closed flag. Without it, a read shorter than the buffer
/// means the socket is drained (edge-triggered: new bytes bring a new event), which saves the
/// `EAGAIN` read per request; with it, reading goes on to see the EOF.
pub fn echo(
    s: &mut EvStream,
    pending: &mut Pending,
    eof: &mut bool,
    scratch: &mut [u8],
    peer_shut: bool,
) -> Step {
    loop {
        match pending.flush(s) {
            Ok(true) => {}
            Ok(false) => return Step::Wait, // back-pressure: no reading until it drains
            Err(e) => return closed_by(e),
        }
        if *eof {
            return Step::Close(Outcome::Ok);
        }
        match s.read(scratch) {
            Ok(0) => *eof = true,
            Ok(n) => match pending.write_through(s, &scratch[..n]) {
                Ok(true) if n < scratch.len() && !peer_shut => return Step::Wait,
                Ok(_) => {}
                Err(e) => return closed_by(e),
            },
            Err(e) if would_block(&e) => return Step::Wait,
            Err(e) if interrupted(&e) => {}
            Err(e) => return closed_by(e),
        }
    }
}

/// Read and drop until EOF. Returns `Some(step)` once the connection is over.
pub fn discard(s: &mut EvStream, scratch: &mut [u8]) -> Option<Step> {
    loop {
        match s.read(scratch) {
            Ok(0) => return Some(Step::Close(Outcome::Ok)),
            Ok(_) => {}
            Err(e) if would_block(&e) => return None,
            Err(e) if interrupted(&e) => {}
            Err(e) => return Some(closed_by(e)),
        }
    }
}

/// Send the chargen pattern until the client goes away (input is read and dropped).
pub fn chargen(s: &mut EvStream, pos: &mut usize, pattern: &[u8], scratch: &mut [u8]) -> Step {
    if let Some(step) = discard(s, scratch) {
        return step;
    }
    let period = pattern.len() / 2;
    loop {
        match s.write(&pattern[*pos..*pos + period]) {
            Ok(n) => *pos = (*pos + n) % period,
            Err(e) if would_block(&e) => return Step::Wait,
            Err(e) if interrupted(&e) => {}
            Err(e) => return closed_by(e),
        }
    }
}

/// Write the one reply, then close.
pub fn reply(s: &mut EvStream, pending: &mut Pending) -> Step {
    match pending.flush(s) {
        Ok(true) => {
            let _ = s.shutdown(Shutdown::Write);
            Step::Close(Outcome::Ok)
        }
        Ok(false) => Step::Wait,
        Err(e) => closed_by(e),
    }
}

/// `sendfile` until the socket is full or the file is sent.
pub fn send_file(s: &mut EvStream, file: &File, offset: &mut i64, len: u64) -> Step {
    while (*offset as u64) < len {
        let want = (len - *offset as u64).min(1 << 30) as usize;
        match nix::sys::sendfile::sendfile(s.as_fd(), file.as_fd(), Some(offset), want) {
            Ok(0) => break, // the file shrank while being sent: what there was is sent
            Ok(_) => {}
            Err(nix::errno::Errno::EAGAIN) => return Step::Wait,
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return closed_by(io::Error::from(e)),
        }
    }
    let _ = s.shutdown(Shutdown::Write);
    Step::Close(Outcome::Ok)
}
