//! Unix socket files with their `mode`, `owner` and `group` in place before anyone can connect.
//!
//! bind(2) creates the file with the umask's permissions, and changing them afterwards leaves
//! a window in which anyone may connect. So when any of the three is set, the socket is bound
//! inside a fresh private directory (mode 0700, next to the final path, so on the same
//! filesystem), given its mode and ownership there, and renamed into place; the directory is
//! removed. Nobody but socketd can reach the socket until it appears at its real path with its
//! final permissions. Without those keys the socket is bound directly, as before.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::config::{resolve_group, resolve_user, SocketFile};

/// sun_path holds 108 bytes including the terminating NUL.
const MAX_UNIX_PATH: usize = 107;

/// Bind at `path` with `bind` (UnixListener::bind or UnixDatagram::bind) and apply `file`.
pub fn bind<S>(
    path: &Path,
    file: &SocketFile,
    bind: impl Fn(&Path) -> io::Result<S>,
) -> io::Result<S> {
    if file.mode.is_none() && file.owner.is_none() && file.group.is_none() {
        return bind(path);
    }
    let (uid, gid) = ids(file)?;
    let private = private_dir(path)?;
    let temp = private.join("s");
    let result = bind(&temp).and_then(|socket| {
        if let Some(mode) = file.mode {
            fs::set_permissions(&temp, fs::Permissions::from_mode(mode))?;
        }
        if uid.is_some() || gid.is_some() {
            std::os::unix::fs::chown(&temp, uid, gid)?;
        }
        fs::rename(&temp, path)?;
        Ok(socket)
    });
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    if let Err(e) = fs::remove_dir(&private) {
        log::warn!(
            "cannot remove the temporary directory {}: {e}",
            private.display()
        );
    }
    result
}

/// Give an existing socket file (one socketd bound and still serves, on reload) the mode and
/// ownership `file` asks for; unset keys leave the file as it is.
pub fn apply(path: &Path, file: &SocketFile) -> io::Result<()> {
    if let Some(mode) = file.mode {
        fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    }
    let (uid, gid) = ids(file)?;
    if uid.is_some() || gid.is_some() {
        std::os::unix::fs::chown(path, uid, gid)?;
    }
    Ok(())
}

/// The uid and gid that `owner` and `group` name, if set.
fn ids(file: &SocketFile) -> io::Result<(Option<u32>, Option<u32>)> {
    let uid = file.owner.as_deref().map(resolve_user).transpose();
    let gid = file.group.as_deref().map(resolve_group).transpose();
    Ok((uid.map_err(other)?, gid.map_err(other)?))
}

/// A new directory only socketd can enter, beside `path`.
fn private_dir(path: &Path) -> io::Result<PathBuf> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let dir = parent.join(format!(
        ".socketd-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let temp_len = dir.join("s").as_os_str().len();
    if temp_len > MAX_UNIX_PATH {
        return Err(other(format!(
            "setting mode/owner/group binds first at a temporary path {temp_len} bytes long, over \
             the {MAX_UNIX_PATH}-byte limit; use a shorter socket path"
        )));
    }
    fs::DirBuilder::new().mode(0o700).create(&dir)?;
    Ok(dir)
}

fn other(message: String) -> io::Error {
    io::Error::other(message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    use std::os::unix::net::{UnixDatagram, UnixListener};

    #[test]
    fn mode_is_applied_and_no_temporary_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let file = SocketFile {
            mode: Some(0o640),
            owner: None,
            group: None,
        };
        let _l = bind(&path, &file, |p: &Path| UnixListener::bind(p)).unwrap();
        let meta = fs::metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.mode() & 0o7777, 0o640);
        let left: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("s.sock")]);
    }

    #[test]
    fn ownership_by_number_and_datagram_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.sock");
        let me = nix::unistd::getuid().as_raw().to_string();
        let gid = nix::unistd::getgid().as_raw().to_string();
        let file = SocketFile {
            mode: Some(0o600),
            owner: Some(me.clone()),
            group: Some(gid.clone()),
        };
        let _d = bind(&path, &file, |p: &Path| UnixDatagram::bind(p)).unwrap();
        let meta = fs::metadata(&path).unwrap();
        assert_eq!((meta.uid().to_string(), meta.gid().to_string()), (me, gid));
        assert_eq!(meta.mode() & 0o7777, 0o600);
    }

    #[test]
    fn a_failed_bind_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.sock");
        let file = SocketFile {
            mode: Some(0o600),
            owner: None,
            group: None,
        };
        let e = bind(&path, &file, |_: &Path| -> io::Result<()> {
            Err(io::Error::other("no"))
        })
        .unwrap_err();
        assert_eq!(e.to_string(), "no");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
