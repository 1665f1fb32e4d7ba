//! In-memory partitions (backtests and tests).

use super::{Polled, Source, SourcePosition};
use crate::event::{DeadLetter, Event};
use crate::Result;

pub type Record = std::result::Result<Event, DeadLetter>;

pub struct MemorySource {
    parts: Vec<Vec<Record>>,
    next: Vec<usize>,
}

impl MemorySource {
    pub fn new(parts: Vec<Vec<Record>>) -> Self {
        let next = vec![0; parts.len()];
        Self { parts, next }
    }

    /// One partition of valid events.
    pub fn from_events(events: Vec<Event>) -> Self {
        Self::new(vec![events.into_iter().map(Ok).collect()])
    }
}

impl Source for MemorySource {
    fn partitions(&self) -> u32 {
        self.parts.len() as u32
    }

    fn poll_round(&mut self, per_partition: usize, out: &mut Vec<Polled>) -> Result<()> {
        for (idx, part) in self.parts.iter().enumerate() {
            let start = self.next[idx];
            let end = (start + per_partition).min(part.len());
            for (i, rec) in part[start..end].iter().enumerate() {
                out.push(Polled {
                    partition: idx as u32,
                    record: rec.clone(),
                    last: start + i + 1 == part.len(),
                });
            }
            self.next[idx] = end;
        }
        Ok(())
    }

    fn is_finished(&self, partition: u32) -> bool {
        self.next[partition as usize] >= self.parts[partition as usize].len()
    }

    fn positions(&self) -> Vec<SourcePosition> {
        self.next
            .iter()
            .map(|n| SourcePosition {
                offset: *n as u64,
                records: *n as u64,
            })
            .collect()
    }

    fn seek(&mut self, positions: &[SourcePosition]) -> Result<()> {
        for (n, p) in self.next.iter_mut().zip(positions) {
            *n = p.offset as usize;
        }
        Ok(())
    }
}
