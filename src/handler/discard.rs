//! PLACEHOLDER: being written.
use std::io;
use super::{Context, Handler, Request};
#[derive(Debug, Default)]
pub struct Discard;
impl Handler for Discard {
    fn handle(&mut self, _req: &mut Request, _ctx: &Context) -> io::Result<()> { Ok(()) }
}
