//! `crds/streamjob.yaml` is what `crdgen` writes from the code: this fails when it is stale.

#[test]
fn crds_dir_matches_the_code() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../crds/streamjob.yaml");
    let on_disk = std::fs::read_to_string(path).unwrap_or_default();
    let generated = riffle_operator::crd::crd_yaml().unwrap();
    assert!(
        on_disk == generated,
        "crds/streamjob.yaml is stale: run `make crds` and commit it"
    );
}
