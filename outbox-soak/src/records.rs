//! The writers' history files: one JSON object per line for every business transaction that
//! reached its end (committed, rolled back on purpose, or a commit whose outcome the writer
//! could not know), appended and fsynced in batches.
//!
//! A writer that dies between a commit and the fsync of its record leaves a committed message
//! without a record: the check takes the outbox table as the other witness of commits (a row
//! there is committed by definition; the relays never delete rows, retention is off).

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use outbox::MessageId;
use serde::{Deserialize, Serialize};

/// How a business transaction ended, as its writer saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Outcome {
    /// The commit returned success.
    Committed,
    /// Rolled back on purpose (or the connection failed before the commit: never committed).
    RolledBack,
    /// The commit was sent and failed: it may or may not have committed.
    Uncertain,
}

/// One line of a history file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct WriteRecord {
    /// The message id.
    #[serde(with = "id_text")]
    pub(crate) id: MessageId,
    /// The message key (the order).
    pub(crate) key: String,
    /// The order's sequence number this transaction gave it.
    pub(crate) seq: i64,
    /// How the transaction ended.
    pub(crate) outcome: Outcome,
    /// The writer that ran it.
    pub(crate) writer: u32,
}

/// A message id as its text form in JSON.
mod id_text {
    use outbox::MessageId;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(id: &MessageId, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(id)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<MessageId, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Appends records to a history file and fsyncs them in batches.
pub(crate) struct HistoryWriter {
    out: BufWriter<File>,
    unsynced: usize,
    last_sync: Instant,
}

/// Records written before an fsync at the latest.
const SYNC_EVERY: usize = 200;
/// Time between fsyncs at the longest.
const SYNC_AFTER: Duration = Duration::from_millis(200);

impl HistoryWriter {
    /// Append to `path` (created if missing).
    pub(crate) fn open(path: &Path) -> Result<HistoryWriter> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(HistoryWriter {
            out: BufWriter::new(file),
            unsynced: 0,
            last_sync: Instant::now(),
        })
    }

    /// Append `record`; fsync when the batch is full or old enough.
    pub(crate) fn append(&mut self, record: &WriteRecord) -> Result<()> {
        serde_json::to_writer(&mut self.out, record)?;
        self.out.write_all(b"\n")?;
        self.unsynced += 1;
        if self.unsynced >= SYNC_EVERY || self.last_sync.elapsed() >= SYNC_AFTER {
            self.sync()?;
        }
        Ok(())
    }

    /// Write out and fsync everything appended.
    pub(crate) fn sync(&mut self) -> Result<()> {
        self.out.flush()?;
        self.out.get_ref().sync_data()?;
        self.unsynced = 0;
        self.last_sync = Instant::now();
        Ok(())
    }
}

impl Drop for HistoryWriter {
    fn drop(&mut self) {
        let _ = self.sync();
    }
}

/// The records of one history file, and how many lines could not be read (a line cut short
/// by a crash).
#[derive(Debug, Default)]
pub(crate) struct ReadRecords {
    /// The records, in file order.
    pub(crate) records: Vec<WriteRecord>,
    /// Lines that were not a record.
    pub(crate) unreadable: usize,
}

/// Read the history file at `path` (missing: no records).
pub(crate) fn read(path: &Path) -> Result<ReadRecords> {
    let mut out = ReadRecords::default();
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    for line in BufReader::new(file).lines() {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str(&line) {
            Ok(record) => out.records.push(record),
            Err(_) => out.unreadable += 1,
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_read_back_and_a_line_cut_short_is_counted_not_fatal() {
        let dir = std::env::temp_dir().join(format!("soak-records-{}", MessageId::new()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("w.jsonl");
        let record = WriteRecord {
            id: MessageId::new(),
            key: "order-1".into(),
            seq: 3,
            outcome: Outcome::Uncertain,
            writer: 2,
        };
        {
            let mut w = HistoryWriter::open(&path).unwrap();
            w.append(&record).unwrap();
        }
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"id\":\"0190")
            .unwrap();
        let read = read(&path).unwrap();
        assert_eq!(read.records, vec![record]);
        assert_eq!(read.unreadable, 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
