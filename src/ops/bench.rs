//! [`bench`]: `qemu-img bench` on the engine's own I/O path — the same request stream
//! (`count` requests of `buffer_size` bytes from `offset`, each `step` further, wrapping at
//! the image's end; or random offsets), `depth` of them in flight, optional flushes.
//!
//! The engine's I/O is synchronous per thread, so requests in flight are served by
//! threads: `depth` of them, but never more than twice the cores (more cannot run at
//! once; they would only add switches). Each thread takes the next request of the one
//! shared stream, so the offsets and their order of issue are qemu-img's.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::chain::Chain;
use crate::error::{Error, Result};

/// What [`bench`] runs.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Requests in all (qemu-img `-c`, default 75000).
    pub count: u64,
    /// Requests in flight (`-d`, default 64).
    pub depth: usize,
    /// Bytes per request (`-s`, default 4096).
    pub buffer_size: u64,
    /// Distance between consecutive requests (`-S`; default the buffer size).
    pub step: Option<u64>,
    /// Offset of the first request (`-o`).
    pub offset: u64,
    /// Write instead of read (`-w`).
    pub write: bool,
    /// The byte written (`--pattern`, default 0).
    pub pattern: u8,
    /// Flush after every this many requests (`--flush-interval`; writes only, at least
    /// `depth`).
    pub flush_interval: Option<u64>,
    /// Let requests continue while a flush runs (`--no-drain`).
    pub no_drain: bool,
    /// Offsets drawn at random inside the image, aligned to the buffer size, from this
    /// seed (not in qemu-img).
    pub random: Option<u64>,
}

impl Default for BenchOptions {
    fn default() -> BenchOptions {
        BenchOptions {
            count: 75000,
            depth: 64,
            buffer_size: 4096,
            step: None,
            offset: 0,
            write: false,
            pattern: 0,
            flush_interval: None,
            no_drain: false,
            random: None,
        }
    }
}

impl BenchOptions {
    /// The step between requests.
    pub fn step(&self) -> u64 {
        self.step.unwrap_or(self.buffer_size)
    }

    /// Refuses what qemu-img bench refuses.
    pub fn validate(&self) -> Result<()> {
        let refuse = |what: &str| Err(Error::InvalidArgument(what.into()));
        if self.depth == 0 {
            return refuse("Invalid queue depth specified");
        }
        if self.buffer_size == 0 || self.buffer_size > 1 << 30 {
            return refuse("Invalid buffer size specified");
        }
        if let Some(interval) = self.flush_interval {
            if !self.write {
                return refuse("--flush-interval is only available in write tests");
            }
            if interval < self.depth as u64 {
                return refuse("Flush interval can't be smaller than depth");
            }
        } else if self.no_drain {
            return refuse("--no-drain is only available with --flush-interval");
        }
        Ok(())
    }
}

/// What a run measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BenchReport {
    /// Requests completed.
    pub requests: u64,
    /// Flushes issued.
    pub flushes: u64,
    /// Time from the first request to the last completion.
    pub elapsed: Duration,
}

/// The offsets of the stream: qemu-img's (from `offset`, `step` apart, wrapping at the
/// image's end) or random ones.
struct Stream {
    next: u64,
    step: u64,
    size: u64,
    random: Option<u64>,
    align: u64,
}

impl Stream {
    fn take(&mut self) -> u64 {
        match &mut self.random {
            Some(state) => {
                // xorshift64*: deterministic for a seed, no dependency.
                *state ^= *state >> 12;
                *state ^= *state << 25;
                *state ^= *state >> 27;
                let r = state.wrapping_mul(0x2545_f491_4f6c_dd1d);
                let slots = (self.size / self.align).max(1);
                (r % slots) * self.align
            }
            None => {
                let at = self.next;
                self.next += self.step;
                self.next = if self.size == 0 {
                    0
                } else {
                    self.next % self.size
                };
                at
            }
        }
    }
}

