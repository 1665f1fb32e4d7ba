//! A transactional file sink: `DIR/<stream>/.pending/epoch-N.jsonl` while an epoch is open,
//! renamed atomically to `DIR/<stream>/part-N.jsonl` when its checkpoint commits.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use super::{Sink, Stream, SyncJob};
use crate::checkpoint::protocol;
use crate::error::IoContext;
use crate::Result;

pub struct FileSink {
    dir: PathBuf,
    open: HashMap<Stream, (u64, BufWriter<File>)>,
    /// The epoch records go to now (last checkpoint id + 1).
    epoch: u64,
}

fn pending_dir(dir: &Path, s: Stream) -> PathBuf {
    dir.join(s.dir_name()).join(".pending")
}

fn pending_file(dir: &Path, s: Stream, epoch: u64) -> PathBuf {
    pending_dir(dir, s).join(format!("epoch-{epoch:010}.jsonl"))
}

/// The committed file of an epoch.
pub fn part_file(dir: &Path, s: Stream, epoch: u64) -> PathBuf {
    dir.join(s.dir_name())
        .join(format!("part-{epoch:010}.jsonl"))
}

fn pending_epochs(dir: &Path, s: Stream) -> Result<Vec<(u64, PathBuf)>> {
    let pd = pending_dir(dir, s);
    let mut out = Vec::new();
    for entry in fs::read_dir(&pd).at(&pd)? {
        let path = entry.at(&pd)?.path();
        let epoch = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("epoch-"))
            .and_then(|n| n.strip_suffix(".jsonl"))
            .and_then(|n| n.parse().ok());
        if let Some(e) = epoch {
            out.push((e, path));
        }
    }
    out.sort();
    Ok(out)
}

impl FileSink {
    /// `next_epoch` is the epoch new records belong to.
    pub fn open(dir: &Path, next_epoch: u64) -> Result<Self> {
        for s in Stream::ALL {
            let pd = pending_dir(dir, s);
            fs::create_dir_all(&pd).at(&pd)?;
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            open: HashMap::new(),
            epoch: next_epoch,
        })
    }

    /// A fresh start: nothing pending from an earlier incarnation may ever be published.
    pub fn discard_pending(&mut self) -> Result<()> {
        for s in Stream::ALL {
            for (_, path) in pending_epochs(&self.dir, s)? {
                fs::remove_file(&path).at(&path)?;
            }
        }
        Ok(())
    }
}

impl Sink for FileSink {
    fn write(&mut self, stream: Stream, records: &[u8]) -> Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let epoch = self.epoch;
        if !self.open.contains_key(&stream) {
            // Append, never truncate: a closed epoch's file must not lose what it holds.
            let path = pending_file(&self.dir, stream, epoch);
            let f = fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .at(&path)?;
            self.open
                .insert(stream, (epoch, BufWriter::with_capacity(1 << 20, f)));
        }
        let (_, w) = self.open.get_mut(&stream).expect("opened above");
        w.write_all(records).at(&self.dir)
    }

    fn pre_commit(&mut self, epoch: u64) -> Result<SyncJob> {
        if let Some((_, (e, _))) = self.open.iter().find(|(_, (e, _))| *e != epoch) {
            return Err(crate::Error::Checkpoint(format!(
                "file sink: closing epoch {epoch} while epoch {e} is open"
            )));
        }
        for (stream, (e, w)) in self.open.drain() {
            let path = pending_file(&self.dir, stream, e);
            w.into_inner().map_err(|e| e.into_error()).at(&path)?;
        }
        self.epoch = epoch + 1;
        // Every closed epoch still pending, not only this one: an earlier checkpoint that
        // failed may have failed to sync its epoch, which this manifest will cover too.
        let mut files = Vec::new();
        let mut dirs = Vec::new();
        for s in Stream::ALL {
            files.extend(
                pending_epochs(&self.dir, s)?
                    .into_iter()
                    .filter(|(e, _)| *e <= epoch)
                    .map(|(_, p)| p),
            );
            dirs.push(pending_dir(&self.dir, s));
        }
        Ok(Box::new(move || {
            for p in files.iter().chain(&dirs) {
                File::open(p).and_then(|f| f.sync_all()).at(p)?;
            }
            Ok(())
        }))
    }

    fn commit(&mut self, epoch: u64) -> Result<()> {
        for s in Stream::ALL {
            let mut published = false;
            for (e, path) in pending_epochs(&self.dir, s)? {
                if e <= epoch {
                    let to = part_file(&self.dir, s, e);
                    fs::rename(&path, &to).at(&to)?;
                    published = true;
                }
            }
            if published {
                let d = self.dir.join(s.dir_name());
                File::open(&d).and_then(|f| f.sync_all()).at(&d)?;
            }
        }
        Ok(())
    }

    fn recover(&mut self, covered: u64, next: u64) -> Result<()> {
        self.open.clear();
        for s in Stream::ALL {
            let pending = pending_epochs(&self.dir, s)?;
            let epochs: Vec<u64> = pending.iter().map(|(e, _)| *e).collect();
            let discard = protocol::recover(&epochs, covered).discard;
            for (e, path) in pending {
                if discard.contains(&e) {
                    fs::remove_file(&path).at(&path)?;
                }
            }
        }
        self.commit(covered)?;
        self.epoch = next;
        Ok(())
    }
}

