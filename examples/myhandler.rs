//! The socketserver tutorial's `MyHandler`, done the socketd way: your own handler in your own
//! daemon binary.
//!
//! A programmer who wants a protocol of their own writes a type that implements
//! `socketd::handler::Handler` (socketserver's `setup` / `handle` / `finish`, with the request
//! socket, the client's address and the server context), registers it by name in a
//! `Registry` next to the built-ins, and hands the registry to `socketd::cli::main_with`. The
//! result is a complete socketd: the same TOML file, `check`, `--daemon`, reload on SIGHUP,
//! graceful stop on SIGTERM, threaded or forked workers, TCP, UDP and Unix sockets, and a
//! `handler = "myhandler"` that the config can now name. Put this file in your own crate's
//! `src/main.rs` with `socketd` as a dependency, or try it here:
//!
//! ```text
//! cargo run --example myhandler -- --config examples/myhandler.toml
//! printf 'hello\nworld\n' | nc 127.0.0.1 9999          # Your msg=hello / Your msg=world
//! printf 'hi\n' | nc -U /tmp/socketd-myhandler.sock    # Your msg=hi
//! ```

use std::io::{self, BufRead, Read, Write};
use std::process::ExitCode;

use socketd::handler::{Context, DatagramRequest, Handler, Registry, Request, StreamRequest};

/// Longest line a client may send; a client that never sends a newline cannot make the
/// handler buffer without limit.
const MAX_LINE: u64 = 64 * 1024;

/// Answers every message with `Your msg=<message>`, until the client closes.
///
/// socketd makes a fresh `MyHandler` for every connection (or datagram), so a field here
/// would be per-client state, exactly like attributes on a socketserver handler instance.
#[derive(Debug, Default)]
struct MyHandler;

impl Handler for MyHandler {
    fn setup(&mut self, req: &mut Request, ctx: &Context) -> io::Result<()> {
        log::info!("{}: request from {}", ctx.listener_name(), req.peer());
        Ok(())
    }

    fn handle(&mut self, req: &mut Request, _ctx: &Context) -> io::Result<()> {
        match req {
            Request::Stream(s) => reply_to_lines(s),
            Request::Datagram(d) => reply_to_datagram(d),
        }
    }

    fn finish(&mut self, req: &mut Request, ctx: &Context) -> io::Result<()> {
        log::info!("{}: finished with {}", ctx.listener_name(), req.peer());
        Ok(())
    }
}

/// Stream: one reply per line, sent as soon as the line is in.
fn reply_to_lines(s: &mut StreamRequest) -> io::Result<()> {
    let mut line = Vec::new();
    loop {
        line.clear();
        // `read_until` rather than `read_line`: clients may send bytes that are not UTF-8.
        let n = match (&mut s.rfile).take(MAX_LINE).read_until(b'\n', &mut line) {
            Ok(n) => n,
            Err(e) if client_left(&e) => return Ok(()),
            Err(e) => return Err(e),
        };
        if n == 0 {
            return Ok(()); // the client closed: the conversation is over
        }
        let sent = reply(&mut s.wfile, &line).and_then(|()| s.wfile.flush());
        match sent {
            Ok(()) => {}
            Err(e) if client_left(&e) => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

/// Datagram: each datagram is one message and gets one reply datagram.
fn reply_to_datagram(d: &DatagramRequest) -> io::Result<()> {
    let mut out = Vec::with_capacity(d.data().len() + 16);
    reply(&mut out, d.data())?;
    d.reply(&out).map(drop)
}

/// `Your msg=<message>` and a newline; the message's own line ending is dropped.
fn reply(out: &mut impl Write, message: &[u8]) -> io::Result<()> {
    let message = message.strip_suffix(b"\n").unwrap_or(message);
    let message = message.strip_suffix(b"\r").unwrap_or(message);
    out.write_all(b"Your msg=")?;
    out.write_all(message)?;
    out.write_all(b"\n")
}

/// A client hanging up mid-conversation is how conversations end, not an error to log.
fn client_left(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset | io::ErrorKind::UnexpectedEof
    )
}

fn main() -> ExitCode {
    let mut registry = Registry::with_builtins();
    registry.register_default::<MyHandler>("myhandler");
    socketd::cli::main_with(registry)
}

/// Run with `cargo test --example myhandler`.
#[cfg(test)]
mod tests {
    use super::*;
    use socketd::config::Config;
    use socketd::conn::{Conn, PeerAddr};
    use socketd::handler::serve;
    use std::io::BufReader;
    use std::net::Shutdown;
    use std::os::unix::net::UnixStream;
    use std::path::Path;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    /// A context for a made-up listener, read from config text like the daemon's own.
    fn context() -> Context {
        let mut registry = Registry::with_builtins();
        registry.register_default::<MyHandler>("myhandler");
        let text = "[[listener]]\nname = \"myhandler-test\"\nprotocol = \"unix\"\n\
                    address = \"test.sock\"\nhandler = \"myhandler\"\n";
        let config = Config::from_str(text, Path::new("test.toml"), &registry).expect("config");
        let listener = config.listeners.into_iter().next().expect("one listener");
        Context::new(Arc::new(listener), Arc::new(AtomicBool::new(false)))
    }

    #[test]
    fn answers_each_line_until_the_client_closes() {
        let (server, client) = UnixStream::pair().expect("socketpair");
        let peer = PeerAddr::Unix {
            path: None,
            cred: None,
        };
        let stream = StreamRequest::new(Conn::Unix(server), peer, None);
        let worker = std::thread::spawn(move || {
            serve(&mut MyHandler, &mut Request::Stream(stream), &context())
        });

        let mut replies = BufReader::new(&client);
        let mut line = String::new();
        for msg in ["hello", "world"] {
            (&client)
                .write_all(format!("{msg}\r\n").as_bytes())
                .expect("send");
            line.clear();
            replies.read_line(&mut line).expect("reply");
            assert_eq!(line, format!("Your msg={msg}\n"));
        }
        client.shutdown(Shutdown::Write).expect("half-close");
        worker.join().expect("worker").expect("handler");
    }
}
