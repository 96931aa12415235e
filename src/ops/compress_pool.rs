//! Compressing clusters on every core while one thread stores them in guest order.
//!
//! Cluster `n` goes to worker `n % workers`, and each worker answers in the order it was
//! asked, so the results come back in submission order by reading the workers' result
//! channels round-robin: no reordering buffer is needed. At most `IN_FLIGHT_PER_WORKER`
//! clusters per worker are queued or being compressed, which bounds memory.

use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::Scope;

use crate::error::Result;
use crate::format::CompressionType;
use crate::qcow2::compress_cluster;

/// Clusters queued per worker before submitting waits for a result.
const IN_FLIGHT_PER_WORKER: usize = 4;

/// One cluster to compress: its guest offset, a full cluster of bytes (padded with zeros
/// past the image's end) and how many of them are guest content.
struct Job {
    offset: u64,
    buf: Vec<u8>,
    len: usize,
}

/// A compressed cluster ready to store.
pub(crate) struct Compressed<'a> {
    /// Guest offset of the cluster.
    pub offset: u64,
    /// The guest content (`len` bytes, not padded).
    pub data: &'a [u8],
    /// The compressed cluster, or `None` when compressing does not save space.
    pub compressed: Option<Vec<u8>>,
}

/// A worker's answer.
struct Done {
    job: Job,
    compressed: Result<Option<Vec<u8>>>,
}

/// Workers compressing clusters; results are handed to a store callback in guest order.
pub(crate) struct CompressPool {
    jobs: Vec<SyncSender<Job>>,
    results: Vec<Receiver<Done>>,
    submitted: usize,
    collected: usize,
    cluster_size: usize,
    spare: Vec<Vec<u8>>,
}

impl CompressPool {
    /// Starts `workers` threads (at least one) in `scope` compressing with `kind`.
    pub(crate) fn start<'scope>(
        scope: &'scope Scope<'scope, '_>,
        workers: usize,
        kind: CompressionType,
        cluster_size: usize,
    ) -> CompressPool {
        let workers = workers.max(1);
        let mut jobs = Vec::with_capacity(workers);
        let mut results = Vec::with_capacity(workers);
        for _ in 0..workers {
            let (job_tx, job_rx) = sync_channel::<Job>(IN_FLIGHT_PER_WORKER);
            let (done_tx, done_rx) = sync_channel::<Done>(IN_FLIGHT_PER_WORKER);
            scope.spawn(move || {
                for job in job_rx {
                    let compressed = compress_cluster(kind, &job.buf);
                    if done_tx.send(Done { job, compressed }).is_err() {
                        return;
                    }
                }
            });
            jobs.push(job_tx);
            results.push(done_rx);
        }
        CompressPool {
            jobs,
            results,
            submitted: 0,
            collected: 0,
            cluster_size,
            spare: Vec::new(),
        }
    }

    /// Queues the cluster at guest `offset` holding `data` (a whole cluster, or less at
    /// the image's end). Stores earlier results with `store` when the queue is full.
    pub(crate) fn submit(
        &mut self,
        offset: u64,
        data: &[u8],
        store: &mut dyn FnMut(Compressed<'_>) -> Result<()>,
    ) -> Result<()> {
        self.queue(offset, data.len(), |buf| buf.copy_from_slice(data), store)
    }

    /// Queues the cluster at guest `offset` holding `len` zeros, as [`CompressPool::submit`].
    pub(crate) fn submit_zeros(
        &mut self,
        offset: u64,
        len: usize,
        store: &mut dyn FnMut(Compressed<'_>) -> Result<()>,
    ) -> Result<()> {
        self.queue(offset, len, |buf| buf.fill(0), store)
    }

    /// Queues a cluster of `len` bytes of guest content, which `fill` writes.
    fn queue(
        &mut self,
        offset: u64,
        len: usize,
        fill: impl FnOnce(&mut [u8]),
        store: &mut dyn FnMut(Compressed<'_>) -> Result<()>,
    ) -> Result<()> {
        let workers = self.jobs.len();
        if self.submitted - self.collected >= workers * IN_FLIGHT_PER_WORKER {
            self.collect_one(store)?;
        }
        let mut buf = self
            .spare
            .pop()
            .unwrap_or_else(|| vec![0u8; self.cluster_size]);
        fill(&mut buf[..len]);
        buf[len..].fill(0);
        let job = Job { offset, buf, len };
        // A worker only stops when its channel closes, so sending cannot fail while we
        // hold the sender; if it did, the result channel reports it when collected.
        let _ = self.jobs[self.submitted % workers].send(job);
        self.submitted += 1;
        Ok(())
    }

    /// Stores the oldest outstanding result.
    fn collect_one(&mut self, store: &mut dyn FnMut(Compressed<'_>) -> Result<()>) -> Result<()> {
        let workers = self.results.len();
        let done = self.results[self.collected % workers]
            .recv()
            .map_err(|_| crate::error::Error::Unsupported("a compression worker stopped"))?;
        self.collected += 1;
        let Done { job, compressed } = done;
        let result = store(Compressed {
            offset: job.offset,
            data: &job.buf[..job.len],
            compressed: compressed?,
        });
        self.spare.push(job.buf);
        result
    }

    /// Stores every outstanding result.
    pub(crate) fn finish(
        &mut self,
        store: &mut dyn FnMut(Compressed<'_>) -> Result<()>,
    ) -> Result<()> {
        while self.collected < self.submitted {
            self.collect_one(store)?;
        }
        Ok(())
    }
}
