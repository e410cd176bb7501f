//! PLACEHOLDER: being written.
use std::io;
use super::{Context, Handler, Request};
#[derive(Debug, Default)]
pub struct Daytime;
impl Handler for Daytime {
    fn handle(&mut self, _req: &mut Request, _ctx: &Context) -> io::Result<()> { Ok(()) }
}
