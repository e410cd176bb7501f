//! Handlers from outside the `socketd` binary: a panicking handler must hurt nobody but its
//! own client (daemon from `examples/testhandlers.rs`), and the socketserver tutorial's
//! `MyHandler` (`examples/myhandler.rs`) must answer `Your msg=...` from its own daemon.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use crate::harness::*;
use crate::services::listener;

#[test]
fn a_handler_panic_closes_its_connection_and_the_daemon_keeps_serving() {
    let bin = example_bin("testhandlers");
    let mut d = Daemon::start_bin(
        &bin,
        &format!(
            "{}max_workers = 1\n{}{}",
            listener("panicky", "tcp", "127.0.0.1:0", "panicky"),
            listener("panicky-udp", "udp", "127.0.0.1:0", "panicky"),
            listener("echo", "unix", "{dir}/echo.sock", "echo"),
        ),
    );
    // More panics than `max_workers`: each must give its worker back.
    for round in 0..3 {
        let mut s = d.connect("panicky");
        s.write_all(b"hi\n").expect("send");
        assert_eq!(s.read_line(), "hi\n");
        let mut other = d.connect("echo");
        s.write_all(b"panic\n").expect("send");
        assert!(
            s.closed_within(IO_TIMEOUT),
            "round {round}: the panicking connection stayed open"
        );
        other.write_all(b"unaffected\n").expect("send");
        assert_eq!(other.read_line(), "unaffected\n");
    }
    let line = d.wait_log("handler panicked", READY_TIMEOUT);
    assert_contains(
        &line,
        &[
            "listener `panicky`",
            "127.0.0.1:",
            "panicky: asked to panic",
        ],
    );
    d.wait_log_count("handler panicked", 3, READY_TIMEOUT);

    let mut s = d.connect("panicky");
    s.write_all(b"after the panics\n").expect("send");
    assert_eq!(s.read_line(), "after the panics\n");
    drop(s);

    let c = d.dgram("panicky-udp");
    c.send(b"panic");
    assert_eq!(
        c.try_recv(Duration::from_millis(300)),
        None,
        "a panicked datagram gets no reply"
    );
    assert_eq!(c.request(b"hello"), b"hello");
    d.wait_log("listener `panicky-udp` peer", READY_TIMEOUT);

    assert!(d.is_running());
    d.signal(libc::SIGTERM);
    assert_exit_code(d.wait_exit(STOP_BUDGET), 0, &d);
}

#[test]
fn myhandler_example_replies_your_msg() {
    let bin = example_bin("myhandler");
    let d = Daemon::start_bin(
        &bin,
        &format!(
            "{}{}{}",
            listener("tcp", "tcp", "127.0.0.1:0", "myhandler"),
            listener("unix", "unix", "{dir}/my.sock", "myhandler"),
            listener("udp", "udp", "127.0.0.1:0", "myhandler"),
        ),
    );
    for name in ["tcp", "unix"] {
        let mut s = d.connect(name);
        s.write_all(b"hello\nworld\r\n").expect("send");
        assert_eq!(s.read_line(), "Your msg=hello\n");
        assert_eq!(s.read_line(), "Your msg=world\n");
        s.write_all(b"\xffbinary\n").expect("send");
        let expected = b"Your msg=\xffbinary\n";
        assert_bytes_eq(expected, &s.read_n(expected.len()));
        s.shutdown_write();
        assert_eq!(
            s.read_to_end_vec(),
            b"",
            "{name}: closes after the client does"
        );
    }
    let c = d.dgram("udp");
    assert_eq!(lossy(&c.request(b"ping")), "Your msg=ping\n");
}

#[test]
fn myhandler_example_config_passes_check() {
    let bin = example_bin("myhandler");
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/myhandler.toml");
    let mut cmd = command(&bin);
    cmd.arg("check").arg("--config").arg(&config);
    let out = run_with_timeout(cmd, READY_TIMEOUT);
    assert_eq!(
        (out.code(), out.stdout.trim()),
        (Some(0), "ok"),
        "{}",
        out.describe()
    );
    // The socketd binary does not know `myhandler`, and says which names it does know.
    let mut cmd = socketd_cmd();
    cmd.arg("check").arg("--config").arg(&config);
    let out = run_with_timeout(cmd, READY_TIMEOUT);
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    assert_contains(
        &out.stderr,
        &["unknown handler \"myhandler\"", "valid values:"],
    );
}
