//! Reaching the local test bed from tests: its admin kubeconfig and a checked client.

use std::path::{Path, PathBuf};
use std::process::Command;

use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

/// What a test says when the test bed is not there.
pub const NOT_RUNNING: &str = "test bed not running: run `make testbed-up`";

/// The admin kubeconfig: `$KUBECONFIG` (as exported by `e2e/testbed/testbed env`), or the
/// one `e2e/testbed/testbed env` prints. Panics with how to start the test bed.
pub fn kubeconfig_path() -> PathBuf {
    if let Some(path) = std::env::var_os("KUBECONFIG").map(PathBuf::from) {
        if path.is_file() {
            return path;
        }
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("testbed/testbed");
    let output = Command::new(&script)
        .arg("env")
        .output()
        .unwrap_or_else(|e| panic!("{NOT_RUNNING} (cannot run {}: {e})", script.display()));
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("export KUBECONFIG="))
        .map(|p| PathBuf::from(p.trim()))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| panic!("{NOT_RUNNING} (no admin kubeconfig)"))
}

/// A client of the test bed's API server, checked to answer. Panics with how to start the
/// test bed.
pub async fn client(kubeconfig: &Path) -> Client {
    crate::install_crypto_provider();
    let kc = Kubeconfig::read_from(kubeconfig).unwrap_or_else(|e| panic!("{NOT_RUNNING} ({e})"));
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .unwrap_or_else(|e| panic!("{NOT_RUNNING} ({e})"));
    let client = Client::try_from(config).unwrap_or_else(|e| panic!("{NOT_RUNNING} ({e})"));
    client
        .apiserver_version()
        .await
        .unwrap_or_else(|e| panic!("{NOT_RUNNING} (API server unreachable: {e})"));
    client
}
