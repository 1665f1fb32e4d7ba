//! `riffle-operator`: will reconcile `StreamJob` resources (group `riffle.dev`, version
//! `v1alpha1`) into runtime pods. The lifecycle decisions exist (`riffle_operator::upgrade`);
//! the CRD, the reconciler (finalizer, server-side apply) and the `crdgen` binary do not yet.
//! The job spec it will carry is `riffle_config::JobConfig`'s shape.

fn main() {
    eprintln!("riffle-operator: not implemented yet (see the operator issue); nothing to run");
    std::process::exit(2);
}
