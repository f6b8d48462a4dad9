//! Concurrent `fdatasync` of several files.
//!
//! A write batch usually dirties every partition, and with
//! [`FsyncPolicy::Always`](crate::FsyncPolicy::Always) each dirty segment must
//! be synced before the batch is acknowledged. Syncing them one after another
//! makes commit latency grow with the partition count; issuing them
//! concurrently lets the device and the file system's journal serve them
//! together (on ext4 several concurrent fsyncs typically share one journal
//! commit). The pool keeps a few long-lived helper threads so that no thread
//! is spawned per batch; the calling (writer) thread syncs one file itself.

use std::fs::File;
use std::io;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread::{self, JoinHandle};

/// Upper bound of helper threads: beyond a handful of concurrent fsyncs a
/// single device gains little.
const MAX_HELPERS: usize = 3;

struct Job {
    index: usize,
    file: Arc<File>,
    reply: Sender<(usize, io::Result<()>)>,
}

/// Helper threads that run `fdatasync` on behalf of the writer.
pub(crate) struct SyncPool {
    helpers: Vec<(Sender<Job>, JoinHandle<()>)>,
}

impl SyncPool {
    /// A pool able to sync `files` files at once (`files - 1` helpers, at most
    /// [`MAX_HELPERS`]). Failing to start a helper only reduces concurrency.
    pub(crate) fn new(files: usize) -> Self {
        let wanted = files.saturating_sub(1).min(MAX_HELPERS);
        let mut helpers = Vec::with_capacity(wanted);
        for i in 0..wanted {
            let (sender, receiver) = mpsc::channel::<Job>();
            let spawned = thread::Builder::new()
                .name(format!("kairos-log-sync-{i}"))
                .spawn(move || run_helper(receiver));
            match spawned {
                Ok(handle) => helpers.push((sender, handle)),
                Err(e) => {
                    tracing::warn!(error = %e, "could not start an fsync helper thread");
                    break;
                }
            }
        }
        SyncPool { helpers }
    }

    /// Runs `sync_data` on every file concurrently and returns the results in
    /// input order.
    pub(crate) fn sync_all(&self, files: &[Arc<File>]) -> Vec<io::Result<()>> {
        let mut results: Vec<Option<io::Result<()>>> = files.iter().map(|_| None).collect();
        let (reply, replies) = mpsc::channel();
        let mut dispatched = 0;
        let mut local = Vec::new();
        // Files are dealt round-robin to this thread (slot 0) and the
        // helpers; a file a helper cannot take is synced here as well.
        let slots = self.helpers.len() + 1;
        for (index, file) in files.iter().enumerate() {
            let helper = (index % slots).checked_sub(1).map(|h| &self.helpers[h]);
            let job = Job {
                index,
                file: Arc::clone(file),
                reply: reply.clone(),
            };
            match helper {
                Some((sender, _)) => match sender.send(job) {
                    Ok(()) => dispatched += 1,
                    Err(mpsc::SendError(job)) => local.push(job.index),
                },
                None => local.push(index),
            }
        }
        drop(reply);
        for index in local {
            results[index] = Some(files[index].sync_data());
        }
        for _ in 0..dispatched {
            match replies.recv() {
                Ok((index, result)) => results[index] = Some(result),
                Err(_) => break,
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(io::Error::other("fsync helper thread stopped"))))
            .collect()
    }
}

fn run_helper(jobs: Receiver<Job>) {
    while let Ok(job) = jobs.recv() {
        let result = job.file.sync_data();
        // The writer may have given up waiting (it never does today); a
        // closed reply channel is not an error for the helper.
        let _ = job.reply.send((job.index, result));
    }
}

impl Drop for SyncPool {
    fn drop(&mut self) {
        for (sender, handle) in self.helpers.drain(..) {
            drop(sender);
            let _ = handle.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syncs_files_and_reports_in_order() {
        let dir = std::env::temp_dir().join(format!("kairos-log-syncpool-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let files: Vec<Arc<File>> = (0..6)
            .map(|i| Arc::new(File::create(dir.join(format!("f{i}"))).expect("create")))
            .collect();
        for helpers in [1, 2, 4] {
            let pool = SyncPool::new(helpers);
            let results = pool.sync_all(&files);
            assert_eq!(results.len(), 6);
            assert!(results.iter().all(Result::is_ok));
            assert!(pool.sync_all(&[]).is_empty());
        }
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
