//! Loopback pod IP allocation.
//!
//! Every pod gets its own `127.0.x.y` address (x, y in 1..=254, so `127.0.0.0/24`, used by
//! the control plane and the test bed servers, is never handed out). Allocation is shared by
//! every agent on the machine through lock files: the agent holds an exclusive `flock` on
//! `<dir>/<ip>` while the IP is in use, so an agent that dies frees its addresses implicitly.

use std::collections::HashMap;
use std::fs::{File, OpenOptions, TryLockError};
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::node_agent::{Error, Result};

/// Number of addresses in the pool.
const POOL_SIZE: u32 = 254 * 254;

/// The `n`-th address of the pool.
pub fn pool_address(n: u32) -> Ipv4Addr {
    let n = n % POOL_SIZE;
    Ipv4Addr::new(127, 0, (n / 254 + 1) as u8, (n % 254 + 1) as u8)
}

/// Allocates loopback IPs, coordinated with other agents through a lock directory.
pub struct IpAllocator {
    dir: PathBuf,
    state: Mutex<AllocState>,
}

struct AllocState {
    next: u32,
    held: HashMap<Ipv4Addr, File>,
}

impl IpAllocator {
    /// An allocator whose lock files live in `dir` (created if needed).
    pub fn new(dir: impl Into<PathBuf>) -> Result<Self> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        // Start at a process-dependent offset so concurrent agents rarely probe the same files.
        let next = std::process::id().wrapping_mul(97) % POOL_SIZE;
        Ok(Self {
            dir,
            state: Mutex::new(AllocState {
                next,
                held: HashMap::new(),
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, AllocState> {
        // The state stays consistent even if a holder panicked.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes a free address for `owner` (a label written into the lock file).
    pub fn allocate(&self, owner: &str) -> Result<Ipv4Addr> {
        let mut state = self.lock();
        for step in 0..POOL_SIZE {
            let ip = pool_address(state.next.wrapping_add(step));
            if state.held.contains_key(&ip) {
                continue;
            }
            let path = self.dir.join(ip.to_string());
            let mut file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(|e| Error::io(&path, e))?;
            match file.try_lock() {
                Ok(()) => {
                    file.set_len(0).map_err(|e| Error::io(&path, e))?;
                    writeln!(file, "{} {owner}", std::process::id())
                        .map_err(|e| Error::io(&path, e))?;
                    state.next = state.next.wrapping_add(step + 1);
                    state.held.insert(ip, file);
                    return Ok(ip);
                }
                Err(TryLockError::WouldBlock) => continue,
                Err(TryLockError::Error(e)) => return Err(Error::io(&path, e)),
            }
        }
        Err(Error::IpExhausted)
    }

    /// Frees an address (no-op if it is not held).
    pub fn release(&self, ip: Ipv4Addr) {
        // Dropping the file releases the lock; the file itself stays for the next user.
        self.lock().held.remove(&ip);
    }

    /// Number of addresses currently held by this allocator.
    pub fn held(&self) -> usize {
        self.lock().held.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_skips_network_and_broadcast_like_octets() {
        assert_eq!(pool_address(0), Ipv4Addr::new(127, 0, 1, 1));
        assert_eq!(pool_address(253), Ipv4Addr::new(127, 0, 1, 254));
        assert_eq!(pool_address(254), Ipv4Addr::new(127, 0, 2, 1));
        assert_eq!(pool_address(POOL_SIZE - 1), Ipv4Addr::new(127, 0, 254, 254));
        assert_eq!(pool_address(POOL_SIZE), pool_address(0));
    }

    #[test]
    fn allocators_sharing_a_directory_never_collide() {
        let dir = tempfile::tempdir().unwrap();
        let a = IpAllocator::new(dir.path()).unwrap();
        let b = IpAllocator::new(dir.path()).unwrap();
        let mut seen = std::collections::HashSet::new();
        for i in 0..50 {
            assert!(seen.insert(a.allocate(&format!("a{i}")).unwrap()));
            assert!(seen.insert(b.allocate(&format!("b{i}")).unwrap()));
        }
        assert_eq!(a.held(), 50);
    }

    #[test]
    fn released_addresses_are_reused() {
        let dir = tempfile::tempdir().unwrap();
        let a = IpAllocator::new(dir.path()).unwrap();
        let first = a.allocate("a").unwrap();
        let other = IpAllocator::new(dir.path()).unwrap();
        assert_ne!(other.allocate("other").unwrap(), first);
        a.release(first);
        // A fresh allocator starts at the same offset and finds the freed address first.
        let c = IpAllocator::new(dir.path()).unwrap();
        assert_eq!(c.allocate("c").unwrap(), first);
    }
}
