//! `handle_error` for a library server: every handler the factory makes is wrapped, so an
//! error or a panic in `setup`, `handle` or `finish` reaches the hook where the handler ran (a
//! worker thread, or the request's child process), and then goes on to the loop as before (it
//! is logged and counted; the server keeps serving).

use std::io;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::{Arc, RwLock};

use crate::conn::PeerAddr;
use crate::handler::{Context, Handler, Request};

/// What went wrong in a handler, as `handle_error` is told.
#[derive(Debug)]
pub enum Failure<'a> {
    /// `setup`, `handle` or `finish` returned this error.
    Error(&'a io::Error),
    /// The handler panicked with this message.
    Panic(&'a str),
}

type ErrorHook = Arc<dyn Fn(&PeerAddr, &Failure<'_>) + Send + Sync>;

/// The hooks a server's handlers share (set before serving; read by every request).
#[derive(Default)]
pub(super) struct Hooks {
    error: RwLock<Option<ErrorHook>>,
}

impl Hooks {
    pub(super) fn set_error(&self, hook: ErrorHook) {
        if let Ok(mut h) = self.error.write() {
            *h = Some(hook);
        }
    }

    fn error(&self) -> Option<ErrorHook> {
        self.error.read().ok().and_then(|h| h.clone())
    }
}

/// A user's handler with the server's hooks around each step.
pub(super) struct Hooked<H> {
    inner: H,
    hooks: Arc<Hooks>,
}

impl<H: Handler> Hooked<H> {
    pub(super) fn new(inner: H, hooks: Arc<Hooks>) -> Hooked<H> {
        Hooked { inner, hooks }
    }

    /// Run one step; an error or panic goes to `handle_error` first, then on as it was.
    fn step(
        &mut self,
        req: &mut Request,
        ctx: &Context,
        f: impl FnOnce(&mut H, &mut Request, &Context) -> io::Result<()>,
    ) -> io::Result<()> {
        let Some(hook) = self.hooks.error() else {
            return f(&mut self.inner, req, ctx);
        };
        let peer = req.peer().clone();
        let inner = &mut self.inner;
        match catch_unwind(AssertUnwindSafe(|| f(inner, req, ctx))) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                hook(&peer, &Failure::Error(&e));
                Err(e)
            }
            Err(payload) => {
                let message = payload
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "non-string panic payload".to_string());
                hook(&peer, &Failure::Panic(&message));
                resume_unwind(payload)
            }
        }
    }
}

impl<H: Handler> Handler for Hooked<H> {
    fn setup(&mut self, req: &mut Request, ctx: &Context) -> io::Result<()> {
        self.step(req, ctx, |h, r, c| h.setup(r, c))
    }

    fn handle(&mut self, req: &mut Request, ctx: &Context) -> io::Result<()> {
        self.step(req, ctx, |h, r, c| h.handle(r, c))
    }

    fn finish(&mut self, req: &mut Request, ctx: &Context) -> io::Result<()> {
        self.step(req, ctx, |h, r, c| h.finish(r, c))
    }
}
