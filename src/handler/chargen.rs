//! PLACEHOLDER: being written.
use std::io;
use super::{Context, Handler, Request};
#[derive(Debug, Default)]
pub struct Chargen;
impl Handler for Chargen {
    fn handle(&mut self, _req: &mut Request, _ctx: &Context) -> io::Result<()> { Ok(()) }
}
