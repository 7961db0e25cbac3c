//! bpffs must be mounted for pinning; hosts and containers do not always have it.
use std::{ffi::CString, path::Path};

use super::DataplaneError;

/// Mounts bpffs at `path` unless a bpf filesystem is already mounted there.
pub fn ensure_mounted(path: &Path) -> Result<(), DataplaneError> {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    if is_mounted(&mounts, path) {
        return Ok(());
    }
    let err = |source| DataplaneError::Bpffs { path: path.to_owned(), source };
    std::fs::create_dir_all(path).map_err(err)?;
    let target = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| err(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))?;
    // SAFETY: all pointers are valid NUL-terminated strings; data may be null for bpffs.
    let rc = unsafe {
        libc::mount(c"bpf".as_ptr(), target.as_ptr(), c"bpf".as_ptr(), 0, std::ptr::null())
    };
    if rc != 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    Ok(())
}

fn is_mounted(mounts: &str, path: &Path) -> bool {
    mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        let (_, mnt, fstype) = (f.next(), f.next(), f.next());
        fstype == Some("bpf") && mnt.map(Path::new) == Some(path)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_bpffs_in_proc_mounts() {
        let m = "sysfs /sys sysfs rw 0 0\nbpf /sys/fs/bpf bpf rw,relatime 0 0\n";
        assert!(is_mounted(m, Path::new("/sys/fs/bpf")));
        assert!(!is_mounted("sysfs /sys sysfs rw 0 0\n", Path::new("/sys/fs/bpf")));
        assert!(!is_mounted("tmpfs /sys/fs/bpf tmpfs rw 0 0\n", Path::new("/sys/fs/bpf")));
    }
}
