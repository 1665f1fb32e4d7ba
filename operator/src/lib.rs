//! The Riffle operator's logic. `upgrade` is the lifecycle state machine (pure, no I/O); the
//! CRD, the reconciler and the binaries that drive them build on it.

pub mod crd;
pub mod upgrade;
