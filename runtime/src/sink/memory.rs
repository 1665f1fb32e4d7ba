//! An in-memory transactional sink (backtests and tests).

use std::collections::HashMap;

use super::{Sink, Stream, SyncJob};
use crate::checkpoint::protocol;
use crate::Result;

#[derive(Default)]
pub struct MemorySink {
    open: HashMap<Stream, Vec<u8>>,
    durable: Vec<(u64, Stream, Vec<u8>)>,
    committed: HashMap<Stream, Vec<u8>>,
}

impl MemorySink {
    /// Committed records of a stream, one per line.
    pub fn lines(&self, s: Stream) -> impl Iterator<Item = &str> {
        self.committed
            .get(&s)
            .map(|b| std::str::from_utf8(b).unwrap_or_default())
            .unwrap_or_default()
            .lines()
    }
}

impl Sink for MemorySink {
    fn write(&mut self, stream: Stream, records: &[u8]) -> Result<()> {
        self.open
            .entry(stream)
            .or_default()
            .extend_from_slice(records);
        Ok(())
    }

    fn pre_commit(&mut self, epoch: u64) -> Result<SyncJob> {
        for (s, b) in self.open.drain() {
            self.durable.push((epoch, s, b));
        }
        Ok(Box::new(|| Ok(())))
    }

    fn commit(&mut self, epoch: u64) -> Result<()> {
        let (done, keep) = std::mem::take(&mut self.durable)
            .into_iter()
            .partition(|(e, _, _)| *e <= epoch);
        self.durable = keep;
        let mut done: Vec<(u64, Stream, Vec<u8>)> = done;
        done.sort_by_key(|(e, _, _)| *e);
        for (_, s, b) in done {
            self.committed.entry(s).or_default().extend_from_slice(&b);
        }
        Ok(())
    }

    fn recover(&mut self, covered: u64, _next: u64) -> Result<()> {
        self.open.clear();
        let pending: Vec<u64> = self.durable.iter().map(|(e, _, _)| *e).collect();
        let discard = protocol::recover(&pending, covered).discard;
        self.durable.retain(|(e, _, _)| !discard.contains(e));
        self.commit(covered)
    }
}
