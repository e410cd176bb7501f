//! `handler = "file"` under every worker model: the whole file is sent then the connection
//! closes; a missing file closes the connection, is logged, and the listener keeps serving.

use crate::harness::*;

fn config(workers: &str) -> String {
    format!(
        "[daemon]\nshutdown_timeout = \"2s\"\n[[listener]]\nname = \"f\"\nprotocol = \"tcp\"\n\
         address = \"127.0.0.1:0\"\nhandler = \"file\"\nworkers = \"{workers}\"\n\
         file = {{ path = \"{{dir}}/motd.bin\" }}\n"
    )
}

#[test]
fn file_is_sent_whole_then_missing_file_closes_and_logs() {
    for workers in ["threaded", "forked", "event"] {
        let mut d = Daemon::start(&config(workers));
        d.wait_ready();
        let path = d.dir().join("motd.bin");
        // Missing at connection time: closed without data, logged, and the daemon lives on.
        let mut s = d.connect("f");
        assert!(
            s.read_to_end_vec().is_empty(),
            "{workers}: data for a missing file"
        );
        d.wait_log("motd.bin", READY_TIMEOUT);
        // Present: 3 MiB arrive intact.
        let content: Vec<u8> = (0..3u32 << 20).map(|i| (i % 241) as u8).collect();
        std::fs::write(&path, &content).expect("write the file");
        let mut s = d.connect("f");
        let got = s.read_to_end_vec();
        assert!(
            got == content,
            "{workers}: got {} bytes, want {}",
            got.len(),
            content.len()
        );
        d.signal(libc::SIGTERM);
        assert_exit_code(d.wait_exit(STOP_BUDGET), 0, &d);
    }
}

#[test]
fn check_refuses_file_without_path_or_relative() {
    let (out, _f, _d) = check(
        "[[listener]]\nname = \"f\"\nprotocol = \"tcp\"\naddress = \"127.0.0.1:0\"\n\
         handler = \"file\"\nfile = { path = \"motd\" }\n",
    );
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    assert!(
        out.describe().contains("must be absolute"),
        "{}",
        out.describe()
    );
}
