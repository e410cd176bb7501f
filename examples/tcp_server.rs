//! The tutorial's plain TCP server, with the library: every chunk a client sends is answered
//! with `已接收到数据 <chunk>` ("data received"), until the client closes. One client at a time,
//! like socketserver's `TCPServer`.
//!
//! ```text
//! cargo run --example tcp_server               # listens on 127.0.0.1:9999 (or the first argument)
//! printf 'hello' | nc -N 127.0.0.1 9999        # 已接收到数据 hello
//! ```
//! Stop it with ^C: the library leaves signals alone, so the default action ends the process.

use std::io::{self, Read, Write};

use socketd::{Context, Handler, Request, TcpServer};

#[derive(Default)]
struct Received;

impl Handler for Received {
    fn handle(&mut self, req: &mut Request, _ctx: &Context) -> io::Result<()> {
        let Request::Stream(s) = req else {
            return Ok(());
        };
        let mut buf = [0u8; 1024];
        loop {
            let n = s.rfile.read(&mut buf)?;
            if n == 0 {
                return Ok(()); // the client closed
            }
            let data = String::from_utf8_lossy(&buf[..n]);
            write!(s.wfile, "已接收到数据 {data}")?;
            s.wfile.flush()?;
        }
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::args().nth(1).unwrap_or("127.0.0.1:9999".into());
    let mut server = TcpServer::bind(addr.as_str(), Received::default)?;
    println!("listening on {}", server.server_address());
    server.serve_forever()?;
    server.server_close();
    Ok(())
}
