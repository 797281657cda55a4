//! Paths inside this repository, so tests find the shipped mappings,
//! schemas and scripts wherever cargo runs them from.

use std::path::PathBuf;

/// `relative` under the crate root.
pub fn repo_path(relative: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(relative)
}
