//! `handler = "file"`: send one file to every connection with `sendfile(2)` (the seed's
//! `socket.sendfile`), then close. The file is opened per connection, so an edit or a
//! replacement is served to the next client; a file that is missing or unreadable then closes
//! that connection and logs why, and never stops the listener.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::Arc;

use super::{BuildContext, Context, Factory, Handler, Request};
use crate::config::SettingsError;

/// The `file` table as written: serde reads it, refusing unknown keys, one error per key.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileTable {
    /// The file to send; must be absolute.
    path: String,
}

/// `file = { path = "..." }`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSettings {
    /// An absolute path, opened at connection time.
    pub path: PathBuf,
}

impl FileSettings {
    /// Read the `file` table ([`FileTable`], through the same per-key reader registered
    /// handlers use); only stream listeners can be sent a file.
    pub(crate) fn from_build(ctx: &BuildContext) -> Result<FileSettings, String> {
        FileSettings::read(ctx).map_err(|e| e.to_string())
    }

    /// `from_build` with every problem on its key.
    pub(crate) fn read(ctx: &BuildContext) -> Result<FileSettings, SettingsError> {
        if ctx.protocol.is_datagram() {
            return Err(SettingsError::from(format!(
                "handler `file` serves stream listeners only (tcp, unix), not {}; \
                 use protocol = \"tcp\" or \"unix\"",
                ctx.protocol
            )));
        }
        let usage = "file = { path = \"/srv/motd.txt\" }";
        if ctx.settings.is_none() {
            return Err(SettingsError::from(format!(
                "handler `file` needs its settings: add {usage}"
            )));
        }
        let table: FileTable = super::read_settings("file", ctx.settings)?;
        let path = PathBuf::from(table.path);
        if !path.is_absolute() {
            return Err(SettingsError::at(
                "path",
                format!(
                    "file: path {:?} must be absolute (the daemon's working directory is not \
                     yours), e.g. {usage}",
                    path.display().to_string()
                ),
            ));
        }
        Ok(FileSettings { path })
    }

    /// Open the file for one connection, with the path in the error.
    pub fn open(&self) -> io::Result<(File, u64)> {
        let named =
            |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", self.path.display()));
        let f = File::open(&self.path).map_err(named)?;
        let meta = f.metadata().map_err(named)?;
        if !meta.is_file() {
            return Err(named(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file",
            )));
        }
        Ok((f, meta.len()))
    }
}

/// Builds the blocking `file` handler (threaded and forked workers).
pub fn build(ctx: &BuildContext) -> Result<Factory, SettingsError> {
    let settings = Arc::new(FileSettings::read(ctx)?);
    Ok(Arc::new(move || {
        Box::new(FileHandler(Arc::clone(&settings))) as Box<dyn Handler>
    }))
}

/// Sends the file with blocking `sendfile` calls.
struct FileHandler(Arc<FileSettings>);

impl Handler for FileHandler {
    fn handle(&mut self, req: &mut Request, ctx: &Context) -> io::Result<()> {
        let Request::Stream(s) = req else {
            return Ok(());
        };
        let (file, len) = match self.0.open() {
            Ok(f) => f,
            Err(e) => {
                log::warn!(
                    "listener `{}`: file: {e}; closing the connection",
                    ctx.listener_name()
                );
                return Ok(());
            }
        };
        let mut offset: libc::off_t = 0;
        let sock = s.conn().as_fd();
        while (offset as u64) < len {
            let want = (len - offset as u64).min(1 << 30) as usize;
            match nix::sys::sendfile::sendfile(sock, file.as_fd(), Some(&mut offset), want) {
                Ok(0) => break, // the file shrank under us: send what there was
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(io::Error::from(e)),
            }
        }
        Ok(())
    }
}