/// Runs the requests `options` describe on `chain` (writable for writes) and times them.
/// The first failed request stops the run with its error.
pub fn bench(chain: &Chain, options: &BenchOptions) -> Result<BenchReport> {
    options.validate()?;
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let threads = options
        .depth
        .min(2 * cores)
        .min(options.count.max(1) as usize);
    let stream = Mutex::new(Stream {
        next: options.offset,
        step: options.step(),
        size: chain.size(),
        random: options.random.map(|seed| seed | 1),
        align: options.buffer_size,
    });
    let issued = AtomicU64::new(0);
    let completed = AtomicU64::new(0);
    let flushes = AtomicU64::new(0);
    let failed = AtomicBool::new(false);
    let error: Mutex<Option<Error>> = Mutex::new(None);
    // Drained flushes: requests wait while one runs (a read-write lock: requests share
    // it, a drained flush takes it alone).
    let gate = std::sync::RwLock::new(());
    let start = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                let mut buf = vec![options.pattern; options.buffer_size as usize];
                loop {
                    if failed.load(Ordering::Relaxed) {
                        return;
                    }
                    let index = issued.fetch_add(1, Ordering::Relaxed);
                    if index >= options.count {
                        return;
                    }
                    let offset = stream.lock().unwrap_or_else(|e| e.into_inner()).take();
                    let result = {
                        let _shared = gate.read().unwrap_or_else(|e| e.into_inner());
                        if options.write {
                            chain.write_at(&buf, offset)
                        } else {
                            chain.read_at(&mut buf, offset)
                        }
                    };
                    let result = result.and_then(|()| {
                        let done = completed.fetch_add(1, Ordering::Relaxed) + 1;
                        match options.flush_interval {
                            Some(every) if done % every == 0 => {
                                flushes.fetch_add(1, Ordering::Relaxed);
                                if options.no_drain {
                                    chain.flush()
                                } else {
                                    let _alone = gate.write().unwrap_or_else(|e| e.into_inner());
                                    chain.flush()
                                }
                            }
                            _ => Ok(()),
                        }
                    });
                    if let Err(e) = result {
                        failed.store(true, Ordering::Relaxed);
                        error
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .get_or_insert(e);
                        return;
                    }
                }
            });
        }
    });
    let elapsed = start.elapsed();
    if let Some(e) = error.into_inner().unwrap_or_else(|e| e.into_inner()) {
        return Err(e);
    }
    Ok(BenchReport {
        requests: completed.into_inner(),
        flushes: flushes.into_inner(),
        elapsed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stream_wraps_at_the_end_as_qemu_img() {
        let mut s = Stream {
            next: 8192,
            step: 4096,
            size: 16384,
            random: None,
            align: 4096,
        };
        let offsets: Vec<u64> = (0..5).map(|_| s.take()).collect();
        assert_eq!(offsets, [8192, 12288, 0, 4096, 8192]);
    }

    #[test]
    fn random_offsets_are_aligned_inside_the_image_and_seeded() {
        let stream = |seed| Stream {
            next: 0,
            step: 4096,
            size: 1 << 20,
            random: Some(seed),
            align: 4096,
        };
        let (mut a, mut b) = (stream(7), stream(7));
        for _ in 0..1000 {
            let at = a.take();
            assert_eq!(at, b.take());
            assert!(at % 4096 == 0 && at + 4096 <= 1 << 20);
        }
    }

    #[test]
    fn qemu_imgs_refusals() {
        let write = BenchOptions {
            write: true,
            depth: 64,
            flush_interval: Some(10),
            ..BenchOptions::default()
        };
        assert!(write.validate().is_err());
        let read = BenchOptions {
            flush_interval: Some(100),
            ..BenchOptions::default()
        };
        assert!(read.validate().is_err());
        assert!(BenchOptions::default().validate().is_ok());
    }
}
