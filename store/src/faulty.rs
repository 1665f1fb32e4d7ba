//! A store that fails the operations a rule picks: for tests of error paths (a crash between
//! two uploads, an outage during a savepoint) without a real outage.

use std::path::Path;

use crate::{ObjectStore, Result, StoreError};

/// The kind of a store operation, for fault rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Put,
    Get,
    Copy,
    List,
    Delete,
}

impl Op {
    /// Whether the operation changes the store.
    pub fn writes(self) -> bool {
        matches!(self, Op::Put | Op::Copy | Op::Delete)
    }
}

type Rule = Box<dyn Fn(Op, &str) -> bool + Send + Sync>;

/// Wraps a store; an operation for which `rule(op, key)` is true fails with an injected
/// error instead of running.
pub struct FaultyStore<S> {
    inner: S,
    rule: Rule,
}

impl<S: ObjectStore> FaultyStore<S> {
    pub fn new(inner: S, rule: impl Fn(Op, &str) -> bool + Send + Sync + 'static) -> Self {
        Self {
            inner,
            rule: Box::new(rule),
        }
    }

    fn check(&self, op: Op, key: &str) -> Result<()> {
        if (self.rule)(op, key) {
            return Err(StoreError::S3 {
                op: "injected",
                location: self.inner.location(key),
                message: format!("injected failure of {op:?}"),
            });
        }
        Ok(())
    }
}

impl<S: ObjectStore> ObjectStore for FaultyStore<S> {
    fn put_file(&self, key: &str, local: &Path) -> Result<()> {
        self.check(Op::Put, key)?;
        self.inner.put_file(key, local)
    }
    fn put_bytes(&self, key: &str, bytes: &[u8]) -> Result<()> {
        self.check(Op::Put, key)?;
        self.inner.put_bytes(key, bytes)
    }
    fn get_file(&self, key: &str, local: &Path) -> Result<()> {
        self.check(Op::Get, key)?;
        self.inner.get_file(key, local)
    }
    fn get_bytes(&self, key: &str) -> Result<Vec<u8>> {
        self.check(Op::Get, key)?;
        self.inner.get_bytes(key)
    }
    fn copy(&self, from: &str, to: &str) -> Result<()> {
        self.check(Op::Copy, to)?;
        self.inner.copy(from, to)
    }
    fn list(&self, prefix: &str) -> Result<Vec<String>> {
        self.check(Op::List, prefix)?;
        self.inner.list(prefix)
    }
    fn delete(&self, key: &str) -> Result<()> {
        self.check(Op::Delete, key)?;
        self.inner.delete(key)
    }
    fn location(&self, key: &str) -> String {
        self.inner.location(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FileStore;

    #[test]
    fn the_rule_picks_what_fails() {
        let dir = tempfile::tempdir().unwrap();
        let s = FaultyStore::new(FileStore::new(dir.path()).unwrap(), |op, key| {
            op.writes() && key.ends_with(".json")
        });
        s.put_bytes("a.sst", b"x").unwrap();
        assert!(s.put_bytes("m.json", b"{}").is_err());
        assert_eq!(s.list("").unwrap(), ["a.sst"]);
        assert!(s.delete("m.json").is_err());
    }
}
