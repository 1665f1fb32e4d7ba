//! `crdgen`: writes the StreamJob CRD (`crds/streamjob.yaml` by default, or the path given).

use anyhow::Context;
use riffle_operator::crd::crd_yaml;

fn main() -> anyhow::Result<()> {
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| concat!(env!("CARGO_MANIFEST_DIR"), "/../crds/streamjob.yaml").into());
    std::fs::write(&path, crd_yaml()?).with_context(|| format!("writing {path}"))?;
    eprintln!("crdgen: wrote {path}");
    Ok(())
}