/// Read every committed record of a stream, in epoch order.
pub fn read_committed(dir: &Path, s: Stream) -> Result<Vec<String>> {
    let d = dir.join(s.dir_name());
    let mut parts: Vec<PathBuf> = match fs::read_dir(&d) {
        Ok(rd) => rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("part-"))
            })
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).at(&d),
    };
    parts.sort();
    let mut lines = Vec::new();
    for p in parts {
        let text = fs::read_to_string(&p).at(&p)?;
        lines.extend(text.lines().map(str::to_owned));
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_become_visible_only_on_commit_and_recover_discards_later_ones() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = FileSink::open(dir.path(), 1).unwrap();
        s.write(Stream::Late, b"a\n").unwrap();
        s.pre_commit(1).unwrap()().unwrap();
        assert!(read_committed(dir.path(), Stream::Late).unwrap().is_empty());
        s.write(Stream::Late, b"b\n").unwrap();
        s.pre_commit(2).unwrap()().unwrap();
        s.write(Stream::Late, b"c\n").unwrap(); // epoch 3, never pre-committed
                                                // crash before commit(2): the restore from checkpoint 1 publishes 1, drops 2 and 3
        let mut r = FileSink::open(dir.path(), 2).unwrap();
        r.recover(1, 2).unwrap();
        assert_eq!(read_committed(dir.path(), Stream::Late).unwrap(), ["a"]);
        r.write(Stream::Late, b"b2\n").unwrap();
        r.pre_commit(2).unwrap()().unwrap();
        r.commit(2).unwrap();
        assert_eq!(
            read_committed(dir.path(), Stream::Late).unwrap(),
            ["a", "b2"]
        );
    }

    #[test]
    fn several_epochs_wait_for_their_checkpoints_and_sync_late() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = FileSink::open(dir.path(), 1).unwrap();
        s.write(Stream::Late, b"a\n").unwrap();
        let sync1 = s.pre_commit(1).unwrap();
        // Epoch 2 is written while epoch 1 waits for its upload, and closed too (checkpoint
        // 1 failed, checkpoint 2 will cover both).
        s.write(Stream::Late, b"b\n").unwrap();
        drop(sync1);
        let sync2 = s.pre_commit(2).unwrap();
        s.write(Stream::Late, b"c\n").unwrap();
        sync2().unwrap();
        assert!(read_committed(dir.path(), Stream::Late).unwrap().is_empty());
        s.commit(2).unwrap();
        assert_eq!(
            read_committed(dir.path(), Stream::Late).unwrap(),
            ["a", "b"]
        );
        // Epoch 3 stays pending until a checkpoint covers it; a restore from 2 drops it.
        let _never_run = s.pre_commit(3).unwrap();
        let mut r = FileSink::open(dir.path(), 4).unwrap();
        r.recover(2, 4).unwrap();
        assert_eq!(
            read_committed(dir.path(), Stream::Late).unwrap(),
            ["a", "b"]
        );
        assert!(pending_epochs(dir.path(), Stream::Late).unwrap().is_empty());
    }
}
