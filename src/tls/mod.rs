//! TLS on stream listeners (rustls, `ring` provider) and to a proxy's upstream.
//!
//! - `load`: PEM files to rustls objects, and the checks `socketd check` makes on them.
//! - `front`: the per-process event-loop thread that does handshakes and relays TLS sessions.
//! - `info`: the negotiated parameters a handler, an exec program and the access log see.
//! - `client`: the upstream side for `proxy = { tls = {...} }`.
//!
//! A TLS listener's slot hands each admitted connection to the front (`slot::tls`); once the
//! handshake is done the front returns the plaintext end of a socketpair, which the slot
//! dispatches to its worker model like any accepted connection. Handshakes therefore never
//! hold a worker. This module knows no listener, handler or config type: `config` uses `load`
//! to check files, and everything above uses the front.

pub(crate) mod client;
pub(crate) mod front;
pub mod info;
pub(crate) mod load;

pub use info::TlsInfo;
