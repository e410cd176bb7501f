//! A socketd daemon with handlers that misbehave on purpose, for the integration tests
//! (`tests/it/`): the `socketd` binary only has well-behaved RFC services, and the tests must
//! show that a panicking, slow or stuck handler harms nobody but its own client.
//!
//! Handlers, on top of the built-ins:
//! - `panicky`: echoes each line, but panics when a line is `panic` (stream), or a datagram
//!   is `panic` (datagram).
//! - `gate`: sends `start\n` as soon as it runs, then waits for one line from the client and
//!   answers `bye\n`: a handler whose running time the client controls, to watch
//!   `max_workers` at work.
//! - `stuck`: sends `stuck\n`, then sleeps for a minute, ignoring its socket and the
//!   shutting-down flag: the worst case for a graceful stop.
//!
//! ```text
//! cargo run --example testhandlers -- --config FILE
//! ```

use std::io::{self, BufRead, Write};
use std::process::ExitCode;
use std::time::Duration;

use socketd::handler::{Context, Handler, Registry, Request};

/// Echoes lines; panics on a line (or datagram) that says `panic`.
#[derive(Debug, Default)]
struct Panicky;

impl Handler for Panicky {
    fn handle(&mut self, req: &mut Request, _ctx: &Context) -> io::Result<()> {
        match req {
            Request::Stream(s) => loop {
                let mut line = Vec::new();
                if s.rfile.read_until(b'\n', &mut line)? == 0 {
                    return Ok(());
                }
                if line.trim_ascii() == b"panic" {
                    panic!("panicky: asked to panic");
                }
                s.wfile.write_all(&line)?;
                s.wfile.flush()?;
            },
            Request::Datagram(d) => {
                if d.data().trim_ascii() == b"panic" {
                    panic!("panicky: asked to panic");
                }
                d.reply(d.data()).map(drop)
            }
        }
    }
}

/// Runs until the client says so.
#[derive(Debug, Default)]
struct Gate;

impl Handler for Gate {
    fn handle(&mut self, req: &mut Request, _ctx: &Context) -> io::Result<()> {
        let Request::Stream(s) = req else {
            return Err(io::Error::other("gate serves stream listeners only"));
        };
        s.wfile.write_all(b"start\n")?;
        s.wfile.flush()?;
        let mut line = Vec::new();
        s.rfile.read_until(b'\n', &mut line)?;
        s.wfile.write_all(b"bye\n")?;
        s.wfile.flush()
    }
}

/// Never returns in time, whatever happens to its connection.
#[derive(Debug, Default)]
struct Stuck;

impl Handler for Stuck {
    fn handle(&mut self, req: &mut Request, _ctx: &Context) -> io::Result<()> {
        if let Request::Stream(s) = req {
            s.wfile.write_all(b"stuck\n")?;
            s.wfile.flush()?;
        }
        std::thread::sleep(Duration::from_secs(60));
        Ok(())
    }
}

fn main() -> ExitCode {
    let mut registry = Registry::with_builtins();
    registry.register_default::<Panicky>("panicky");
    registry.register_default::<Gate>("gate");
    registry.register_default::<Stuck>("stuck");
    socketd::cli::main_with(registry)
}
