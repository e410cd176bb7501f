//! Fuzz datagram handling the way the daemon does it: the listener's `Guard` judges the sender
//! (anti-reflection, ACL, rate), then a built-in handler answers through `serve_datagram` on a
//! real loopback UDP socket. Input: byte 0 picks the handler, bytes 1..7 a claimed source
//! (IPv4 + port) for the guard, the rest is the payload. Replies must keep to the RFC sizes.
#![no_main]

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use socketd::config::{Config, ListenerConfig};
use socketd::conn::PeerAddr;
use socketd::handler::{Context, DatagramSocket, Factory, Registry};
use socketd::protect::Guard;
use socketd::worker::{serve_datagram, Outcome};

const HANDLERS: [&str; 5] = ["echo", "discard", "chargen", "daytime", "time"];

struct Setup {
    server: Arc<UdpSocket>,
    client: UdpSocket,
    listeners: Vec<(Arc<ListenerConfig>, Factory)>,
}

fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        let registry = Registry::with_builtins();
        let listeners = HANDLERS
            .iter()
            .map(|h| {
                let text = format!(
                    "[[listener]]\nname = \"{h}\"\nprotocol = \"udp\"\naddress = \"127.0.0.1:0\"\nhandler = \"{h}\"\n\
                     deny = [\"10.0.0.0/8\"]\n"
                );
                let cfg = Config::from_str(&text, Path::new("fuzz.toml"), &registry).expect("valid");
                let cfg = cfg.listeners.into_iter().next().expect("one listener");
                let factory = registry.build_for(&cfg).expect("built-in");
                (Arc::new(cfg), factory)
            })
            .collect();
        let server = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let client = UdpSocket::bind("127.0.0.1:0").expect("bind");
        client.set_read_timeout(Some(Duration::from_secs(2))).expect("timeout");
        Setup { server: Arc::new(server), client, listeners }
    })
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 7 {
        return;
    }
    let s = setup();
    let (cfg, factory) = &s.listeners[usize::from(data[0]) % HANDLERS.len()];
    let claimed = SocketAddrV4::new(
        Ipv4Addr::new(data[1], data[2], data[3], data[4]),
        u16::from_be_bytes([data[5], data[6]]),
    );
    let mut guard = Guard::default();
    let admitted = guard.admit_datagram(cfg, &PeerAddr::Inet(claimed.into()), Instant::now());
    let ip = claimed.ip();
    let must_drop = claimed.port() < 1024
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_unspecified()
        || ip.octets()[0] == 10;
    assert_eq!(admitted, !must_drop, "guard verdict for {claimed}");

    // The real reply goes to our own client socket.
    let payload = data[7..].to_vec();
    let peer: SocketAddr = s.client.local_addr().expect("addr");
    let ctx = Context::new(Arc::clone(cfg), Arc::new(AtomicBool::new(false)));
    let outcome = serve_datagram(
        factory,
        &ctx,
        payload.clone(),
        PeerAddr::Inet(peer),
        DatagramSocket::Udp(Arc::clone(&s.server)),
    );
    assert_eq!(
        outcome,
        Outcome::Ok,
        "{} failed on {} bytes",
        cfg.handler,
        payload.len()
    );
    if cfg.handler == "discard" {
        return;
    }
    let mut buf = vec![0u8; 70_000];
    let (n, _) = s.client.recv_from(&mut buf).expect("a reply");
    match cfg.handler.as_str() {
        "echo" => assert_eq!(&buf[..n], &payload[..]),
        "chargen" => assert!(n <= 512, "chargen replied {n} bytes"),
        "time" => assert_eq!(n, 4),
        "daytime" => assert!(n > 0 && n < 100),
        _ => {}
    }
});
