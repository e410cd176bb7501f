//! Running as a service: everything between "the config is valid" and "the loop is serving"
//! that depends on how the process was started, in the order `cli::run` applies it:
//! socket activation (`activation`, used while binding), privilege drop (`privileges`),
//! detaching with a pidfile (`detach`, `pidfile`), syslog output (`syslog`), and the
//! service manager's readiness protocol (`notify`), which the loop drives. A binary upgrade
//! starts the new process (`upgrade`, the old side) and the new process takes over
//! (`handover`, its side).

pub mod activation;
pub mod detach;
pub mod handover;
pub mod notify;
pub mod pidfile;
pub mod privileges;
pub mod upgrade;
