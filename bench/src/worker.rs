//! `redirect-bench worker …`: the processes the benchmark starts inside its network namespaces
//! (server, load client); the proxy is redirect-testproxy.
use std::{
    io::{BufRead as _, Write as _},
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Result;
use clap::{Parser, Subcommand};
use serde_json::{Value, json};

use super::{client, server};

#[derive(Parser)]
#[command(name = "redirect-bench worker", no_binary_name = true)]
struct WorkerCli {
    #[command(subcommand)]
    role: Role,
}

#[derive(Subcommand)]
enum Role {
    /// The destination server.
    Server {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long, default_value_t = 2)]
        threads: usize,
    },
    /// Connections per second (default), one checked exchange (--check) or one upload
    /// (--bulk-bytes); with --serve, one such job per line of stdin (the same options), one JSON
    /// line per job on stdout.
    Client {
        #[arg(long)]
        dst: SocketAddr,
        /// A cgroup's cpu.stat, to report CPU time per connection of that subtree.
        #[arg(long)]
        cpu_stat: Option<PathBuf>,
        #[arg(long)]
        serve: bool,
        #[command(flatten)]
        job: Job,
    },
}

#[derive(Parser)]
#[command(no_binary_name = true)]
struct Job {
    #[arg(long, default_value_t = 1)]
    threads: usize,
    #[arg(long, default_value_t = 2000)]
    duration_ms: u64,
    #[arg(long, default_value_t = 200)]
    warmup_ms: u64,
    #[arg(long)]
    check: bool,
    #[arg(long)]
    bulk_bytes: Option<u64>,
    /// Connect-rate probes (connect, reset) instead of exchanges.
    #[arg(long)]
    probe: bool,
}

impl Job {
    fn run(&self, dst: SocketAddr, cpu_stat: Option<&Path>) -> Value {
        if self.check {
            client::check(dst)
        } else if let Some(bytes) = self.bulk_bytes {
            client::bulk(dst, bytes)
        } else {
            client::load(
                dst,
                self.threads.max(1),
                Duration::from_millis(self.warmup_ms),
                Duration::from_millis(self.duration_ms),
                cpu_stat,
                self.probe,
            )
        }
    }
}

/// The persistent client: staying up between samples means no process start-up, so samples can
/// be short and the modes can alternate often.
fn serve(dst: SocketAddr, cpu_stat: Option<&Path>) -> Result<()> {
    let mut out = std::io::stdout().lock();
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let v = match Job::try_parse_from(line.split_whitespace()) {
            Ok(job) => job.run(dst, cpu_stat),
            Err(e) => json!({"ok": false, "error": e.to_string()}),
        };
        writeln!(out, "{v}")?;
        out.flush()?;
    }
    Ok(())
}

pub fn main(args: Vec<String>) -> Result<()> {
    match WorkerCli::try_parse_from(args)?.role {
        Role::Server { listen, threads } => server::run(listen, threads),
        Role::Client {
            dst,
            cpu_stat,
            serve: true,
            ..
        } => serve(dst, cpu_stat.as_deref()),
        Role::Client {
            dst, cpu_stat, job, ..
        } => {
            println!("{}", job.run(dst, cpu_stat.as_deref()));
            Ok(())
        }
    }
}
