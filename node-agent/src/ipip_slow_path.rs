//! The IP-in-IP slow path, for a kernel without an ipip device (this
//! project's test kernel has none).
//!
//! Outer DF is never set, so a tunnel peer's packet may be fragmented on
//! the way, and a packet too big for the underlay without DF must be sent
//! fragmented. With no ipip device the kernel can do neither for IP-in-IP
//! by itself; this module lends it a hand, carrying bytes only (checks,
//! decapsulation and counting stay in the data path):
//!
//! - receive: the decap programs pass outer fragments to the stack, which
//!   reassembles them but has no IP-in-IP handler. A raw `IPPROTO_IPIP`
//!   socket still gets each whole datagram; it is written, behind an
//!   Ethernet header, into the tap [`IPIP_TAP`], whose TC ingress program
//!   (`weft_slowpath_ipip_tc`) applies the fast path's checks,
//!   decapsulates, and re-injects the inner packet into `--iface`'s ingress;
//! - send: the encap program redirects a too-big packet without DF,
//!   already encapsulated, to the tap; it is read here and its inner packet
//!   sent through the raw socket to the outer destination, so the kernel
//!   builds the outer header again (DF clear, source the PublicIP the
//!   socket is bound to) and fragments it.
//!
//! The tap lives as long as the agent: while the agent is stopped, both
//! fall back to what happens without a slow path (lost, `drop_too_big`).

