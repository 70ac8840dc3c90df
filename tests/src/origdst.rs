//! Reading a redirected connection's original destination the way proxies do with netfilter:
//! getsockopt(SOL_IP, SO_ORIGINAL_DST) and getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST).

use std::io;
use std::mem;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, RawFd};

/// `SO_ORIGINAL_DST` (linux/netfilter_ipv4.h), level `SOL_IP`.
pub const SO_ORIGINAL_DST: libc::c_int = 80;
/// `IP6T_SO_ORIGINAL_DST` (linux/netfilter_ipv6/ip6_tables.h), level `SOL_IPV6`.
pub const IP6T_SO_ORIGINAL_DST: libc::c_int = 80;

fn getsockopt_buf<T>(fd: RawFd, level: libc::c_int, name: libc::c_int) -> io::Result<T> {
    // SAFETY: T is a plain C sockaddr struct, valid when zeroed; the kernel writes at most `len`.
    let mut val: T = unsafe { mem::zeroed() };
    let mut len = mem::size_of::<T>() as libc::socklen_t;
    let rc = unsafe { libc::getsockopt(fd, level, name, (&raw mut val).cast(), &mut len) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(val)
}

fn v4(fd: RawFd) -> io::Result<SocketAddr> {
    let sa: libc::sockaddr_in = getsockopt_buf(fd, libc::SOL_IP, SO_ORIGINAL_DST)?;
    if sa.sin_family != libc::AF_INET as libc::sa_family_t {
        return Err(io::Error::other(
            "SO_ORIGINAL_DST returned a non-AF_INET address",
        ));
    }
    Ok(SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr)),
        u16::from_be(sa.sin_port),
    )))
}

fn v6(fd: RawFd) -> io::Result<SocketAddr> {
    let sa: libc::sockaddr_in6 = getsockopt_buf(fd, libc::SOL_IPV6, IP6T_SO_ORIGINAL_DST)?;
    if sa.sin6_family != libc::AF_INET6 as libc::sa_family_t {
        return Err(io::Error::other(
            "IP6T_SO_ORIGINAL_DST returned a non-AF_INET6 address",
        ));
    }
    Ok(SocketAddr::V6(SocketAddrV6::new(
        Ipv6Addr::from(sa.sin6_addr.s6_addr),
        u16::from_be(sa.sin6_port),
        sa.sin6_flowinfo,
        sa.sin6_scope_id,
    )))
}

/// The original destination of an accepted connection. On an AF_INET6 socket the IPv6 option is
/// tried first, then the IPv4 one (a dual-stack socket may carry an IPv4 connection); an AF_INET
/// socket only has the IPv4 option. Without a redirect the kernel answers ENOENT.
pub fn original_dst(sock: &impl AsRawFd) -> io::Result<SocketAddr> {
    let fd = sock.as_raw_fd();
    // SAFETY: sockaddr_storage is valid when zeroed and large enough for any family.
    let mut ss: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let mut len = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    if unsafe { libc::getsockname(fd, (&raw mut ss).cast(), &mut len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if ss.ss_family == libc::AF_INET6 as libc::sa_family_t {
        v6(fd).or_else(|e6| v4(fd).map_err(|_| e6))
    } else {
        v4(fd)
    }
}
