//! Connection setup: the server's (or proxy's) name looked up and each
//! address tried with a non-blocking connect, waited on in ticks.

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use super::super::budget::{Budget, is_stop};
use super::super::resolve;
use super::socket::check;

pub(super) fn connect(
    host: &str,
    port: u16,
    budget: &Budget,
    tick: Duration,
    idle: &mut dyn FnMut(),
) -> io::Result<TcpStream> {
    let addrs = resolve::resolve(host, port, budget, tick, idle)?;
    let mut last = io::Error::new(io::ErrorKind::NotFound, format!("{host} resolves to no address"));
    for addr in addrs {
        match connect_addr(&addr, budget, tick, idle) {
            Ok(s) => return Ok(s),
            Err(e) if is_stop(&e) => return Err(e),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Connects without blocking, waiting in ticks (the caller's idle work,
/// the stop and the call's deadline looked at between them) until the
/// connection is up or `budget.timeout` passes.
#[allow(clippy::cast_possible_truncation)] // address families (2, 10) and sockaddr sizes (16, 28 bytes) fit their C types
fn connect_addr(addr: &SocketAddr, budget: &Budget, tick: Duration, idle: &mut dyn FnMut()) -> io::Result<TcpStream> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: sockaddr_storage is plain data; all zeroes is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr { s6_addr: a.ip().octets() },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    let family = if addr.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    // SAFETY: plain socket(2); the descriptor is owned right away.
    let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: socket(2) just returned this descriptor, owned by no one else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: storage holds a sockaddr of `len` bytes.
    let r = unsafe { libc::connect(fd, (&storage as *const libc::sockaddr_storage).cast(), len as libc::socklen_t) };
    if r != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(e);
        }
        let started = Instant::now();
        loop {
            idle();
            check(budget, &format!("connecting to {addr}"))?;
            let mut pfd = libc::pollfd { fd: sock.as_raw_fd(), events: libc::POLLOUT, revents: 0 };
            let wait = i32::try_from(budget.tick(tick).as_millis().max(1)).unwrap_or(i32::MAX);
            // SAFETY: one valid pollfd.
            let n = unsafe { libc::poll(&mut pfd, 1, wait) };
            if n > 0 {
                let mut err: libc::c_int = 0;
                let mut err_len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
                // SAFETY: SO_ERROR into an int of the stated size.
                let r = unsafe {
                    libc::getsockopt(
                        sock.as_raw_fd(),
                        libc::SOL_SOCKET,
                        libc::SO_ERROR,
                        (&mut err as *mut libc::c_int).cast(),
                        &mut err_len,
                    )
                };
                if r != 0 {
                    return Err(io::Error::last_os_error());
                }
                if err != 0 {
                    return Err(io::Error::from_raw_os_error(err));
                }
                break;
            }
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            if started.elapsed() >= budget.timeout {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("connecting to {addr}: no answer within {}", crate::human::duration(budget.timeout)),
                ));
            }
        }
    }
    let tcp = TcpStream::from(sock);
    // Back to blocking: the socket timeouts set for each call bound it.
    tcp.set_nonblocking(false)?;
    Ok(tcp)
}
