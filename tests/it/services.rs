//! The five RFC services (echo, discard, chargen, daytime, time) over every socket kind the
//! daemon listens on — TCP, UDP, Unix stream, Unix datagram, and TCP/UDP on IPv6 — checked
//! byte for byte against the RFCs, plus the big-payload cases: 1 MiB binary echo with a
//! half-close, and a full 65507-byte UDP datagram.

use std::io::{Read, Write};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::harness::*;

const SERVICES: [&str; 5] = ["echo", "discard", "chargen", "daytime", "time"];

/// One `[[listener]]` table.
pub fn listener(name: &str, protocol: &str, address: &str, handler: &str) -> String {
    format!(
        "[[listener]]\nname = \"{name}\"\nprotocol = \"{protocol}\"\naddress = \"{address}\"\n\
         handler = \"{handler}\"\n"
    )
}

/// A config with every service on `protocol`, each listener named after its service, at
/// `address(service)`.
fn all_services(protocol: &str, address: impl Fn(&str) -> String) -> String {
    let mut toml = String::from("[daemon]\nshutdown_timeout = \"2s\"\n");
    for service in SERVICES {
        toml.push_str(&listener(service, protocol, &address(service), service));
    }
    toml
}

fn start_all_services(protocol: &str, address: impl Fn(&str) -> String) -> Daemon {
    let d = Daemon::start(&all_services(protocol, address));
    assert_eq!(d.wait_ready(), SERVICES.len(), "{}", d.log_dump());
    d
}

/// Every service answers correctly on the stream listeners of `d`, then the daemon stops
/// cleanly.
fn check_stream_services(mut d: Daemon) {
    stream_echo(&d, "echo");
    stream_discard(&d, "discard");
    stream_chargen(&d, "chargen");
    stream_daytime(&d, "daytime");
    stream_time(&d, "time");
    d.signal(libc::SIGTERM);
    assert_exit_code(d.wait_exit(STOP_BUDGET), 0, &d);
}

/// Every service answers correctly on the datagram listeners of `d`, then the daemon stops.
fn check_datagram_services(mut d: Daemon) {
    dgram_echo(&d, "echo");
    dgram_discard(&d, "discard");
    dgram_chargen(&d, "chargen");
    dgram_daytime(&d, "daytime");
    dgram_time(&d, "time");
    d.signal(libc::SIGTERM);
    assert_exit_code(d.wait_exit(STOP_BUDGET), 0, &d);
}

#[test]
fn tcp_services() {
    check_stream_services(start_all_services("tcp", |_| "127.0.0.1:0".into()));
}

#[test]
fn udp_services() {
    check_datagram_services(start_all_services("udp", |_| "127.0.0.1:0".into()));
}

#[test]
fn unix_services() {
    check_stream_services(start_all_services("unix", |s| format!("{{dir}}/{s}.sock")));
}

#[test]
fn unix_dgram_services() {
    check_datagram_services(start_all_services("unix-dgram", |s| {
        format!("{{dir}}/{s}.sock")
    }));
}

#[test]
fn ipv6_tcp_services() {
    if skip_without_ipv6() {
        return;
    }
    let d = start_all_services("tcp", |_| "[::1]:0".into());
    assert!(d.addr("echo").is_ipv6(), "bound {:?}", d.bound("echo"));
    check_stream_services(d);
}

#[test]
fn ipv6_udp_services() {
    if skip_without_ipv6() {
        return;
    }
    let d = start_all_services("udp", |_| "[::1]:0".into());
    assert!(d.addr("echo").is_ipv6(), "bound {:?}", d.bound("echo"));
    check_datagram_services(d);
}

// ---- stream services ----

pub fn stream_echo(d: &Daemon, name: &str) {
    let mut s = d.connect(name);
    // Round trips, one at a time: each reply comes before the client stops sending.
    for msg in [
        &b"hello\r\n"[..],
        b"\x00\xff binary \x01\x02\r\n",
        b"no newline",
    ] {
        s.write_all(msg).expect("send");
        assert_bytes_eq(msg, &s.read_n(msg.len()));
    }
    s.shutdown_write();
    assert_eq!(s.read_to_end_vec(), b"", "nothing after the echo, then EOF");
}

pub fn stream_discard(d: &Daemon, name: &str) {
    let mut s = d.connect(name);
    s.write_all(&pseudo_random(256 * 1024, 7)).expect("send");
    s.shutdown_write();
    assert_eq!(s.read_to_end_vec(), b"", "discard sends nothing and closes");
}

