//! The destination server. Two exchanges, told apart by the first byte the client sends:
//! - `R` + padding ([`REQUEST_LEN`] bytes): the server answers [`RESPONSE_LEN`] bytes naming the
//!   peer it saw, then closes first. Closing first (as an HTTP/1.0 server does) keeps TIME_WAIT
//!   on the listening side, so the client's ephemeral ports never run out at tens of thousands
//!   of connections per second.
//! - `B` + a stream until EOF: the server counts the bytes and answers the count (u64 LE).
use std::{io, net::SocketAddr, time::Duration};

use anyhow::{Context as _, Result};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

pub const REQUEST_LEN: usize = 64;
pub const RESPONSE_LEN: usize = 64;

pub fn run(listen: SocketAddr, threads: usize) -> Result<()> {
    let std_listener =
        std::net::TcpListener::bind(listen).with_context(|| format!("bind {listen}"))?;
    std_listener.set_nonblocking(true)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = TcpListener::from_std(std_listener)?;
        println!("listening {}", listener.local_addr()?);
        loop {
            match listener.accept().await {
                Ok((s, peer)) => {
                    tokio::spawn(async move {
                        if let Err(e) = serve(s, peer).await
                            && e.kind() != io::ErrorKind::ConnectionReset
                        {
                            eprintln!("bench server: {peer}: {e}");
                        }
                    });
                }
                Err(e) => {
                    eprintln!("bench server: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        }
    })
}

async fn serve(mut s: TcpStream, peer: SocketAddr) -> io::Result<()> {
    let mut head = [0u8; REQUEST_LEN];
    let mut got = 0;
    while got < REQUEST_LEN {
        let n = s.read(&mut head[got..]).await?;
        if n == 0 {
            return Ok(());
        }
        got += n;
        if head[0] == b'B' {
            return sink(s, (got - 1) as u64).await;
        }
    }
    let mut reply = format!("peer={peer}").into_bytes();
    reply.resize(RESPONSE_LEN, b' ');
    reply[RESPONSE_LEN - 1] = b'\n';
    s.write_all(&reply).await
    // Dropping `s` closes: the server's FIN comes first.
}

/// The bulk exchange: count until EOF, answer the count.
async fn sink(mut s: TcpStream, mut total: u64) -> io::Result<()> {
    let mut buf = vec![0u8; 1 << 18];
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    s.write_all(&total.to_le_bytes()).await
}
