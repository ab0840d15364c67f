//! The library's modules import one way only: each folder (or top-level file) may use
//! the modules of lower layers, never one of its own layer or above. This reads the
//! sources, so a new upward import fails here, naming the file and the line.

use std::path::Path;

/// Lowest first. `cmd` (the binary) sits above everything and is not in the library.
const LAYERS: &[&[&str]] = &[
    &["error"],
    &["formats", "layers", "rng", "shim"],
    &["model", "encoders", "dist"],
    &["data", "diffusion", "eval", "optim"],
    &["config"],
    &["train"],
    &["shapes"],
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

/// The files of one folder that a file refers to (`super::name`, `crate::folder::name`),
/// by file stem.
fn sibling_refs(text: &str, folder: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        for prefix in ["super::".to_string(), format!("crate::{folder}::")] {
            let mut rest = code;
            while let Some(at) = rest.find(&prefix) {
                rest = &rest[at + prefix.len()..];
                let name: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                // `super::{a, b}` lists several.
                if name.is_empty() && rest.starts_with('{') {
                    let list = &rest[1..rest.find('}').unwrap_or(rest.len())];
                    out.extend(list.split(',').map(|s| s.trim().split("::").next().unwrap_or("").to_string()));
                } else {
                    out.push(name);
                }
            }
        }
    }
    out
}

/// A path from `from` back to `from` in `edges`, if there is one.
fn cycle_through(from: &str, edges: &std::collections::BTreeMap<String, Vec<String>>) -> Option<Vec<String>> {
    fn walk(at: &str, target: &str, edges: &std::collections::BTreeMap<String, Vec<String>>, path: &mut Vec<String>) -> bool {
        for next in edges.get(at).into_iter().flatten() {
            if next == target {
                return true;
            }
            if !path.contains(next) {
                path.push(next.clone());
                if walk(next, target, edges, path) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    let mut path = vec![from.to_string()];
    walk(from, from, edges, &mut path).then(|| {
        path.push(from.to_string());
        path
    })
}

#[test]
fn no_file_imports_one_that_imports_it_back() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut cycles = Vec::new();
    let mut seen = 0;
    for folder in std::fs::read_dir(&src).unwrap().flatten().filter(|e| e.path().is_dir()) {
        let name = folder.file_name().to_string_lossy().into_owned();
        let mut edges = std::collections::BTreeMap::new();
        let mut files = Vec::new();
        sources(&folder.path(), &mut files);
        let stems: Vec<String> = files.iter().map(|f| f.file_stem().unwrap().to_string_lossy().into_owned()).collect();
        for (f, stem) in files.iter().zip(&stems) {
            // mod.rs is the folder's index: it declares its files and may re-export them.
            if stem == "mod" {
                continue;
            }
            let refs: Vec<String> = sibling_refs(&std::fs::read_to_string(f).unwrap(), &name)
                .into_iter()
                .filter(|r| r != stem && stems.contains(r) && r != "mod")
                .collect();
            seen += refs.len();
            edges.insert(stem.clone(), refs);
        }
        for stem in edges.keys() {
            if let Some(c) = cycle_through(stem, &edges) {
                cycles.push(format!("src/{name}: {}", c.join(" -> ")));
            }
        }
    }
    assert!(seen > 20, "only {seen} references between files of one folder: is the scan broken?");
    assert!(cycles.is_empty(), "files that import each other:\n{}", cycles.join("\n"));
}

#[test]
fn the_folder_scan_sees_a_cycle() {
    let refs = sibling_refs("use super::{prepare::Entry, shards};\nuse crate::data::loader::X; // super::cmd", "data");
    assert_eq!(refs, vec!["prepare", "shards", "loader"]);
    let edges = [("a", vec!["b"]), ("b", vec!["c"]), ("c", vec!["a"]), ("d", vec!["a"])]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.into_iter().map(String::from).collect()))
        .collect();
    assert_eq!(cycle_through("a", &edges), Some(vec!["a".into(), "b".into(), "c".into(), "a".into()]));
    assert_eq!(cycle_through("d", &edges), None);
}
