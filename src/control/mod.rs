//! The control socket: a Unix stream socket (`[daemon] control`) through which `socketd
//! status`, `reload`, `stop`, `pause`, `resume`, `drain` and `reopen-logs` talk to a running
//! daemon.
//!
//! The protocol is one JSON object per line each way, versioned: a request is
//! `{"version":1,"command":"pause","listener":"echo"}`, the answer `{"version":1,"ok":true,…}`
//! or `{"version":1,"ok":false,"error":"…"}` (README, "Control socket", has the schema). A new
//! command is a new `Command` variant; a client that sends an unknown one gets an error that
//! lists the known ones.
//!
//! Nothing here runs on the daemon's loop: a thread accepts, and each client (at most
//! `MAX_CLIENTS` at once) gets its own thread that reads one bounded request within
//! `READ_DEADLINE`, hands the decoded command to the loop through a channel and the loop's
//! waker (`LoopLink`), and writes the answer. Garbage, half a request or silence costs that
//! thread an error line or a timeout, never the loop.

pub mod client;
pub mod proto;
mod socket;

pub use proto::{Command, Reply, Then};
pub use socket::{add_process, Ask, ControlSocket, LoopLink};
