//! The repository's conformance cases (`conformance/*.json`, format in `conformance/README.md`): the
//! wire contract as JSON steps that every implementation, server or client, must pass.

use std::path::{Path, PathBuf};

/// Fewer case files than this means the folder is missing or emptied: a run must fail.
pub const MIN_CASES: usize = 25;

/// The tenant of a case that names none.
pub const DEFAULT_TENANT: &str = "conformance";

/// The case files of `folder`, in name order.
pub fn case_files(folder: &Path) -> Vec<PathBuf> {
    let entries = std::fs::read_dir(folder).unwrap_or_else(|error| panic!("reading {}: {error}", folder.display()));
    let mut files: Vec<PathBuf> =
        entries.map(|entry| entry.expect("a directory entry").path()).filter(|path| path.extension().is_some_and(|ext| ext == "json")).collect();
    files.sort();
    files
}
