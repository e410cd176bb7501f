//! loadgen: the load generator for socketd's benchmark. Modes: `rr` (request/response on
//! long-lived connections), `cps` (connect-send-receive-close), `udp` (datagram
//! request/response, UDP or unix-dgram), `bulk` (one large stream, verified, half-closed),
//! `idle` (hold many connections open). Every run is bounded by `--duration` plus
//! `--io-timeout`, every byte is checked, and the result is one `key=value` line on stdout.
//!
//! ```text
//! loadgen --mode rr --target tcp:127.0.0.1:7007 --conns 64 --size 64 --duration 5s
//! loadgen --mode bulk --target unix:/tmp/p.sock --bytes 1G --duration 60s
//! ```
//! Exit status: 0 ok, 1 no operation succeeded or bad arguments, 2 a reply did not match.

mod hist;
mod modes;
mod mux;
mod target;

use modes::{Load, Outcome};
use std::process::ExitCode;
use std::time::{Duration, Instant};
use target::Target;

const USAGE: &str = "usage: loadgen --mode rr|cps|udp|bulk|idle --target tcp:IP:PORT|unix:PATH|udp:IP:PORT|unix-dgram:PATH
       [--conns N (16; bulk 1)] [--size BYTES (64)] [--duration 5s] [--io-timeout 2s] [--bytes 1G (bulk)]
       [--mux T (rr, cps: the connections on T epoll threads instead of one blocking thread each)]";

struct Args {
    mode: String,
    load: Load,
    conns: usize,
    duration: Duration,
    mux: usize,
}

fn duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.split_at(
        s.find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(s.len()),
    );
    let n: f64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" | "" => n,
        "m" => n * 60.0,
        _ => return Err(format!("bad duration unit in {s:?}: use ms, s or m")),
    };
    Ok(Duration::from_secs_f64(secs))
}

fn size(s: &str) -> Result<u64, String> {
    let (num, mult) = match s.as_bytes().last() {
        Some(b'K' | b'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some(b'M' | b'm') => (&s[..s.len() - 1], 1 << 20),
        Some(b'G' | b'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .map(|n| n * mult)
        .map_err(|_| format!("bad size {s:?}"))
}

fn parse() -> Result<Args, String> {
    let mut mode = None;
    let mut mux = 0usize;
    let mut target = None;
    let (mut conns, mut msg, mut dur, mut io, mut bytes) = (
        0usize,
        64u64,
        "5s".to_string(),
        "2s".to_string(),
        1u64 << 30,
    );
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().ok_or(format!("{flag} needs a value\n{USAGE}"));
        match flag.as_str() {
            "--mode" => mode = Some(val()?),
            "--target" => target = Some(Target::parse(&val()?)?),
            "--conns" => conns = val()?.parse().map_err(|_| "bad --conns".to_string())?,
            "--size" => msg = size(&val()?)?,
            "--duration" => dur = val()?,
            "--io-timeout" => io = val()?,
            "--bytes" => bytes = size(&val()?)?,
            "--mux" => mux = val()?.parse().map_err(|_| "bad --mux".to_string())?,
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    let mode = mode.ok_or(format!("--mode is required\n{USAGE}"))?;
    let target = target.ok_or(format!("--target is required\n{USAGE}"))?;
    if !matches!(mode.as_str(), "rr" | "cps" | "udp" | "bulk" | "idle") {
        return Err(format!("unknown mode {mode:?}\n{USAGE}"));
    }
    if (mode == "udp") != target.is_datagram() {
        return Err(
            "mode udp goes with udp: or unix-dgram: targets, the others with tcp: or unix:".into(),
        );
    }
    if conns == 0 {
        conns = if mode == "bulk" { 1 } else { 16 };
    }
    if msg == 0 {
        return Err("--size must be at least 1".into());
    }
    if mux > 0 && (!matches!(mode.as_str(), "rr" | "cps") || msg as usize > mux::MAX_SIZE) {
        return Err(format!(
            "--mux goes with --mode rr or cps and --size <= {}",
            mux::MAX_SIZE
        ));
    }
    let run_for = duration(&dur)?;
    let load = Load {
        target,
        size: msg as usize,
        deadline: Instant::now() + run_for,
        io_timeout: duration(&io)?,
        bytes,
    };
    Ok(Args {
        mode,
        load,
        conns,
        duration: run_for,
        mux,
    })
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("loadgen: {e}");
            return ExitCode::from(1);
        }
    };
    let started = Instant::now();
    let mut total = if args.mode == "idle" {
        modes::idle(&args.load, args.conns)
    } else {
        let run: fn(&Load, usize) -> Outcome = match args.mode.as_str() {
            "rr" => modes::request_response,
            "cps" => modes::connect_per_request,
            "udp" => modes::datagram,
            _ => modes::bulk,
        };
        type Job = Box<dyn FnOnce() -> Outcome + Send>;
        let jobs: Vec<Job> = if args.mux > 0 {
            let (t, n) = (args.mux.min(args.conns), args.conns);
            (0..t)
                .map(|i| {
                    let (first, end) = (i * n / t, (i + 1) * n / t);
                    let load = args.load.clone();
                    let run = if args.mode == "cps" {
                        mux::connect_per_request
                    } else {
                        mux::request_response
                    };
                    Box::new(move || run(&load, first, end - first)) as Job
                })
                .collect()
        } else {
            (0..args.conns)
                .map(|c| {
                    let load = args.load.clone();
                    Box::new(move || run(&load, c)) as Job
                })
                .collect()
        };
        let threads: Vec<_> = jobs
            .into_iter()
            .map(|job| {
                std::thread::Builder::new()
                    .stack_size(256 * 1024)
                    .spawn(job)
            })
            .collect();
        let mut total: Option<Outcome> = None;
        for t in threads {
            let o = match t {
                Ok(h) => match h.join() {
                    Ok(o) => o,
                    Err(_) => {
                        eprintln!("loadgen: a client thread panicked");
                        return ExitCode::from(1);
                    }
                },
                Err(e) => {
                    eprintln!("loadgen: cannot start a client thread: {e}");
                    return ExitCode::from(1);
                }
            };
            match total.as_mut() {
                Some(t) => t.merge(o),
                None => total = Some(o),
            }
        }
        match total {
            Some(t) => t,
            None => return ExitCode::from(1),
        }
    };
    let secs = started.elapsed().as_secs_f64().max(1e-9);
    let secs = if args.mode == "bulk" || args.mode == "idle" {
        secs
    } else {
        secs.min(args.duration.as_secs_f64().max(1e-9))
    };
    let _ = &mut total;
    println!(
        "mode={} conns={} size={} secs={:.3} ops={} ops_per_s={:.0} mib_per_s={:.1} p50_us={:.1} p99_us={:.1} errors={} lost={} corrupt={}",
        args.mode,
        args.conns,
        args.load.size,
        secs,
        total.ops,
        total.ops as f64 / secs,
        total.bytes as f64 / secs / (1u64 << 20) as f64,
        total.hist.quantile(0.5) as f64 / 1000.0,
        total.hist.quantile(0.99) as f64 / 1000.0,
        total.errors,
        total.lost,
        total.corrupt,
    );
    if let Some(e) = &total.first_error {
        eprintln!("loadgen: first error: {e}");
    }
    if total.corrupt > 0 {
        eprintln!("loadgen: a reply did not match what was sent");
        return ExitCode::from(2);
    }
    if total.ops == 0 || total.hist.total() == 0 {
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
}
