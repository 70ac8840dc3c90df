//! `xtask bench-worker …`: the processes the benchmark starts inside its network namespaces
//! (proxy, server, load client). They run from the release build of xtask so that the hot
//! loops are optimised whatever profile `cargo xtask` itself was built with.
use std::{net::SocketAddr, time::Duration};

use anyhow::Result;
use clap::{Parser, Subcommand};

use super::{client, proxy, server};

#[derive(Parser)]
#[command(name = "xtask bench-worker", no_binary_name = true)]
struct WorkerCli {
    #[command(subcommand)]
    role: Role,
}

#[derive(Subcommand)]
enum Role {
    /// The transparent proxy (SO_ORIGINAL_DST, splice).
    Proxy {
        #[arg(long, default_value = "127.0.0.1:15001")]
        listen: SocketAddr,
        /// Where to forward connections that have no original destination (direct-to-proxy).
        #[arg(long)]
        fallback: Option<SocketAddr>,
        #[arg(long)]
        uid: Option<u32>,
        #[arg(long, default_value_t = 2)]
        threads: usize,
    },
    /// The destination server.
    Server {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long, default_value_t = 2)]
        threads: usize,
    },
    /// Connections per second (default), one checked exchange (--check) or one upload (--bulk).
    Client {
        #[arg(long)]
        dst: SocketAddr,
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
    },
}

pub fn main(args: Vec<String>) -> Result<()> {
    match WorkerCli::try_parse_from(args)?.role {
        Role::Proxy {
            listen,
            fallback,
            uid,
            threads,
        } => proxy::run(proxy::ProxyArgs {
            listen,
            fallback,
            uid,
            threads,
        }),
        Role::Server { listen, threads } => server::run(listen, threads),
        Role::Client {
            dst,
            threads,
            duration_ms,
            warmup_ms,
            check,
            bulk_bytes,
        } => {
            let out = if check {
                client::check(dst)
            } else if let Some(bytes) = bulk_bytes {
                client::bulk(dst, bytes)
            } else {
                client::load(
                    dst,
                    threads.max(1),
                    Duration::from_millis(warmup_ms),
                    Duration::from_millis(duration_ms),
                )
            };
            println!("{out}");
            Ok(())
        }
    }
}
