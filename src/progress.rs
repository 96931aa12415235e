//! Progress of long operations, and cancelling them.

use crate::error::{Error, Result};

/// A progress callback of a long operation: called with `(done, total)` bytes as the
/// operation goes; returning `false` cancels it ([`Error::Cancelled`]).
///
/// Every operation that takes one calls it with `done` never decreasing and, when it
/// completes, last with `(total, total)`.
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64) -> bool;

/// Reports one operation's progress to its [`Progress`] callback: `done` never goes
/// backwards or past `total`, and [`Tracker::finish`] ends at `(total, total)`.
pub(crate) struct Tracker<'p, 'c> {
    callback: &'p mut (dyn FnMut(u64, u64) -> bool + 'c),
    total: u64,
    done: u64,
}

impl<'p, 'c> Tracker<'p, 'c> {
    /// A tracker for an operation of `total` bytes.
    pub(crate) fn new(callback: &'p mut (dyn FnMut(u64, u64) -> bool + 'c), total: u64) -> Self {
        Tracker {
            callback,
            total,
            done: 0,
        }
    }

    /// Sets the total once the operation knows it.
    pub(crate) fn set_total(&mut self, total: u64) {
        self.total = total;
        self.done = self.done.min(total);
    }

    /// Reports that the operation got to `done` bytes; fails with [`Error::Cancelled`]
    /// when the callback asks to stop.
    pub(crate) fn report(&mut self, done: u64) -> Result<()> {
        self.done = done.clamp(self.done, self.total);
        if (self.callback)(self.done, self.total) {
            Ok(())
        } else {
            Err(Error::Cancelled)
        }
    }

    /// Reports the operation complete: `(total, total)`.
    pub(crate) fn finish(mut self) -> Result<()> {
        self.report(self.total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_never_goes_back_and_ends_at_the_total() {
        let mut calls = Vec::new();
        let mut record = |done, total| {
            calls.push((done, total));
            true
        };
        let mut tracker = Tracker::new(&mut record, 100);
        tracker.report(40).unwrap();
        tracker.report(30).unwrap();
        tracker.report(200).unwrap();
        tracker.report(50).unwrap();
        tracker.finish().unwrap();
        assert_eq!(
            calls,
            [(40, 100), (40, 100), (100, 100), (100, 100), (100, 100)]
        );
    }

    #[test]
    fn a_callback_returning_false_cancels() {
        let mut stop = |_, _| false;
        let err = Tracker::new(&mut stop, 10).report(5).unwrap_err();
        assert!(matches!(err, Error::Cancelled));
    }
}
