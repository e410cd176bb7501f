//! What the log says: input any local user can send must not be able to flood it at warn
//! level. (Whose name syslog lines carry, for forked listeners too, is in `traffic.rs`.)

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use crate::harness::*;

/// Datagrams from an unbound Unix socket cannot be answered. Any local user can send them as
/// fast as they like, so each one must not cost a warn line (debug at most).
#[test]
fn unanswerable_unix_datagrams_are_not_logged_at_warn() {
    let d = Daemon::start(
        "[[listener]]\nname = \"udg\"\nprotocol = \"unix-dgram\"\naddress = \"{dir}/udg.sock\"\nhandler = \"echo\"\n",
    );
    let path = d.path("udg");
    let anonymous = UnixDatagram::unbound().expect("unbound socket");
    for i in 0..20 {
        anonymous
            .send_to(format!("nobody {i}").as_bytes(), &path)
            .expect("send from an unbound socket");
    }
    // A bound client's echo shows the daemon is serving; give the 20 before it time to finish.
    let c = d.dgram("udg");
    c.send(b"somebody");
    assert_eq!(c.recv(), b"somebody");
    std::thread::sleep(Duration::from_millis(300));
    let log = d.log();
    assert!(
        !log.contains("no address to reply"),
        "an unanswerable datagram was logged at info or above:\n{log}"
    );
    assert!(!log.contains("WARN"), "unexpected warnings:\n{log}");
}
