//! [`Spawned`]: a long-running helper process whose output is collected in the background.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, ExitStatus};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

#[derive(Default)]
struct Output {
    stdout: Vec<String>,
    stderr: String,
    stdout_closed: bool,
}

type Shared = Arc<(Mutex<Output>, Condvar)>;

/// A child process (see [`crate::Fixture::spawn_logged`]) whose stdout lines and stderr are
/// collected by background threads. Killed and reaped on drop.
pub struct Spawned {
    child: Child,
    shared: Shared,
    readers: Vec<JoinHandle<()>>,
}

impl Spawned {
    /// Wraps a child; its stdout/stderr are collected if they were piped.
    pub fn new(mut child: Child) -> Spawned {
        let shared: Shared = Arc::default();
        let mut readers = Vec::new();
        if let Some(out) = child.stdout.take() {
            let sh = shared.clone();
            readers.push(thread::spawn(move || {
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    sh.0.lock().unwrap().stdout.push(line);
                    sh.1.notify_all();
                }
                sh.0.lock().unwrap().stdout_closed = true;
                sh.1.notify_all();
            }));
        } else {
            shared.0.lock().unwrap().stdout_closed = true;
        }
        if let Some(mut err) = child.stderr.take() {
            let sh = shared.clone();
            readers.push(thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = err.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    sh.0.lock()
                        .unwrap()
                        .stderr
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            }));
        }
        Spawned {
            child,
            shared,
            readers,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The underlying child, e.g. to send it signals or check `try_wait`.
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// All stdout lines seen so far.
    pub fn lines(&self) -> Vec<String> {
        self.shared.0.lock().unwrap().stdout.clone()
    }

    /// Everything written to stderr so far.
    pub fn stderr(&self) -> String {
        self.shared.0.lock().unwrap().stderr.clone()
    }

    /// Waits until a stdout line satisfies `pred` and returns it (lines seen before the call
    /// count too). Fails early if stdout closes, i.e. the process died, and includes its stderr.
    pub fn wait_for_line(&self, pred: impl Fn(&str) -> bool, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        let (lock, cv) = &*self.shared;
        let mut out = lock.lock().unwrap();
        loop {
            if let Some(l) = out.stdout.iter().find(|l| pred(l)) {
                return Ok(l.clone());
            }
            let now = Instant::now();
            if out.stdout_closed || now >= deadline {
                let why = if out.stdout_closed {
                    "process closed stdout"
                } else {
                    "timed out"
                };
                bail!(
                    "{why} waiting for a line from pid {}; stdout: {:?}; stderr: {}",
                    self.child.id(),
                    out.stdout,
                    out.stderr
                );
            }
            out = cv.wait_timeout(out, deadline - now).unwrap().0;
        }
    }

    /// [`Spawned::wait_for_line`] for a line starting with `prefix`, e.g. `"listening "`.
    pub fn wait_for_prefix(&self, prefix: &str, timeout: Duration) -> Result<String> {
        self.wait_for_line(|l| l.starts_with(prefix), timeout)
    }

    /// SIGKILLs and reaps the process.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        // kill() fails only if the process was already reaped, which wait() then reports.
        let _ = self.child.kill();
        self.child.wait().context("waiting for killed child")
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.kill();
        // The pipes close with the process (unless it left grandchildren holding them, which the
        // fixture kills), so the readers finish; detach rather than risk blocking in drop.
        self.readers.clear();
    }
}
