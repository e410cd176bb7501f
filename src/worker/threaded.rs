//! A bounded thread pool per listener (socketserver's ThreadingMixIn without the unbounded
//! thread count).
//!
//! Threads are started on demand up to the listener's `max_workers` and leave after sitting
//! idle, so an unused listener costs no threads. The loop never hands a pool more jobs than it
//! has workers, so the queue holds at most `max_workers` entries. A panic in a job is caught by
//! the job itself; the counters here are RAII so a thread that dies still gives its slot back.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// How long an idle worker thread waits for a job before it exits.
const IDLE_EXIT: Duration = Duration::from_secs(30);

type Job = Box<dyn FnOnce() + Send + 'static>;

#[derive(Default)]
struct State {
    jobs: VecDeque<Job>,
    threads: usize,
    idle: usize,
    closed: bool,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    name: String,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A job never runs under this lock, so poisoning can only come from a bug here;
        // keep serving rather than cascade the panic.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Worker threads for one listener.
pub struct Pool {
    shared: Arc<Shared>,
    max: usize,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.shared.lock();
        f.debug_struct("Pool")
            .field("name", &self.shared.name)
            .field("threads", &s.threads)
            .field("idle", &s.idle)
            .field("max", &self.max)
            .finish()
    }
}

impl Pool {
    /// A pool named after its listener (thread names show in `top -H` and panics).
    pub fn new(name: &str, max: usize) -> Pool {
        Pool {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                wake: Condvar::new(),
                name: format!("socketd:{name}"),
            }),
            max: max.max(1),
        }
    }

    /// Change the thread cap (reload); running jobs are not disturbed.
    pub fn set_max(&mut self, max: usize) {
        self.max = max.max(1);
    }

    /// Threads currently alive (busy or idle).
    pub fn threads(&self) -> usize {
        self.shared.lock().threads
    }

    /// Run `job` on a worker thread. The caller guarantees it keeps at most `max` jobs in
    /// flight; if a thread cannot be started the job runs once one is free.
    pub fn execute<F: FnOnce() + Send + 'static>(&self, job: F) -> std::io::Result<()> {
        let mut s = self.shared.lock();
        s.jobs.push_back(Box::new(job));
        if s.idle >= s.jobs.len() {
            drop(s);
            self.shared.wake.notify_one();
            return Ok(());
        }
        if s.threads < self.max {
            s.threads += 1;
            drop(s);
            let shared = Arc::clone(&self.shared);
            let spawned = std::thread::Builder::new()
                .name(self.shared.name.clone())
                .spawn(move || work(shared));
            if let Err(e) = spawned {
                let mut s = self.shared.lock();
                s.threads -= 1;
                if s.threads == 0 {
                    s.jobs.pop_back();
                    return Err(e);
                }
            }
        }
        Ok(())
    }
}

impl Drop for Pool {
    /// Idle threads leave at once; busy ones finish their job first.
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.wake.notify_all();
    }
}

/// Gives the thread's slot back however the thread ends.
struct ThreadSlot(Arc<Shared>);

impl Drop for ThreadSlot {
    fn drop(&mut self) {
        self.0.lock().threads -= 1;
    }
}

fn work(shared: Arc<Shared>) {
    let _slot = ThreadSlot(Arc::clone(&shared));
    loop {
        let job = {
            let mut s = shared.lock();
            loop {
                if let Some(job) = s.jobs.pop_front() {
                    break Some(job);
                }
                if s.closed {
                    break None;
                }
                s.idle += 1;
                let (guard, timeout) = shared
                    .wake
                    .wait_timeout(s, IDLE_EXIT)
                    .unwrap_or_else(|p| p.into_inner());
                s = guard;
                s.idle -= 1;
                if timeout.timed_out() && s.jobs.is_empty() {
                    break None;
                }
            }
        };
        match job {
            Some(job) => job(),
            None => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;

    #[test]
    fn runs_jobs_and_caps_threads() {
        let pool = Pool::new("t", 3);
        let (tx, rx) = mpsc::channel();
        let running = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        for _ in 0..3 {
            let (tx, running, peak) = (tx.clone(), running.clone(), peak.clone());
            pool.execute(move || {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(50));
                running.fetch_sub(1, Ordering::SeqCst);
                tx.send(()).unwrap();
            })
            .unwrap();
        }
        for _ in 0..3 {
            rx.recv_timeout(Duration::from_secs(5)).unwrap();
        }
        assert!(pool.threads() <= 3);
        assert_eq!(peak.load(Ordering::SeqCst), 3, "three jobs ran at once");
    }

    #[test]
    fn panicking_thread_gives_its_slot_back() {
        let pool = Pool::new("p", 1);
        pool.execute(|| panic!("boom")).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while pool.threads() != 0 {
            assert!(std::time::Instant::now() < deadline, "slot not returned");
            std::thread::sleep(Duration::from_millis(5));
        }
        let (tx, rx) = mpsc::channel();
        pool.execute(move || tx.send(7).unwrap()).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), 7);
    }
}
