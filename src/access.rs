//! The access log: one info line per connection when it ends — listener, peer, duration,
//! bytes in and out, outcome — in a fixed `key value` shape that is easy to grep and parse:
//!
//! `access: listener `echo` peer 127.0.0.1:51034 duration 1.204ms in 5 out 5 outcome ok`
//!
//! Bytes come from the kernel's TCP counters (`TCP_INFO`: `tcpi_bytes_received`,
//! `tcpi_bytes_acked`), read once when the connection ends. That costs one `getsockopt` per
//! connection and nothing per read or write, and it also counts what a handler moved without
//! going through socketd's buffers (an exec'd program owning the socket, `sendfile`, `splice`).
//! Unix stream sockets have no such counters: their bytes show as `-`. Datagrams get a line
//! at debug level only, so a UDP flood cannot flood the log.

use std::os::fd::{AsFd, AsRawFd};
use std::time::Duration;

use crate::conn::{Conn, PeerAddr};
use crate::jobs::Outcome;

/// Bytes received and sent on a connection, when the kernel keeps count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Bytes {
    pub received: Option<u64>,
    pub sent: Option<u64>,
}

/// Read the byte counters of `conn` (TCP only).
pub fn bytes(conn: &Conn) -> Bytes {
    match conn {
        Conn::Tcp(s) => tcp_info(s.as_fd()).unwrap_or_default(),
        Conn::Unix(_) => Bytes::default(),
    }
}

/// The byte counters of a TCP socket given as a descriptor (event-mode connections).
pub fn tcp_bytes(fd: std::os::fd::BorrowedFd<'_>) -> Bytes {
    tcp_info(fd).unwrap_or_default()
}

/// How long no data has moved either way on a TCP connection (`TCP_INFO`'s
/// `tcpi_last_data_recv` and `tcpi_last_data_sent`), whoever does the I/O: the way to tell an
/// exec program's connection is idle without touching its bytes. `None` for Unix sockets.
pub fn tcp_idle(conn: &Conn) -> Option<std::time::Duration> {
    let Conn::Tcp(s) = conn else { return None };
    let (info, _) = raw_tcp_info(s.as_fd())?;
    let ms = info.tcpi_last_data_recv.min(info.tcpi_last_data_sent);
    Some(std::time::Duration::from_millis(u64::from(ms)))
}

fn tcp_info(fd: std::os::fd::BorrowedFd<'_>) -> Option<Bytes> {
    let (info, len) = raw_tcp_info(fd)?;
    // Older kernels return a shorter struct: use the counters it has. Bytes written are those
    // sent once (retransmissions excluded) plus those still queued, unsent (Linux 4.19+), or
    // else those acknowledged (4.1+), which can trail the last write by a round trip.
    let has = |end: usize| len as usize >= end;
    // The counter follows the receive sequence number, which the peer's FIN advances by one.
    // CLOSE is also where a reset ends, so a reset connection may show one byte too few.
    let fin_in = matches!(
        u32::from(info.tcpi_state),
        TCP_CLOSE_WAIT | TCP_LAST_ACK | TCP_CLOSING | TCP_TIME_WAIT | TCP_CLOSE
    );
    let received = has(std::mem::offset_of!(libc::tcp_info, tcpi_bytes_received) + 8)
        .then(|| info.tcpi_bytes_received.saturating_sub(u64::from(fin_in)));
    let sent = if has(std::mem::offset_of!(libc::tcp_info, tcpi_bytes_retrans) + 8) {
        Some(
            info.tcpi_bytes_sent - info.tcpi_bytes_retrans.min(info.tcpi_bytes_sent)
                + u64::from(info.tcpi_notsent_bytes),
        )
    } else {
        has(std::mem::offset_of!(libc::tcp_info, tcpi_bytes_acked) + 8)
            .then_some(info.tcpi_bytes_acked)
    };
    Some(Bytes { received, sent })
}

/// `TCP_INFO` and how many bytes of it this kernel filled in.
fn raw_tcp_info(fd: std::os::fd::BorrowedFd<'_>) -> Option<(libc::tcp_info, libc::socklen_t)> {
    // SAFETY: tcp_info is plain old data; zeroed is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` is writable for `len` bytes and the fd is borrowed (open) for the call;
    // the kernel writes at most `len` bytes and reports how many.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some((info, len))
}

// TCP states (include/net/tcp_states.h) after the peer's FIN has arrived (CLOSE: normally).
const TCP_TIME_WAIT: u32 = 6;
const TCP_CLOSE: u32 = 7;
const TCP_CLOSE_WAIT: u32 = 8;
const TCP_LAST_ACK: u32 = 9;
const TCP_CLOSING: u32 = 11;

fn outcome_word(o: &Outcome) -> &'static str {
    match o {
        Outcome::Ok => "ok",
        Outcome::Error(_) => "error",
        Outcome::Panic(_) => "panic",
    }
}

/// A finished connection: count it in the listener's metrics and hand its access line to
/// the access log's sink (`[daemon] access_log`; never the daemon's own log).
pub fn log_stream(
    listener: &str,
    peer: &PeerAddr,
    took: Duration,
    bytes: Bytes,
    outcome: &Outcome,
    tls: Option<&crate::tls::TlsInfo>,
) {
    if crate::access_log::forwards() {
        // A worker process: the daemon counts it and writes the line (formatted there: the
        // daemon's access log may have been turned on by a reload since this process was
        // forked, and a child that formats nothing runs less code, so faults fewer pages).
        crate::access_log::forward(&crate::access_log::Ended {
            listener: listener.to_string(),
            took,
            received: bytes.received,
            sent: bytes.sent,
            peer: peer.clone(),
            outcome: outcome_word(outcome),
            tls: tls.map(|t| t.log_fields()).unwrap_or_default(),
        });
        return;
    }
    // A library server has no sink: its access lines go through the `log` facade (info).
    let sink = crate::access_log::started();
    let wanted = if sink {
        crate::access_log::enabled()
    } else {
        log::log_enabled!(log::Level::Info)
    };
    let line = wanted.then(|| {
        crate::access_log::access_line(
            listener,
            peer,
            took,
            bytes.received,
            bytes.sent,
            outcome_word(outcome),
            &tls.map(|t| t.log_fields()).unwrap_or_default(),
        )
    });
    crate::stats::listener(listener).connection_ended(took, bytes.received, bytes.sent);
    match line {
        Some(line) if sink => crate::access_log::line(line),
        Some(line) => log::info!("{line}"),
        None => {}
    }
}

/// A finished datagram: its bytes count in the metrics; its access line goes to the daemon's
/// log at debug level only, so a UDP flood cannot flood any log.
pub fn log_datagram(
    listener: &str,
    peer: &PeerAddr,
    took: Duration,
    len: usize,
    outcome: &Outcome,
) {
    if !crate::access_log::forwards() {
        let stats = crate::stats::listener(listener);
        stats
            .bytes_in
            .fetch_add(len as u64, std::sync::atomic::Ordering::Relaxed);
    }
    log::debug!(
        "access: listener `{listener}` peer {peer} duration {took:?} datagram in {len} outcome {}",
        outcome_word(outcome)
    );
}
