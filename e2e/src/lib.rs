//! Riffle's local test bed support.
//!
//! The main piece is [`node_agent`]: a small kubelet that registers a Node with a real
//! control plane and runs the pods bound to it as local processes (see `e2e/README.md`).
//! [`testenv`] gives end-to-end tests (of any crate) a namespace and a node agent of their
//! own on the test bed; [`testbed`] reaches the test bed itself.

pub mod node_agent;
pub mod testbed;
pub mod testenv;

/// Installs rustls' `ring` crypto provider as the process default.
///
/// The dependency graph enables both `ring` and `aws-lc-rs`, so rustls cannot pick one on
/// its own and kube clients would panic. Call this before building a client; repeated
/// calls are harmless.
pub fn install_crypto_provider() {
    // Err means a provider is already installed, which is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
}
