//! Where desired state comes from. Each source produces `reconcile::Snapshot`s.
pub mod file;
mod inotify;
pub mod kube;
pub mod watch;
