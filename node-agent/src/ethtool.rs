//! Two ethtool queries through `SIOCETHTOOL`, answered for the caller's
//! network namespace (sysfs would answer for whichever one mounted it):
//! the interface's driver, which decides how the agent decapsulates, and
//! its GRO state, which `doctor` reports.

use std::{
    ffi::CStr,
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

const ETHTOOL_GDRVINFO: u32 = 0x03;
const ETHTOOL_GGRO: u32 = 0x2b;

/// `struct ethtool_drvinfo` (linux/ethtool.h).
#[repr(C)]
struct DrvInfo {
    cmd: u32,
    driver: [u8; 32],
    version: [u8; 32],
    fw_version: [u8; 32],
    bus_info: [u8; 32],
    erom_version: [u8; 32],
    reserved2: [u8; 12],
    n_priv_flags: u32,
    n_stats: u32,
    testinfo_len: u32,
    eedump_len: u32,
    regdump_len: u32,
}

/// `struct ethtool_value`.
#[repr(C)]
struct Value {
    cmd: u32,
    data: u32,
}

/// Issues `SIOCETHTOOL` for `iface` with `data` as the command buffer.
fn ioctl<T>(iface: &str, data: &mut T) -> io::Result<()> {
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh, open socket nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain old data; all zeros is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let name = iface.as_bytes();
    if name.len() >= req.ifr_name.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "interface name too long",
        ));
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(name) {
        *dst = *src as libc::c_char;
    }
    req.ifr_ifru.ifru_data = (data as *mut T).cast();
    // SAFETY: `req` names the interface and points at `data`, a live,
    // writable buffer of the layout the command expects; both outlive
    // the call.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCETHTOOL, &mut req) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The driver's name, e.g. `veth`, `virtio_net`, `mlx5_core`.
pub fn driver(iface: &str) -> io::Result<String> {
    // SAFETY: DrvInfo is plain old data; all zeros is a valid value.
    let mut info: DrvInfo = unsafe { std::mem::zeroed() };
    info.cmd = ETHTOOL_GDRVINFO;
    ioctl(iface, &mut info)?;
    Ok(CStr::from_bytes_until_nul(&info.driver)
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_default())
}

/// Whether generic receive offload is on.
pub fn gro(iface: &str) -> io::Result<bool> {
    let mut value = Value {
        cmd: ETHTOOL_GGRO,
        data: 0,
    };
    ioctl(iface, &mut value)?;
    Ok(value.data != 0)
}
