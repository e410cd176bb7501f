//! Many clients at once, and `max_workers` back-pressure: a full listener stops accepting
//! (the kernel backlog holds the queue) and resumes as workers free, refusing nobody.

use std::io::Write;
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Barrier};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::harness::*;
use crate::services::listener;

const CLIENTS: usize = 50;
const ROUNDS: usize = 20;

/// `CLIENTS` threads, all connected before any sends, each doing `ROUNDS` echo round trips
/// with its own payload.
fn concurrent_stream_echo(d: &Daemon, name: &str) {
    let barrier = Arc::new(Barrier::new(CLIENTS));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let mut s = d.connect(name);
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                barrier.wait();
                for round in 0..ROUNDS {
                    let mut msg = format!("client {i} round {round} ").into_bytes();
                    msg.extend(pseudo_random(100 + i * 37, (i * ROUNDS + round) as u64));
                    s.write_all(&msg).expect("send");
                    assert_bytes_eq(&msg, &s.read_n(msg.len()));
                }
                s.shutdown_write();
                assert_eq!(s.read_to_end_vec(), b"");
            })
        })
        .collect();
    join_all(clients);
}

fn join_all(threads: Vec<JoinHandle<()>>) {
    let failed = threads.into_iter().filter_map(|t| t.join().err()).count();
    assert_eq!(
        failed, 0,
        "{failed} client threads failed (see their panics above)"
    );
}

#[test]
fn fifty_concurrent_tcp_and_unix_clients() {
    let mut d = Daemon::start(&format!(
        "{}{}",
        listener("tcp", "tcp", "127.0.0.1:0", "echo"),
        listener("unix", "unix", "{dir}/echo.sock", "echo"),
    ));
    concurrent_stream_echo(&d, "tcp");
    concurrent_stream_echo(&d, "unix");
    d.signal(libc::SIGTERM);
    assert_exit_code(d.wait_exit(STOP_BUDGET), 0, &d);
}

#[test]
fn fifty_concurrent_udp_clients() {
    let d = Daemon::start(&listener("udp", "udp", "127.0.0.1:0", "echo"));
    let barrier = Arc::new(Barrier::new(CLIENTS));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let c = d.dgram("udp");
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                barrier.wait();
                for round in 0..ROUNDS {
                    let msg = format!("client {i} round {round}").into_bytes();
                    assert_bytes_eq(&msg, &c.request(&msg));
                }
            })
        })
        .collect();
    join_all(clients);
}

/// What a `gate` client thread reports.
#[derive(Debug, PartialEq, Eq)]
enum Event {
    /// The handler for client `i` is running (it sent `start`).
    Started(usize),
    /// Client `i` got `bye` and the handler's answer is complete.
    Done(usize),
}

/// One `gate` client: waits for `start`, reports it, waits to be released, sends a line and
/// expects `bye`.
fn gate_client(mut s: Stream, i: usize, events: Sender<Event>) -> (Sender<()>, JoinHandle<()>) {
    let (release_tx, release_rx) = channel::<()>();
    let t = std::thread::spawn(move || {
        // A queued client waits in the backlog for as long as the test holds the others.
        s.set_read_timeout(Duration::from_secs(20));
        assert_eq!(s.read_line(), "start\n", "client {i}");
        events.send(Event::Started(i)).expect("report");
        release_rx
            .recv_timeout(Duration::from_secs(20))
            .expect("released");
        s.write_all(b"go\n").expect("send");
        assert_eq!(s.read_line(), "bye\n", "client {i}");
        events.send(Event::Done(i)).expect("report");
    });
    (release_tx, t)
}

#[test]
fn max_workers_limits_concurrent_handlers_and_queues_the_rest() {
    const MAX: usize = 2;
    const N: usize = 5;
    let bin = example_bin("testhandlers");
    let d = Daemon::start_bin(
        &bin,
        &format!(
            "{}max_workers = {MAX}\n",
            listener("gate", "tcp", "127.0.0.1:0", "gate")
        ),
    );
    let (events_tx, events) = channel();
    let mut clients: Vec<_> = (0..N)
        .map(|i| gate_client(d.connect("gate"), i, events_tx.clone()))
        .collect();
    let next = |timeout: Duration| events.recv_timeout(timeout).ok();

    let (mut started, mut released, mut done) = (Vec::new(), 0, 0);
    while done < N {
        // Collect starts until the pool is full (or nothing more comes).
        while started.len() - released < MAX && started.len() < N {
            match next(IO_TIMEOUT) {
                Some(Event::Started(i)) => started.push(i),
                Some(Event::Done(_)) => done += 1,
                None => panic!(
                    "only {} of {N} handlers ever started\n{}",
                    started.len(),
                    d.log_dump()
                ),
            }
        }
        if started.len() == MAX && released == 0 {
            // Full: no third handler may start while the first two run.
            match next(Duration::from_millis(300)) {
                None => {}
                Some(e) => panic!("{e:?} while {MAX} handlers were busy\n{}", d.log_dump()),
            }
            d.signal(libc::SIGUSR1);
            // The status line says so too (its wording may grow; these words stay).
            let status = d.wait_log("status: listener `gate`", READY_TIMEOUT);
            assert_contains(&status, &[&format!("busy of {MAX}"), "0 served", "paused"]);
            let busy = status.split(" busy of").next().and_then(|s| {
                s.split_whitespace()
                    .rev()
                    .find_map(|w| w.parse::<usize>().ok())
            });
            assert_eq!(busy, Some(MAX), "{status}");
        }
        if released < started.len() {
            // Free one worker; exactly one queued client may start in its place.
            clients[started[released]].0.send(()).expect("release");
            released += 1;
        } else {
            match next(IO_TIMEOUT) {
                Some(Event::Done(_)) => done += 1,
                other => panic!(
                    "expected a client to finish, got {other:?}\n{}",
                    d.log_dump()
                ),
            }
        }
        assert!(
            started.len() - released <= MAX,
            "more than {MAX} handlers ran at once"
        );
    }
    for (_, t) in clients.drain(..) {
        t.join().expect("client thread");
    }
    let mut order = started.clone();
    order.sort_unstable();
    assert_eq!(
        order,
        (0..N).collect::<Vec<_>>(),
        "every client served, none refused"
    );
}
