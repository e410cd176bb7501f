//! The variables the old process of an upgrade sets for the new one, besides systemd's
//! `LISTEN_FDS`, `LISTEN_PID` and `LISTEN_FDNAMES`: descriptor numbers, the old pid, and what
//! each handed-over socket is (a file socketd made, a socket from the manager, its path).

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The readiness pipe's write end in the new process (`ok` / `exit CODE why`).
pub const ENV_READY_FD: &str = "SOCKETD_UPGRADE_READY_FD";
/// The real stderr, for the new process to put back once its start-up output is read.
pub const ENV_STDERR_FD: &str = "SOCKETD_UPGRADE_STDERR_FD";
/// The old process's pid (the new one's parent), for logs and the pidfile hand-over.
pub const ENV_FROM: &str = "SOCKETD_UPGRADE_FROM";
/// Names (`:`-separated, as `LISTEN_FDNAMES`) of unix listeners whose socket file socketd
/// created: the new process removes those files when it stops for good, as the old would have.
pub const ENV_OWNED: &str = "SOCKETD_UPGRADE_OWNED";
/// Names of sockets the old process had from the service manager (socket activation or the
/// fd store): bound where the unit says, so adopted by name whatever their address.
pub const ENV_MANAGER: &str = "SOCKETD_UPGRADE_MANAGER";

/// Where each handed-over unix socket lives (`name=HEX(path)`, `:`-separated): a socket bound
/// with a mode or owner was bound elsewhere and renamed into place, so its own address
/// (getsockname) is not its path.
pub const ENV_PATHS: &str = "SOCKETD_UPGRADE_PATHS";

/// Names of listeners paused (`socketd pause`) in the old process: they stay paused.
pub const ENV_PAUSED: &str = "SOCKETD_UPGRADE_PAUSED";

/// `ENV_PATHS`'s value for `paths`.
pub fn encode_paths<'a>(paths: impl Iterator<Item = (&'a str, &'a Path)>) -> String {
    let hex: Vec<String> = paths
        .map(|(name, path)| {
            let h: String = path
                .as_os_str()
                .as_bytes()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            format!("{name}={h}")
        })
        .collect();
    hex.join(":")
}

/// `ENV_PATHS`'s value read back; malformed entries are skipped.
pub fn decode_paths(text: &str) -> Vec<(String, PathBuf)> {
    text.split(':')
        .filter_map(|entry| {
            let (name, hex) = entry.split_once('=')?;
            let bytes: Option<Vec<u8>> = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
                .collect();
            let path = PathBuf::from(OsStr::from_bytes(&bytes?));
            Some((name.to_string(), path))
        })
        .collect()
}

/// The pidfile's descriptor: the new process writes its pid into the same locked file.
pub const ENV_PIDFILE_FD: &str = "SOCKETD_UPGRADE_PIDFILE_FD";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_paths_survive_the_environment() {
        let paths = [
            ("a", Path::new("/run/socketd/echo.sock")),
            ("b", Path::new("/tmp/odd:name=x\n.sock")),
        ];
        let text = encode_paths(paths.iter().copied());
        assert!(
            !text.contains('\n') && text.matches(':').count() == 1,
            "{text}"
        );
        let back = decode_paths(&text);
        assert_eq!(back.len(), 2);
        for ((name, path), (n, p)) in paths.iter().zip(&back) {
            assert_eq!((*name, *path), (n.as_str(), p.as_path()));
        }
        assert!(decode_paths("").is_empty());
        assert!(decode_paths("x=zz").is_empty());
    }
}
