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

/// Install (server-side apply, field manager `riffle-e2e`) a CRD and wait, bounded, until the
/// API server serves it. Panics with the API server's refusal.
pub async fn install_crd(
    client: &Client,
    crd: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
) {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::api::{Patch, PatchParams};
    use kube::runtime::wait::{await_condition, conditions};
    let crds: kube::Api<CustomResourceDefinition> = kube::Api::all(client.clone());
    let name = crd.metadata.name.clone().expect("a CRD has a name");
    crds.patch(
        &name,
        &PatchParams::apply("riffle-e2e").force(),
        &Patch::Apply(crd),
    )
    .await
    .unwrap_or_else(|e| panic!("the API server refused the CRD: {e}"));
    tokio::time::timeout(
        std::time::Duration::from_secs(60),
        await_condition(crds, &name, conditions::is_crd_established()),
    )
    .await
    .unwrap_or_else(|_| panic!("CRD {name} not established within 60 s"))
    .unwrap_or_else(|e| panic!("watching CRD {name}: {e}"));
}
