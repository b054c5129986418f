//! Binding a listener the same way in every role (the CA, the proxy, the
//! webhook): the fixed startup line `listening <name> <addr>` (DESIGN.md),
//! and `[::]` meaning every address of the host, IPv4 included, on every
//! host.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::net::TcpListener;

/// Connections waiting to be accepted (as tokio's own `bind`).
const BACKLOG: i32 = 1024;

/// Binds `addr` and prints `listening <name> <addr>`, with the port the
/// kernel picked for port 0.
///
/// `[::]` binds one dual-stack socket (`IPV6_V6ONLY` off, whatever the
/// host's `net.ipv6.bindv6only`): IPv4 callers arrive as `::ffff:a.b.c.d`
/// (see [`canonical`]), so it serves IPv4-only, dual-stack and IPv6-only
/// clusters alike. On a host whose kernel has no IPv6 at all, `[::]` falls
/// back to `0.0.0.0` on the same port, so one manifest fits every node.
pub async fn bind(name: &str, addr: SocketAddr) -> std::io::Result<TcpListener> {
    let listener = if addr.ip() == IpAddr::V6(Ipv6Addr::UNSPECIFIED) {
        match dual_stack(addr) {
            Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
                tracing::info!(listener = name, error = %e, "no IPv6 on this host: listening on IPv4 only");
                TcpListener::bind((Ipv4Addr::UNSPECIFIED, addr.port())).await?
            }
            r => r?,
        }
    } else {
        TcpListener::bind(addr).await?
    };
    println!("listening {name} {}", listener.local_addr()?);
    Ok(listener)
}

/// An IPv6 listener on `addr` that takes IPv4 callers too.
fn dual_stack(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP))?;
    socket.set_only_v6(false)?;
    // As tokio's `bind`: a restarted process gets its port back at once.
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// A caller's address as it is: an IPv4 caller of a dual-stack listener
/// is `a.b.c.d`, not `::ffff:a.b.c.d`, in logs and in anything keyed by it.
pub fn canonical(peer: SocketAddr) -> SocketAddr {
    SocketAddr::new(peer.ip().to_canonical(), peer.port())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn the_unspecified_ipv6_address_takes_ipv4_and_ipv6_callers() {
        let l = bind("t", "[::]:0".parse().unwrap()).await.unwrap();
        let port = l.local_addr().unwrap().port();
        // IPv4 callers always; IPv6 ones where the host has `::1` (a
        // container may have IPv6 turned off).
        let has_ipv6 = std::net::TcpListener::bind("[::1]:0").is_ok();
        let callers: &[&str] = if has_ipv6 {
            &["127.0.0.1", "::1"]
        } else {
            &["127.0.0.1"]
        };
        for ip in callers {
            let ip: IpAddr = ip.parse().unwrap();
            let (c, s) = tokio::join!(tokio::net::TcpStream::connect((ip, port)), l.accept());
            let local = c.unwrap().local_addr().unwrap();
            let (_, peer) = s.unwrap();
            assert_eq!(canonical(peer), local, "a {ip} caller is seen as itself");
        }
    }
}