pub fn stream_chargen(d: &Daemon, name: &str) {
    let mut s = d.connect(name);
    // Three whole periods and a bit: every line, including the wrap past `~`.
    let n = 3 * 95 * 74 + 10;
    let got = s.read_n(n);
    assert_bytes_eq(&chargen_pattern(n, 0), &got);
    let first = lossy(&got[..74]);
    assert_eq!(
        first,
        " !\"#$%&'()*+,-./0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\\]^_`abcdefg\r\n"
    );
    assert_eq!(
        lossy(&got[74..148]),
        "!\"#$%&'()*+,-./0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\\]^_`abcdefgh\r\n"
    );
    // Closing mid-stream is how a chargen client ends; the daemon must carry on.
    drop(s);
    stream_chargen_again(d, name);
}

fn stream_chargen_again(d: &Daemon, name: &str) {
    let mut s = d.connect(name);
    assert_bytes_eq(&chargen_pattern(74, 0), &s.read_n(74));
}

pub fn stream_daytime(d: &Daemon, name: &str) {
    let mut s = d.connect(name);
    let reply = s.read_to_end_vec();
    let text = lossy(&reply);
    assert_eq!(text.matches("\r\n").count(), 1, "one line: {text:?}");
    assert_daytime_now(&text);
}

pub fn stream_time(d: &Daemon, name: &str) {
    let mut s = d.connect(name);
    let reply = s.read_to_end_vec();
    assert_eq!(reply.len(), 4, "four bytes then close, got {reply:02x?}");
    assert_time_now(&reply);
}

// ---- datagram services ----

pub fn dgram_echo(d: &Daemon, name: &str) {
    let c = d.dgram(name);
    for msg in [&b"hello"[..], b"\x00\xff binary\r\n", b""] {
        assert_bytes_eq(msg, &c.request(msg));
    }
    let big = pseudo_random(8000, 3);
    assert_bytes_eq(&big, &c.request(&big));
}

pub fn dgram_discard(d: &Daemon, name: &str) {
    let c = d.dgram(name);
    c.send(b"into the void");
    let reply = c.try_recv(Duration::from_millis(300));
    assert_eq!(reply, None, "discard never replies");
}

pub fn dgram_chargen(d: &Daemon, name: &str) {
    let c = d.dgram(name);
    let period = chargen_pattern(2 * 95 * 74, 0);
    for _ in 0..20 {
        let reply = c.request(b"x");
        assert!(
            reply.len() <= 512,
            "a chargen datagram holds at most 512 characters, got {}",
            reply.len()
        );
        let fits = (0..95).any(|line| period[line * 74..].starts_with(&reply));
        assert!(
            fits,
            "reply is not a run of the RFC 864 pattern from a line start: {:?}",
            lossy(&reply)
        );
    }
}

pub fn dgram_daytime(d: &Daemon, name: &str) {
    let c = d.dgram(name);
    let reply = c.request(b"?");
    assert_daytime_now(&lossy(&reply));
}

pub fn dgram_time(d: &Daemon, name: &str) {
    let c = d.dgram(name);
    let reply = c.request(b"");
    assert_eq!(reply.len(), 4, "four bytes, got {reply:02x?}");
    assert_time_now(&reply);
}

// ---- big payloads ----

/// 1 MiB of random binary through a stream echo listener with a half-close: the client sends
/// everything (while a reader thread drains the replies, so neither side's buffers fill and
/// deadlock), shuts down its write side, and must get every byte back, then EOF.
fn mib_echo(d: &Daemon, name: &str) {
    let data = pseudo_random(1 << 20, 0x5eed);
    let mut s = d.connect(name);
    let mut reader = s.try_clone();
    let back = std::thread::spawn(move || reader.read_to_end_vec());
    for chunk in data.chunks(64 * 1024) {
        s.write_all(chunk).expect("send");
    }
    s.shutdown_write();
    let got = back.join().expect("reader thread");
    assert_bytes_eq(&data, &got);
}

#[test]
fn mib_binary_echo_over_tcp_and_unix_with_half_close() {
    let toml = format!(
        "{}{}",
        listener("tcp", "tcp", "127.0.0.1:0", "echo"),
        listener("unix", "unix", "{dir}/echo.sock", "echo")
    );
    let d = Daemon::start(&toml);
    mib_echo(&d, "tcp");
    mib_echo(&d, "unix");
}

#[test]
fn udp_echo_of_a_maximum_size_datagram() {
    let d = Daemon::start(&listener("udp", "udp", "127.0.0.1:0", "echo"));
    let c = d.dgram("udp");
    let max = pseudo_random(65_507, 11);
    assert_bytes_eq(&max, &c.request(&max));
}

