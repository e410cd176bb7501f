//! The tutorial's UDP server: each datagram is a request; it is printed and answered with
//! `已接收到数据 <data>` through the server's socket (socketserver's `(data, socket)` pair).
//!
//! ```text
//! cargo run --example udp_server                   # listens on 127.0.0.1:9999 (or the first argument)
//! printf 'hello' | nc -u -w1 127.0.0.1 9999        # 已接收到数据 hello
//! ```

use std::io;

use socketd::{Context, Handler, Request, UdpServer};

#[derive(Default)]
struct Received;

impl Handler for Received {
    fn handle(&mut self, req: &mut Request, _ctx: &Context) -> io::Result<()> {
        let Request::Datagram(d) = req else {
            return Ok(());
        };
        let data = String::from_utf8_lossy(d.data()).into_owned();
        println!("{} wrote: {data}", d.peer());
        d.reply(format!("已接收到数据 {data}").as_bytes()).map(drop)
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::args().nth(1).unwrap_or("127.0.0.1:9999".into());
    let mut server = UdpServer::bind(addr.as_str(), Received::default)?;
    println!("listening on {}", server.server_address());
    server.serve_forever()?;
    server.server_close();
    Ok(())
}
