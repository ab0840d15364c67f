//! The library's modules import one way only: each folder (or top-level file) may use
//! the modules of lower layers, never one of its own layer or above. This reads the
//! sources, so a new upward import fails here, naming the file and the line.

use std::path::Path;

/// Lowest first. `cmd` (the binary) sits above everything and is not in the library.
const LAYERS: &[&[&str]] = &[
    &["error"],
    &["formats", "rng", "shim", "shapes"],
    &["model", "encoders", "dist"],
    &["data", "diffusion", "eval", "optim"],
    &["config"],
    &["train"],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

/// Every `crate::name` in the text of a file, with its line number.
fn crate_refs(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            let name: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            // `$crate::` in macros and `crate::bail_input!` (error's macro) are error's layer.
            let name = if name == "bail_input" { "error".to_string() } else { name };
            out.push((i + 1, name));
        }
    }
    out
}

fn sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn library_modules_import_only_lower_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut bad = Vec::new();
    let mut seen = 0;
    for f in &files {
        let rel = f.strip_prefix(&src).unwrap();
        let first = rel.components().next().unwrap().as_os_str().to_string_lossy().trim_end_matches(".rs").to_string();
        if ["cmd", "main", "lib"].contains(&first.as_str()) {
            continue;
        }
        let Some(mine) = layer_of(&first) else { panic!("src/{}: module {first} has no layer in tests/layers.rs", rel.display()) };
        for (line, name) in crate_refs(&std::fs::read_to_string(f).unwrap()) {
            seen += 1;
            if name == first {
                continue;
            }
            match layer_of(&name) {
                Some(theirs) if theirs < mine => {}
                _ => bad.push(format!("src/{}:{line}: {first} imports {name}", rel.display())),
            }
        }
    }
    assert!(seen > 100, "only {seen} crate:: references found: is the scan broken?");
    assert!(bad.is_empty(), "imports against the layering:\n{}", bad.join("\n"));
}

#[test]
fn the_scan_sees_an_upward_import() {
    let refs = crate_refs("use crate::train::Trainer; // crate::cmd in a comment\nlet x = crate::bail_input!(\"y\");");
    assert_eq!(refs, vec![(1, "train".to_string()), (2, "error".to_string())]);
}