use std::{
    fs::File,
    io,
    net::Ipv4Addr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

use tokio::io::unix::AsyncFd;

/// Name of the tap device between the data path and this module.
pub const IPIP_TAP: &str = "weft.ipip";
const _: () = assert!(IPIP_TAP.len() < libc::IFNAMSIZ);

/// IPPROTO_IPIP, the protocol of the raw socket.
const IPPROTO_IPIP: u8 = 4;
/// The largest IPv4 datagram.
const MAX_DATAGRAM: usize = 65_535;
const ETH_HLEN: usize = 14;
const ETH_P_IP: [u8; 2] = [0x08, 0x00];

#[derive(Debug, thiserror::Error)]
pub enum IpipSlowPathError {
    #[error("cannot open /dev/net/tun: {0}")]
    Tun(#[source] io::Error),
    #[error("cannot create the tap device {IPIP_TAP:?}: {0}")]
    Tap(#[source] io::Error),
    #[error("cannot set up a raw IP-in-IP socket on {public_ip}: {source}")]
    Socket {
        public_ip: Ipv4Addr,
        source: io::Error,
    },
}

/// The raw socket and the tap, ready to carry datagrams.
pub struct IpipSlowPath {
    raw: AsyncFd<OwnedFd>,
    tap: AsyncFd<File>,
    public_ip: Ipv4Addr,
    /// The Ethernet header put in front of each received datagram: to and
    /// from `--iface`'s MAC (the program rewrites the destination anyway).
    l2: [u8; ETH_HLEN],
}

impl IpipSlowPath {
    /// Creates the tap (down; the caller brings it up over netlink once
    /// the program is attached) and the raw socket, bound to `public_ip`.
    /// Must run inside a tokio runtime.
    pub fn open(public_ip: Ipv4Addr, iface_mac: [u8; 6]) -> Result<Self, IpipSlowPathError> {
        let tap = open_tap(IPIP_TAP)?;
        set_nonblocking(&tap).map_err(IpipSlowPathError::Tap)?;
        // SAFETY: the AsyncFd owns the file, so the fd stays open for as
        // long as it is registered.
        let tap =
            unsafe { AsyncFd::register(tap) }.map_err(|e| IpipSlowPathError::Tap(e.into()))?;
        let socket_err = |source| IpipSlowPathError::Socket { public_ip, source };
        let raw = raw_socket(public_ip).map_err(socket_err)?;
        // SAFETY: as above, for the socket.
        let raw = unsafe { AsyncFd::register(raw) }.map_err(|e| socket_err(e.into()))?;
        let mut l2 = [0u8; ETH_HLEN];
        l2[..6].copy_from_slice(&iface_mac);
        l2[6..12].copy_from_slice(&iface_mac);
        l2[12..].copy_from_slice(&ETH_P_IP);
        Ok(Self {
            raw,
            tap,
            public_ip,
            l2,
        })
    }

    /// Carries datagrams both ways until the socket or the tap fails.
    pub async fn run(self) -> io::Error {
        let mut rx = vec![0u8; ETH_HLEN + MAX_DATAGRAM];
        rx[..ETH_HLEN].copy_from_slice(&self.l2);
        let mut tx = vec![0u8; ETH_HLEN + MAX_DATAGRAM];
        let mut rx_failing = Failing::new("writing reassembled IP-in-IP into the tap");
        let mut tx_failing = Failing::new("sending too-big IP-in-IP through the raw socket");
        loop {
            tokio::select! {
                ready = self.raw.readable() => {
                    let mut guard = match ready {
                        Ok(g) => g,
                        Err(e) => return e,
                    };
                    let n = match guard.try_io(|fd| read_into(fd.get_ref().as_raw_fd(), &mut rx[ETH_HLEN..])) {
                        Ok(Ok(n)) => n,
                        Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Ok(Err(e)) => return e,
                        Err(_would_block) => continue,
                    };
                    let fd = self.tap.get_ref().as_raw_fd();
                    rx_failing.record(write_all(fd, &rx[..ETH_HLEN + n]));
                }
                ready = self.tap.readable() => {
                    let mut guard = match ready {
                        Ok(g) => g,
                        Err(e) => return e,
                    };
                    let n = match guard.try_io(|f| read_into(f.get_ref().as_raw_fd(), &mut tx)) {
                        Ok(Ok(n)) => n,
                        Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Ok(Err(e)) => return e,
                        Err(_would_block) => continue,
                    };
                    // Anything else the tap transmits (the stack's own
                    // traffic on it) is not ours to send.
                    if let Some((dst, inner)) = outgoing(&tx[..n], self.public_ip) {
                        let fd = self.raw.get_ref().as_raw_fd();
                        tx_failing.record(send_to(fd, inner, dst));
                    }
                }
            }
        }
    }
}

/// The outer destination and the inner packet of a frame the encap program
/// redirected to the tap: Ethernet, then IPv4 from `public_ip` carrying
/// IP-in-IP, whole (no fragment), its length what the header says. `None`
/// for anything else.
pub fn outgoing(frame: &[u8], public_ip: Ipv4Addr) -> Option<(Ipv4Addr, &[u8])> {
    let ip = frame.get(ETH_HLEN..)?;
    if frame.get(12..ETH_HLEN)? != ETH_P_IP || ip.len() < 20 || ip[0] >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let whole = u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff == 0;
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    if ip[9] != IPPROTO_IPIP || src != public_ip || !whole || ihl < 20 || total > ip.len() {
        return None;
    }
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    Some((dst, ip.get(ihl..total)?))
}

/// Logs a failing kind of I/O once, and once more when it works again.
struct Failing {
    what: &'static str,
    failing: bool,
}

impl Failing {
    fn new(what: &'static str) -> Self {
        Self {
            what,
            failing: false,
        }
    }

    fn record(&mut self, result: io::Result<()>) {
        match result {
            Ok(()) if self.failing => {
                tracing::info!(tap = IPIP_TAP, "{} works again", self.what);
                self.failing = false;
            }
            Err(e) if !self.failing => {
                tracing::warn!(tap = IPIP_TAP, error = %e, "{} failed", self.what);
                self.failing = true;
            }
            _ => {}
        }
    }
}

fn read_into(fd: libc::c_int, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: read(2) into a buffer we own, with its exact length.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// One write of a whole frame (a tap takes a frame per write, or none).
fn write_all(fd: libc::c_int, frame: &[u8]) -> io::Result<()> {
    // SAFETY: write(2) from a buffer we own, with its exact length.
    let n = unsafe { libc::write(fd, frame.as_ptr().cast(), frame.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn send_to(fd: libc::c_int, packet: &[u8], dst: Ipv4Addr) -> io::Result<()> {
    let addr = sockaddr(dst);
    // SAFETY: sendto(2) from a buffer we own with its exact length, to a
    // sockaddr_in on our stack with its exact size.
    let n = unsafe {
        libc::sendto(
            fd,
            packet.as_ptr().cast(),
            packet.len(),
            0,
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn sockaddr(ip: Ipv4Addr) -> libc::sockaddr_in {
    // SAFETY: all-zero is a valid sockaddr_in.
    let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    addr.sin_family = libc::AF_INET as libc::sa_family_t;
    addr.sin_addr.s_addr = u32::from_ne_bytes(ip.octets());
    addr
}

/// A raw IP-in-IP socket bound to `public_ip` (the source of what it sends,
/// and the only destination it receives for), with path-MTU discovery off
/// so that the kernel sends its datagrams with DF clear and fragments them.
fn raw_socket(public_ip: Ipv4Addr) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            libc::c_int::from(IPPROTO_IPIP),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a socket we just opened and own alone.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let addr = sockaddr(public_ip);
    // SAFETY: bind(2) with a sockaddr_in on our stack and its exact size.
    let rc = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let dont: libc::c_int = libc::IP_PMTUDISC_DONT;
    // SAFETY: setsockopt(2) with a c_int option value and its exact size.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            (&raw const dont).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sock)
}

fn set_nonblocking(file: &File) -> io::Result<()> {
    // SAFETY: fcntl(2) on a descriptor we own.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0
        || unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Opens `/dev/net/tun` and attaches a tap device called `name` to it
/// (`IFF_TAP | IFF_NO_PI`: whole Ethernet frames, no packet-info prefix).
/// The device disappears when the returned file is closed.
fn open_tap(name: &str) -> Result<File, IpipSlowPathError> {
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(IpipSlowPathError::Tun)?;
    // SAFETY: all-zero is a valid ifreq.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: TUNSETIFF takes a pointer to an ifreq, which `req` is, and
    // outlives the call; `tun` is an open /dev/net/tun.
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &raw mut req) } < 0 {
        return Err(IpipSlowPathError::Tap(io::Error::last_os_error()));
    }
    Ok(tun)
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);

    /// Ethernet + outer IPv4 (from `src`, protocol `proto`, flags `frag`)
    /// + a 28-byte inner packet.
    fn frame(src: Ipv4Addr, proto: u8, frag: [u8; 2]) -> Vec<u8> {
        let mut f = vec![0u8; ETH_HLEN];
        f[12..14].copy_from_slice(&ETH_P_IP);
        let mut ip = vec![0x45, 0, 0, 48, 0, 0, frag[0], frag[1], 64, proto, 0, 0];
        ip.extend_from_slice(&src.octets());
        ip.extend_from_slice(&[198, 18, 0, 2]);
        f.extend_from_slice(&ip);
        f.extend_from_slice(&[0x45; 28]);
        f
    }

    #[test]
    fn only_our_whole_ipip_packets_are_sent_on() {
        let ours = frame(US, 4, [0, 0]);
        let (dst, inner) = outgoing(&ours, US).expect("our IP-in-IP packet");
        assert_eq!(dst, Ipv4Addr::new(198, 18, 0, 2));
        assert_eq!(inner, &ours[34..]);
        assert!(outgoing(&frame(Ipv4Addr::new(198, 18, 0, 9), 4, [0, 0]), US).is_none());
        assert!(outgoing(&frame(US, 17, [0, 0]), US).is_none());
        assert!(
            outgoing(&frame(US, 4, [0x20, 0]), US).is_none(),
            "a fragment"
        );
        let mut arp = ours.clone();
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert!(outgoing(&arp, US).is_none());
        assert!(
            outgoing(&ours[..40], US).is_none(),
            "shorter than it claims"
        );
        assert!(outgoing(&ours[..20], US).is_none());
    }
}
