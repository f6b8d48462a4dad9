//! Small file-system helpers.

use std::fs::File;
use std::io;
use std::path::Path;

/// Reads from `file` at absolute `position` without moving a shared cursor,
/// so one cached handle can serve concurrent readers. Retries on `EINTR`.
pub(crate) fn read_at(file: &File, buf: &mut [u8], position: u64) -> io::Result<usize> {
    loop {
        #[cfg(unix)]
        let result = std::os::unix::fs::FileExt::read_at(file, buf, position);
        #[cfg(windows)]
        let result = std::os::windows::fs::FileExt::seek_read(file, buf, position);
        match result {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// Makes directory entries (file creation, rename, deletion) in `dir` durable.
/// On Unix this is `fsync(2)` on the directory; other platforms have no
/// equivalent and rely on the file system.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        File::open(dir)?.sync_all()
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}
