//! Generates what the Debian package ships beside the binary, from the same clap `Command` the
//! binary parses (`socketd::cli::command()`), so they can never disagree with it:
//!
//! - `OUT/man/socketd.1` (and `socketd-check.1`, one page per subcommand): man pages
//!   (clap_mangen), with exit status, signals, files and the systemd units added;
//! - `OUT/completions/socketd.bash`, `_socketd` (zsh), `socketd.fish`: shell completions
//!   (clap_complete).
//!
//! `packaging/build-deb` runs it before `cargo deb`:
//! `cargo run --example package_assets -- target/release/assets`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap_complete::Shell;

/// Sections the generated page lacks: what the README's reference says, in roff.
const EXTRA: &str = r#".SH "EXIT STATUS"
.TP
\fB0\fR
stopped cleanly (after any stop signal), or \fBcheck\fR found the config valid
.TP
\fB1\fR
the config file is invalid or unreadable
.TP
\fB2\fR
usage error: bad command-line arguments
.TP
\fB3\fR
could not start, e.g. a listener could not bind
.TP
\fB4\fR
failed while running
.SH SIGNALS
.TP
\fBSIGTERM\fR, \fBSIGINT\fR
Graceful stop: stop accepting, let connections in flight finish for \fBshutdown_timeout\fR, exit 0.
A second one, or \fBSIGQUIT\fR, stops at once.
.TP
\fBSIGHUP\fR
Reload the config file by its path. A file with errors is refused and the running config keeps
serving; listeners are matched by name, and kept ones keep their sockets.
.TP
\fBSIGUSR1\fR
Log a status report.
.SH FILES
.TP
\fI/etc/socketd/socketd.toml\fR
The config file (the default \fB\-\-config\fR). Its keys are documented in
\fI/usr/share/doc/socketd/examples/socketd.toml\fR.
.TP
\fI/run/socketd/\fR
The service's runtime directory: its unix sockets live here.
.TP
\fI/lib/systemd/system/socketd.service\fR, \fIsocketd.socket\fR
The systemd units. \fBsystemctl reload socketd\fR checks the file first and fails on errors
(the running config keeps serving); \fBsystemctl restart socketd\fR stops the service first, so
run \fBsocketd check\fR before it. \fBsocketd.socket\fR (socket activation) is optional.
.SH "SEE ALSO"
\fBsystemctl\fR(1), \fBjournalctl\fR(1), \fBsystemd.socket\fR(5),
\fI/usr/share/doc/socketd/README.md\fR
"#;

fn main() -> ExitCode {
    let Some(out) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: package_assets OUT_DIR");
        return ExitCode::from(2);
    };
    match generate(&out) {
        Ok(()) => {
            println!(
                "wrote {}/man and {}/completions",
                out.display(),
                out.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("package_assets: {e}");
            ExitCode::FAILURE
        }
    }
}

fn generate(out: &std::path::Path) -> std::io::Result<()> {
    let cmd = socketd::cli::command();
    let man = out.join("man");
    std::fs::create_dir_all(&man)?;
    // One page per subcommand (socketd-check.1, ...), then the main page with the extra sections.
    clap_mangen::generate_to(cmd.clone(), &man)?;
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut page)?;
    page.extend_from_slice(EXTRA.as_bytes());
    std::fs::write(man.join("socketd.1"), page)?;

    let completions = out.join("completions");
    std::fs::create_dir_all(&completions)?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut cmd.clone(), "socketd", &completions)?;
    }
    Ok(())
}
