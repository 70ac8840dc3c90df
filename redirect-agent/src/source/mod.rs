//! Where desired state comes from. Each source produces `reconcile::Snapshot`s.
pub mod file;
pub mod kube;
pub mod watch;
