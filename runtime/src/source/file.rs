//! Newline-delimited files, one per partition: JSON events or the session TSV.

use std::fs::File;
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::PathBuf;

use super::{Polled, Source, SourcePosition};
use crate::config::{FileFormat, FileSourceConfig};
use crate::error::IoContext;
use crate::event::{self, DeadLetter, Validation};
use crate::Result;

struct Partition {
    path: PathBuf,
    reader: BufReader<File>,
    pos: SourcePosition,
    finished: bool,
}

pub struct FileSource {
    format: FileFormat,
    /// Events later than the wall clock at reading + this are rejected.
    max_future_skew: i64,
    parts: Vec<Partition>,
    line: Vec<u8>,
}

impl FileSource {
    pub fn open(cfg: &FileSourceConfig, max_future_skew: i64) -> Result<Self> {
        let mut parts = Vec::new();
        for path in &cfg.paths {
            let file = File::open(path).at(path)?;
            let mut p = Partition {
                path: path.clone(),
                reader: BufReader::with_capacity(1 << 16, file),
                pos: SourcePosition::default(),
                finished: false,
            };
            if cfg.format == FileFormat::SessionTsv {
                skip_header(&mut p)?;
            }
            p.finished = at_eof(&mut p)?;
            parts.push(p);
        }
        Ok(Self {
            format: cfg.format,
            max_future_skew,
            parts,
            line: Vec::new(),
        })
    }
}

fn skip_header(p: &mut Partition) -> Result<()> {
    let mut header = Vec::new();
    let n = p.reader.read_until(b'\n', &mut header).at(&p.path)?;
    p.pos.offset += n as u64;
    p.pos.records += 1;
    Ok(())
}

/// Skip blank lines, then report whether the file is exhausted.
fn at_eof(p: &mut Partition) -> Result<bool> {
    loop {
        let buf = p.reader.fill_buf().at(&p.path)?;
        match buf.first() {
            None => return Ok(true),
            Some(b'\n') => {
                p.reader.consume(1);
                p.pos.offset += 1;
                p.pos.records += 1;
            }
            Some(b'\r') if buf.get(1) == Some(&b'\n') => {
                p.reader.consume(2);
                p.pos.offset += 2;
                p.pos.records += 1;
            }
            Some(_) => return Ok(false),
        }
    }
}

impl Source for FileSource {
    fn partitions(&self) -> u32 {
        self.parts.len() as u32
    }

    fn poll_round(&mut self, per_partition: usize, out: &mut Vec<Polled>) -> Result<()> {
        // Judged against the clock now, not when the source was opened.
        let validation = Validation::at_now(self.max_future_skew);
        for (idx, p) in self.parts.iter_mut().enumerate() {
            for _ in 0..per_partition {
                if p.finished {
                    break;
                }
                self.line.clear();
                let offset = p.pos.offset;
                let n = p.reader.read_until(b'\n', &mut self.line).at(&p.path)?;
                p.pos.offset += n as u64;
                p.pos.records += 1;
                let line_no = p.pos.records;
                let raw = trim_newline(&self.line);
                let parsed = match self.format {
                    FileFormat::Json => event::parse_json(raw, &validation),
                    FileFormat::SessionTsv => event::parse_session_tsv(raw, line_no, &validation),
                };
                p.finished = at_eof(p)?;
                out.push(Polled {
                    partition: idx as u32,
                    record: parsed
                        .map_err(|reason| DeadLetter::new(reason, raw, idx as u32, offset)),
                    last: p.finished,
                });
            }
        }
        Ok(())
    }

    fn is_finished(&self, partition: u32) -> bool {
        self.parts[partition as usize].finished
    }

    fn positions(&self) -> Vec<SourcePosition> {
        self.parts.iter().map(|p| p.pos).collect()
    }

    fn seek(&mut self, positions: &[SourcePosition]) -> Result<()> {
        if positions.len() != self.parts.len() {
            return Err(crate::Error::Config(format!(
                "checkpoint has {} source partitions, the job has {}",
                positions.len(),
                self.parts.len()
            )));
        }
        for (p, pos) in self.parts.iter_mut().zip(positions) {
            p.reader.seek(SeekFrom::Start(pos.offset)).at(&p.path)?;
            p.pos = *pos;
            p.finished = at_eof(p)?;
        }
        Ok(())
    }
}

fn trim_newline(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}
