//! The BPF filesystem the pins live on. A host that booted without one
//! mounted at `/sys/fs/bpf` (some minimal distributions, a container that
//! bind-mounts /sys without it) gets one from the agent, as Cilium's and
//! Calico's agents do; and since pins are what keep the data path alive
//! across restarts, a mount that dies with the agent is said so.

use std::{
    ffi::CString,
    fs, io,
    path::{Path, PathBuf},
};

/// `BPF_FS_MAGIC` from linux/magic.h: statfs's `f_type` of a bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, thiserror::Error)]
pub enum BpffsError {
    #[error("--pin-path {} has no parent directory to mount a BPF filesystem on", path.display())]
    NoParent { path: PathBuf },
    #[error(
        "{} is not a BPF filesystem and mounting one there failed: {source}; mount it \
         (`mount -t bpf bpf {}`) or choose a --pin-path on one",
        path.display(),
        path.display()
    )]
    Mount { path: PathBuf, source: io::Error },
}

/// Whether `path` lives on bpffs. `ip netns exec` remounts /sys, hiding the
/// host's bpffs; pins made elsewhere would vanish with the agent.
pub fn is_bpffs(path: &Path) -> bool {
    let Ok(c_path) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: `c_path` is a valid NUL-terminated string and `buf` a properly
    // sized, writable statfs buffer that outlives the call.
    unsafe {
        let mut buf: libc::statfs = std::mem::zeroed();
        libc::statfs(c_path.as_ptr(), &mut buf) == 0 && buf.f_type as i64 == BPF_FS_MAGIC
    }
}

/// What [`ensure_mounted`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mounted {
    /// The pin path was on bpffs already.
    Already,
    /// The agent mounted bpffs on this directory (the pin path's parent).
    Now(PathBuf),
    /// Not on bpffs, and the parent holds files a mount would hide: left
    /// alone (the caller refuses the pin path).
    NotMounted,
}

/// Makes sure `pin_path` will be on a bpffs: if neither it nor its parent
/// (`/sys/fs/bpf` for the default) is one, mounts one on the parent, when
/// that is absent or an empty directory (a mount would hide anything in
/// it: a --pin-path under /tmp must not mount over /tmp). Warns
/// when that mount will not outlive the agent: in a mount namespace of its
/// own (systemd's `PrivateMounts=`, a container) the mount, and with it
/// every pin, disappears when the agent exits, so forwarding would stop.
pub fn ensure_mounted(pin_path: &Path) -> Result<Mounted, BpffsError> {
    if is_bpffs(pin_path) {
        return Ok(Mounted::Already);
    }
    let parent = pin_path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .ok_or_else(|| BpffsError::NoParent {
            path: pin_path.to_owned(),
        })?;
    if is_bpffs(parent) {
        return Ok(Mounted::Already);
    }
    let mount_err = |source| BpffsError::Mount {
        path: parent.to_owned(),
        source,
    };
    match fs::read_dir(parent) {
        Ok(entries) => {
            if entries.into_iter().next().is_some() {
                return Ok(Mounted::NotMounted);
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::create_dir_all(parent).map_err(mount_err)?;
        }
        Err(e) => return Err(mount_err(e)),
    }
    mount_bpffs(parent).map_err(mount_err)?;
    tracing::info!(path = %parent.display(), "mounted a BPF filesystem for the pins");
    if !outlives_process(parent) {
        tracing::warn!(
            path = %parent.display(),
            "the agent runs in a private mount namespace: the BPF filesystem it mounted, \
             and every pin on it, disappears when the agent exits, and forwarding stops \
             with it; mount bpffs on the host (`mount -t bpf bpf {}`) or share /sys/fs/bpf \
             with the agent (systemd: no PrivateMounts=; a container: -v /sys/fs/bpf:/sys/fs/bpf:shared)",
            parent.display()
        );
    }
    Ok(Mounted::Now(parent.to_owned()))
}

fn mount_bpffs(target: &Path) -> io::Result<()> {
    let target = CString::new(target.as_os_str().as_encoded_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // Only root reads the pins, as with the default /sys/fs/bpf.
    let data = c"mode=0700";
    // SAFETY: every pointer is a valid NUL-terminated string that outlives
    // the call; mount(2) copies what it needs.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            data.as_ptr().cast(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether a mount at `path` stays after this process exits: this process
/// shares init's mount namespace, or the mount propagates to a peer group
/// (`shared:N` in mountinfo) that reaches it.
fn outlives_process(path: &Path) -> bool {
    let ns = |pid: &str| fs::read_link(format!("/proc/{pid}/ns/mnt")).ok();
    if let (Some(own), Some(init)) = (ns("self"), ns("1"))
        && own == init
    {
        return true;
    }
    fs::read_to_string("/proc/self/mountinfo")
        .map(|text| mount_is_shared(&text, path))
        .unwrap_or(false)
}

/// Whether the last mount at `path` in a mountinfo text has a `shared:`
/// propagation tag (the optional fields between the mount options and `-`).
fn mount_is_shared(mountinfo: &str, path: &Path) -> bool {
    let path = path.to_string_lossy();
    mountinfo
        .lines()
        .rev()
        .find_map(|line| {
            let mut fields = line.split(' ');
            let mount_point = fields.nth(4)?;
            (mount_point == path).then(|| {
                fields
                    .skip(1)
                    .take_while(|f| *f != "-")
                    .any(|f| f.starts_with("shared:"))
            })
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_propagation_is_read_from_the_last_mount_at_the_path() {
        let info = "\
25 30 0:23 / /sys rw,nosuid shared:7 - sysfs sysfs rw
40 25 0:35 / /sys/fs/bpf rw,relatime - bpf bpf rw,mode=700
41 25 0:36 / /sys/fs/bpf rw,relatime shared:12 master:3 - bpf bpf rw,mode=700
";
        assert!(mount_is_shared(info, Path::new("/sys/fs/bpf")));
        assert!(mount_is_shared(info, Path::new("/sys")));
        let private = "40 25 0:35 / /sys/fs/bpf rw,relatime - bpf bpf rw\n";
        assert!(!mount_is_shared(private, Path::new("/sys/fs/bpf")));
        assert!(!mount_is_shared(info, Path::new("/sys/fs/bpf/weft")));
    }

    #[test]
    fn a_pin_path_without_a_parent_is_refused() {
        assert!(matches!(
            ensure_mounted(Path::new("relative")),
            Err(BpffsError::NoParent { .. })
        ));
    }
}
