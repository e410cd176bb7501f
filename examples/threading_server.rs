//! The tutorial's `MyHandler` on a `ThreadingTCPServer`: the server runs `serve_forever` on a
//! thread of its own while the main thread is a client; then `shutdown()` stops it from the
//! main thread and `server_close()` releases the port. Runs to the end by itself:
//!
//! ```text
//! cargo run --example threading_server
//! ```

use std::io::{self, BufRead, BufReader, Write};
use std::net::TcpStream;
use std::thread;

use socketd::{Context, Handler, Request, TcpServer};

/// Answers every line with `Your msg=<line>`, until the client closes.
#[derive(Default)]
struct MyHandler;

impl Handler for MyHandler {
    fn handle(&mut self, req: &mut Request, _ctx: &Context) -> io::Result<()> {
        let Request::Stream(s) = req else {
            return Ok(());
        };
        let mut line = String::new();
        while s.rfile.read_line(&mut line)? > 0 {
            write!(s.wfile, "Your msg={line}")?;
            s.wfile.flush()?;
            line.clear();
        }
        Ok(())
    }
}

fn client(addr: std::net::SocketAddr, message: &str) -> io::Result<String> {
    let mut sock = TcpStream::connect(addr)?;
    writeln!(sock, "{message}")?;
    let mut answer = String::new();
    BufReader::new(sock).read_line(&mut answer)?;
    Ok(answer)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // server = ThreadingTCPServer(("127.0.0.1", 0), MyHandler)
    let mut server = TcpServer::bind("127.0.0.1:0", MyHandler::default)?.threading();
    let addr = server.server_address();
    let stop = server.shutdown_handle();

    // server_thread = threading.Thread(target=server.serve_forever); server_thread.start()
    let serving = thread::spawn(move || -> Result<(), socketd::Error> {
        server.serve_forever()?;
        server.server_close();
        Ok(())
    });

    for message in ["Hello World 1", "Hello World 2", "Hello World 3"] {
        print!("{}", client(addr, message)?);
    }

    // server.shutdown(); server.server_close() (done on the serving thread above)
    stop.shutdown();
    serving.join().map_err(|_| "the server thread panicked")??;
    drop(std::net::TcpListener::bind(addr)?); // the port can be bound again at once
    println!("stopped; {addr} is free again");
    Ok(())
}
