//! Every Rust block of the README's "The client crate" section is code of `examples/guide.rs`, which
//! `cargo test` compiles: the guide cannot drift from the API.

use std::path::Path;

/// The lines of a text, trimmed, without blank ones.
fn lines(text: &str) -> Vec<&str> {
    text.lines().map(str::trim).filter(|line| !line.is_empty()).collect()
}

#[test]
fn every_rust_block_of_the_client_section_is_in_the_compiled_guide() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("../README.md")).expect("README.md");
    let guide = std::fs::read_to_string(root.join("examples/guide.rs")).expect("examples/guide.rs");
    let start = readme.find("\n## The client crate\n").expect("the client section");
    let section = &readme[start + 1..];
    let section = &section[..section.find("\n## ").unwrap_or(section.len())];
    let blocks: Vec<&str> = section.split("```rust\n").skip(1).map(|rest| &rest[..rest.find("```").expect("a closed block")]).collect();
    assert!(blocks.len() >= 4, "the section shows its code: {} blocks", blocks.len());
    let guide = lines(&guide);
    for block in blocks {
        let block = lines(block);
        assert!(guide.windows(block.len()).any(|window| window == block.as_slice()), "not in examples/guide.rs:\n{}", block.join("\n"));
    }
}
