//! A private BPF filesystem for a test's pins: mounted in a fresh temporary
//! directory, unmounted and removed on drop, so tests never touch the
//! host's /sys/fs/bpf.

use std::{
    ffi::CString,
    fs,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

pub struct BpfFs {
    path: PathBuf,
}

impl BpfFs {
    pub fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "veil-bpffs-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&path).expect("creating the bpffs mount point");
        veil_user::datapath::mount_bpffs(&path).expect("mount -t bpf");
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Default for BpfFs {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        if let Ok(target) = CString::new(self.path.as_os_str().as_encoded_bytes()) {
            // SAFETY: a valid C string; MNT_DETACH so a lingering fd can't block it.
            unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        }
        let _ = fs::remove_dir(&self.path);
    }
}