#[test]
fn unix_dgram_echo_of_a_large_datagram() {
    let d = Daemon::start(&listener("ud", "unix-dgram", "{dir}/ud.sock", "echo"));
    let c = d.dgram("ud");
    let big = pseudo_random(60_000, 12);
    assert_bytes_eq(&big, &c.request(&big));
}

// ---- what the RFCs say the answers are ----

/// `len` bytes of the RFC 864 pattern from line `first_line`: line n is the 72 printable
/// characters starting at ring position n (ring = ASCII 32..=126), then CR LF.
pub fn chargen_pattern(len: usize, first_line: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 74);
    let mut line = first_line;
    while out.len() < len {
        out.extend((0..72).map(|i| b' ' + ((line + i) % 95) as u8));
        out.extend_from_slice(b"\r\n");
        line += 1;
    }
    out.truncate(len);
    out
}

/// RFC 868: seconds since 1900-01-01 UTC, big-endian, mod 2^32; within a few seconds of now.
fn assert_time_now(reply: &[u8]) {
    let got = u32::from_be_bytes(reply.try_into().expect("4 bytes"));
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs();
    let expected = ((now + 2_208_988_800) % (1 << 32)) as u32;
    let off = i64::from(expected.wrapping_sub(got) as i32);
    assert!(
        off.abs() <= 5,
        "time says {got}, the clock says {expected} ({off} s apart)"
    );
}

/// RFC 867 as socketd writes it: `Thursday, November 26, 2026 14:40:51-UTC\r\n`, for a
/// moment within a few seconds of now.
fn assert_daytime_now(text: &str) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs();
    let near: Vec<String> = (now - 5..=now + 1).map(daytime_at).collect();
    assert!(
        near.iter().any(|l| l == text),
        "daytime said {text:?}; expected one of {near:#?}"
    );
}

/// The daytime line for a Unix time, computed independently of the daemon's clock code.
fn daytime_at(unix: u64) -> String {
    const WEEKDAYS: [&str; 7] = [
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
        "Monday",
        "Tuesday",
        "Wednesday",
    ];
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let (mut days, secs) = (unix / 86_400, unix % 86_400);
    let weekday = WEEKDAYS[(days % 7) as usize];
    let leap = |y: u64| (y.is_multiple_of(4) && !y.is_multiple_of(100)) || y.is_multiple_of(400);
    let mut year = 1970;
    while days >= if leap(year) { 366 } else { 365 } {
        days -= if leap(year) { 366 } else { 365 };
        year += 1;
    }
    let lengths = [
        31,
        if leap(year) { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    let mut month = 0;
    while days >= lengths[month] {
        days -= lengths[month];
        month += 1;
    }
    format!(
        "{weekday}, {} {}, {year} {:02}:{:02}:{:02}-UTC\r\n",
        MONTHS[month],
        days + 1,
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

#[test]
fn the_reference_daytime_is_right() {
    assert_eq!(daytime_at(0), "Thursday, January 1, 1970 00:00:00-UTC\r\n");
    assert_eq!(
        daytime_at(1_795_704_051),
        "Thursday, November 26, 2026 14:40:51-UTC\r\n"
    );
    assert_eq!(
        daytime_at(951_782_400),
        "Tuesday, February 29, 2000 00:00:00-UTC\r\n"
    );
}

#[test]
fn stream_reads_are_bounded() {
    // A harness self-check: a silent server must not hang a test.
    let d = Daemon::start(&listener("discard", "tcp", "127.0.0.1:0", "discard"));
    let mut s = d.connect("discard");
    assert!(s.silent_for(Duration::from_millis(100)));
    let mut buf = [0u8; 1];
    s.set_read_timeout(Duration::from_millis(50));
    let e = s.read(&mut buf).expect_err("times out");
    assert!(is_timeout(&e), "{e}");
}

/// Check that listener `name` of `d` serves `service` correctly, over whatever kind of
/// socket it is (for topic files that start their own daemons).
pub fn check_listener(d: &Daemon, name: &str, service: &str) {
    let stream = matches!(d.bound(name).protocol.as_str(), "tcp" | "unix");
    match (service, stream) {
        ("echo", true) => stream_echo(d, name),
        ("discard", true) => stream_discard(d, name),
        ("chargen", true) => stream_chargen(d, name),
        ("daytime", true) => stream_daytime(d, name),
        ("time", true) => stream_time(d, name),
        ("echo", false) => dgram_echo(d, name),
        ("discard", false) => dgram_discard(d, name),
        ("chargen", false) => dgram_chargen(d, name),
        ("daytime", false) => dgram_daytime(d, name),
        ("time", false) => dgram_time(d, name),
        _ => panic!("no check for service {service:?}"),
    }
}
