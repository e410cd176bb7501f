//! Running as a service: everything between "the config is valid" and "the loop is serving"
//! that depends on how the process was started, in the order `cli::run` applies it:
//! socket activation (`activation`, used while binding), privilege drop (`privileges`),
//! detaching with a pidfile (`detach`, `pidfile`), syslog output (`syslog`), and the
//! service manager's readiness protocol (`notify`), which the loop drives.

pub mod activation;
pub mod detach;
pub mod notify;
pub mod pidfile;
pub mod privileges;
