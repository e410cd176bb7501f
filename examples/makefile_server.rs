//! The tutorial's `StreamRequestHandler`: read a line from `rfile`, write it back upper-cased
//! to `wfile`, the way `makefile()` gives a socket a file's `readline` and `write`.
//!
//! ```text
//! cargo run --example makefile_server          # listens on 127.0.0.1:9999 (or the first argument)
//! printf 'hello world\n' | nc -N 127.0.0.1 9999    # HELLO WORLD
//! ```

use std::io::{self, BufRead, Write};

use socketd::{Context, Handler, Request, TcpServer};

#[derive(Default)]
struct Upper;

impl Handler for Upper {
    fn handle(&mut self, req: &mut Request, _ctx: &Context) -> io::Result<()> {
        let Request::Stream(s) = req else {
            return Ok(());
        };
        let mut line = String::new();
        s.rfile.read_line(&mut line)?; // self.data = self.rfile.readline().strip()
        let data = line.trim();
        println!("{} wrote: {data}", s.peer());
        writeln!(s.wfile, "{}", data.to_uppercase()) // self.wfile.write(self.data.upper())
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::args().nth(1).unwrap_or("127.0.0.1:9999".into());
    let mut server = TcpServer::bind(addr.as_str(), Upper::default)?;
    println!("listening on {}", server.server_address());
    server.serve_forever()?;
    server.server_close();
    Ok(())
}
