//! `redirect-bench worker …`: the processes the benchmark starts inside its network namespaces
//! (server, load client), and the agent's node-scale harness in a process of its own (so that
//! its RSS is the harness's, not the bench's); the proxy is redirect-testproxy.
use std::{
    io::{BufRead as _, Write as _},
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Result;
use clap::{Parser, Subcommand};
use redirect_agent::reconcile::scale::{self, ScaleConfig};
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
    /// The agent's node-scale harness (redirect_agent::reconcile::scale) against in-memory maps;
    /// prints its figures as one JSON line.
    Scale {
        #[arg(long)]
        shared_workloads: usize,
        #[arg(long)]
        mesh_cidrs: usize,
        #[arg(long)]
        own_workloads: usize,
        #[arg(long)]
        own_extra_cidrs: usize,
        #[arg(long)]
        edits: usize,
        #[arg(long)]
        max_rule_entries: usize,
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
        Role::Scale {
            shared_workloads,
            mesh_cidrs,
            own_workloads,
            own_extra_cidrs,
            edits,
            max_rule_entries,
        } => {
            let cfg = ScaleConfig {
                shared_workloads,
                mesh_cidrs,
                own_workloads,
                own_extra_cidrs,
                edits,
                max_rule_entries,
            };
            let r = scale::run(&cfg);
            let us = |d: Duration| d.as_micros() as u64;
            println!(
                "{}",
                json!({
                    "workloads": r.workloads,
                    "registered": r.registered,
                    "on_fallback": r.on_fallback,
                    "v4_entries": r.v4_entries,
                    "policy_sets": r.policy_sets,
                    "first_reconcile_us": us(r.first_reconcile),
                    "rss_kib": r.rss_bytes / 1024,
                    "peak_rss_kib": r.peak_rss_bytes / 1024,
                    "edit_p50_us": us(r.edit_p50),
                    "edit_p99_us": us(r.edit_p99),
                    "edit_recomputed": r.edit_recomputed,
                    "unchanged_pass_us": us(r.unchanged_pass),
                    "mesh_edit_us": us(r.mesh_edit),
                    "mesh_edit_on_fallback": r.mesh_edit_on_fallback,
                })
            );
            Ok(())
        }
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
