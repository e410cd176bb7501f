//! The `socketd` binary: the built-in handlers and the shared command line.

use std::process::ExitCode;

fn main() -> ExitCode {
    socketd::cli::main_with(socketd::handler::Registry::with_builtins())
}
