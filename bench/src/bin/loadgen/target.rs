//! Where the load goes: `tcp:HOST:PORT`, `unix:/path`, `udp:HOST:PORT`, `unix-dgram:/path`,
//! and a `Stream` that hides TCP versus Unix from the load loops.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

/// A parsed `--target`.
#[derive(Clone, Debug)]
pub enum Target {
    Tcp(SocketAddr),
    Unix(PathBuf),
    Udp(SocketAddr),
    UnixDgram(PathBuf),
}

impl Target {
    pub fn parse(s: &str) -> Result<Target, String> {
        let bad = |e: String| format!("--target {s:?}: {e}");
        if let Some(rest) = s.strip_prefix("tcp:") {
            return rest
                .parse()
                .map(Target::Tcp)
                .map_err(|e| bad(format!("{e}")));
        }
        if let Some(rest) = s.strip_prefix("udp:") {
            return rest
                .parse()
                .map(Target::Udp)
                .map_err(|e| bad(format!("{e}")));
        }
        if let Some(rest) = s.strip_prefix("unix-dgram:") {
            return Ok(Target::UnixDgram(PathBuf::from(rest)));
        }
        if let Some(rest) = s.strip_prefix("unix:") {
            return Ok(Target::Unix(PathBuf::from(rest)));
        }
        Err(bad(
            "expected tcp:IP:PORT, udp:IP:PORT, unix:/path or unix-dgram:/path".into(),
        ))
    }

    pub fn is_datagram(&self) -> bool {
        matches!(self, Target::Udp(_) | Target::UnixDgram(_))
    }

    /// Connects a stream with read/write timeouts so no call blocks past `io_timeout`.
    pub fn connect(&self, io_timeout: Duration) -> io::Result<Stream> {
        let s = match self {
            Target::Tcp(a) => {
                let s = TcpStream::connect_timeout(a, io_timeout)?;
                s.set_nodelay(true)?;
                Stream::Tcp(s)
            }
            Target::Unix(p) => Stream::Unix(UnixStream::connect(p)?),
            Target::Udp(_) | Target::UnixDgram(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "datagram target",
                ))
            }
        };
        s.set_timeouts(io_timeout)?;
        Ok(s)
    }
}

/// A connected TCP or Unix stream.
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn set_timeouts(&self, t: Duration) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => {
                s.set_read_timeout(Some(t))?;
                s.set_write_timeout(Some(t))
            }
            Stream::Unix(s) => {
                s.set_read_timeout(Some(t))?;
                s.set_write_timeout(Some(t))
            }
        }
    }

    pub fn shutdown_write(&self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Write),
            Stream::Unix(s) => s.shutdown(Shutdown::Write),
        }
    }

    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
