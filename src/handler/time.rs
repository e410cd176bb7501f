//! PLACEHOLDER: being written.
use std::io;
use super::{Context, Handler, Request};
#[derive(Debug, Default)]
pub struct Time;
impl Handler for Time {
    fn handle(&mut self, _req: &mut Request, _ctx: &Context) -> io::Result<()> { Ok(()) }
}
