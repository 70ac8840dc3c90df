//! `redirect-agent` built with the test-only feature `test-policy-pad` (another Policy record
//! layout): the "new release" of the upgrade test, tests/tests/upgrade.rs. Same entry point.
include!("../main.rs");
