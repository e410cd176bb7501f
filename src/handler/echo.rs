//! PLACEHOLDER: being written.
use std::io;
use super::{Context, Handler, Request};
#[derive(Debug, Default)]
pub struct Echo;
impl Handler for Echo {
    fn handle(&mut self, _req: &mut Request, _ctx: &Context) -> io::Result<()> { Ok(()) }
}
