//! The IP-in-IP slow path, for a kernel without an ipip device (this
//! project's test kernel has none).
//!
//! A tunnel peer's outer packet may be fragmented on the way (outer DF is
//! never set). The decap programs pass outer fragments to the stack, which
//! reassembles them but has no IP-in-IP handler to give the whole to. A raw
//! `IPPROTO_IPIP` socket still gets a copy of every IP-in-IP datagram the
//! stack delivers locally, reassembled; the agent writes each, behind an
//! Ethernet header, into the tap device [`IPIP_TAP`], whose TC ingress
//! program (`weft_slowpath_ipip_tc`) applies the fast path's checks,
//! decapsulates, and re-injects the inner packet into `--iface`'s ingress.
//! Validation and counting thus stay in the data path; this module only
//! carries bytes. The tap lives as long as the agent: while the agent is
//! stopped, reassembled IP-in-IP is lost, as it was before.

use std::{
    fs::File,
    io::{self, Write as _},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

use tokio::io::unix::AsyncFd;

/// Name of the tap device the reassembled datagrams are written into.
pub const IPIP_TAP: &str = "weft.ipip";
const _: () = assert!(IPIP_TAP.len() < libc::IFNAMSIZ);

/// IPPROTO_IPIP, the protocol of the raw socket.
const IPPROTO_IPIP: libc::c_int = 4;
/// The largest IPv4 datagram.
const MAX_DATAGRAM: usize = 65_535;
const ETH_HLEN: usize = 14;

#[derive(Debug, thiserror::Error)]
pub enum IpipSlowPathError {
    #[error("cannot open /dev/net/tun: {0}")]
    Tun(#[source] io::Error),
    #[error("cannot create the tap device {IPIP_TAP:?}: {0}")]
    Tap(#[source] io::Error),
    #[error("cannot open a raw IP-in-IP socket: {0}")]
    Socket(#[source] io::Error),
}

/// The raw socket and the tap, ready to carry datagrams.
pub struct IpipSlowPath {
    raw: AsyncFd<OwnedFd>,
    tap: File,
    /// The Ethernet header put in front of each datagram: to and from
    /// `--iface`'s MAC (the program rewrites the destination anyway).
    l2: [u8; ETH_HLEN],
}

impl IpipSlowPath {
    /// Creates the tap (down; the caller brings it up over netlink once
    /// the program is attached) and the raw socket. Must run inside a
    /// tokio runtime.
    pub fn open(iface_mac: [u8; 6]) -> Result<Self, IpipSlowPathError> {
        let tap = open_tap(IPIP_TAP)?;
        // SAFETY: plain socket(2) call; the result is checked before use.
        let fd = unsafe {
            libc::socket(
                libc::AF_INET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                IPPROTO_IPIP,
            )
        };
        if fd < 0 {
            return Err(IpipSlowPathError::Socket(io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a socket we just opened and own alone.
        let raw = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: the AsyncFd owns the socket, so the fd stays open for as
        // long as it is registered.
        let raw =
            unsafe { AsyncFd::register(raw) }.map_err(|e| IpipSlowPathError::Socket(e.into()))?;
        let mut l2 = [0u8; ETH_HLEN];
        l2[..6].copy_from_slice(&iface_mac);
        l2[6..12].copy_from_slice(&iface_mac);
        l2[12..].copy_from_slice(&0x0800u16.to_be_bytes());
        Ok(Self { raw, tap, l2 })
    }

    /// Carries datagrams from the raw socket into the tap until the socket
    /// fails. A failing write is logged once, and again once it recovers.
    pub async fn run(mut self) -> io::Error {
        let mut frame = vec![0u8; ETH_HLEN + MAX_DATAGRAM];
        frame[..ETH_HLEN].copy_from_slice(&self.l2);
        let mut write_failing = false;
        loop {
            let mut guard = match self.raw.readable().await {
                Ok(g) => g,
                Err(e) => return e,
            };
            let received = guard.try_io(|fd| {
                let buf = &mut frame[ETH_HLEN..];
                // SAFETY: recv(2) into a buffer we own, with its exact length.
                let n =
                    unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            let n = match received {
                Ok(Ok(n)) => n,
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return e,
                Err(_would_block) => continue,
            };
            match self.tap.write(&frame[..ETH_HLEN + n]) {
                Ok(_) if write_failing => {
                    tracing::info!(tap = IPIP_TAP, "writing reassembled IP-in-IP works again");
                    write_failing = false;
                }
                Ok(_) => {}
                Err(e) if !write_failing => {
                    tracing::warn!(tap = IPIP_TAP, error = %e, "cannot write reassembled IP-in-IP");
                    write_failing = true;
                }
                Err(_) => {}
            }
        }
    }
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
