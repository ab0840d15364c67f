//! The documentation holds: every relative link in README.md and docs/ resolves, every
//! docs page opens with the question it answers, and every subcommand and flag of the
//! README's command sheet is accepted by the binary (its `--help`).

mod common;

use common::{bin, repo};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// README.md and every page under docs/.
fn pages() -> Vec<PathBuf> {
    let mut v = vec![repo().join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(repo().join("docs"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    docs.sort();
    assert!(!docs.is_empty(), "docs/ has no pages");
    v.extend(docs);
    v
}

/// The text outside fenced code blocks, with line numbers.
fn prose(text: &str) -> Vec<(usize, &str)> {
    let mut fenced = false;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        } else if !fenced {
            out.push((i + 1, line));
        }
    }
    out
}

/// The targets of the Markdown links and images of a line: `[text](target)`.
fn link_targets(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = line;
    while let Some(at) = rest.find("](") {
        rest = &rest[at + 2..];
        let Some(end) = rest.find(')') else { break };
        let target = rest[..end].split_whitespace().next().unwrap_or("").trim_matches(|c| c == '<' || c == '>');
        out.push(target.to_string());
        rest = &rest[end..];
    }
    out
}

/// A link to a file of this repository (not a web address, not an anchor of the same page).
fn is_relative(target: &str) -> bool {
    !(target.is_empty() || target.starts_with('#') || target.contains("://") || target.starts_with("mailto:"))
}

#[test]
fn every_relative_link_resolves() {
    let mut broken = Vec::new();
    let mut seen = 0;
    for page in pages() {
        let text = std::fs::read_to_string(&page).unwrap();
        let dir = page.parent().unwrap();
        for (line, content) in prose(&text) {
            for target in link_targets(content).into_iter().filter(|t| is_relative(t)) {
                seen += 1;
                let file = target.split('#').next().unwrap();
                if !dir.join(file).exists() {
                    broken.push(format!("{}:{line}: {target}", page.strip_prefix(repo()).unwrap().display()));
                }
            }
        }
    }
    assert!(seen > 20, "only {seen} relative links found: is the scan broken?");
    assert!(broken.is_empty(), "links that do not resolve:\n{}", broken.join("\n"));
}

#[test]
fn the_link_scan_reads_markdown() {
    assert_eq!(
        link_targets("see [a](docs/x.md#top) and ![p](img.png \"t\") [w](https://x.org)"),
        ["docs/x.md#top", "img.png", "https://x.org"]
    );
    assert!(is_relative("docs/x.md") && !is_relative("#here") && !is_relative("https://x.org"));
    assert_eq!(prose("a\n```\n[x](y)\n```\nb").iter().map(|(_, l)| *l).collect::<Vec<_>>(), ["a", "b"]);
}

#[test]
fn every_docs_page_opens_with_its_question() {
    for page in pages().into_iter().skip(1) {
        let text = std::fs::read_to_string(&page).unwrap();
        let opening: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).take(3).collect();
        assert!(opening.first().is_some_and(|l| l.starts_with("# ")), "{}: no title", page.display());
        assert!(
            opening.iter().skip(1).any(|l| l.trim_end().trim_end_matches(['*', '_']).ends_with('?')),
            "{}: the lines under the title do not ask the page's question:\n{}",
            page.display(),
            opening.join("\n")
        );
    }
}

/// The README's command sheet: the first ```bash block under "## Commands".
fn command_sheet() -> String {
    let text = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let at = text.find("\n## Commands").expect("README.md has a \"## Commands\" section");
    let rest = &text[at..];
    let start = rest.find("```bash\n").expect("a bash block under ## Commands") + "```bash\n".len();
    let end = rest[start..].find("```").expect("the block ends");
    rest[start..start + end].to_string()
}

/// Each `reg-ddp SUBCOMMAND ...` of the sheet (continuation lines joined), with the
/// `--flags` written after it.
fn sheet_calls(sheet: &str) -> BTreeMap<String, Vec<String>> {
    let joined = sheet.replace("\\\n", " ");
    let mut calls: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in joined.lines() {
        let code = line.split(" # ").next().unwrap_or("");
        let words: Vec<&str> = code.split_whitespace().collect();
        let Some(at) = words.iter().position(|w| *w == "reg-ddp" || w.ends_with("/reg-ddp")) else { continue };
        let Some(sub) = words.get(at + 1) else { continue };
        let flags = calls.entry(sub.to_string()).or_default();
        for w in &words[at + 2..] {
            let w = w.trim_start_matches('[');
            if let Some(flag) = w.strip_prefix("--") {
                let name: String = flag.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '-').collect();
                flags.push(format!("--{name}"));
            }
        }
    }
    calls
}

#[test]
fn the_command_sheet_parses() {
    let calls =
        sheet_calls("reg-ddp prepare --images a \\\n    --vae b [--resolution 256]   # c --not-this\nmpirun -np 8 reg-ddp eval --ref x\n");
    assert_eq!(calls["prepare"], ["--images", "--vae", "--resolution"]);
    assert_eq!(calls["eval"], ["--ref"]);
}

#[test]
fn every_command_and_flag_of_the_readme_is_accepted() {
    let calls = sheet_calls(&command_sheet());
    assert!(calls.len() >= 8, "only {} subcommands in the command sheet: is the scan broken? {calls:?}", calls.len());
    let mut unknown = Vec::new();
    for (sub, flags) in &calls {
        let o = bin().args([sub.as_str(), "--help"]).output().unwrap();
        if !o.status.success() {
            unknown.push(format!("reg-ddp {sub}: not a subcommand ({})", String::from_utf8_lossy(&o.stderr).trim()));
            continue;
        }
        let help = String::from_utf8_lossy(&o.stdout);
        for f in flags {
            let known = help.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-')).any(|w| w == f);
            if !known {
                unknown.push(format!("reg-ddp {sub} {f}"));
            }
        }
    }
    assert!(unknown.is_empty(), "the README's command sheet names what the binary does not take:\n{}", unknown.join("\n"));
}

/// The README stays a page a newcomer reads in minutes; the reference lives in docs/.
#[test]
fn the_readme_is_short() {
    let n = std::fs::read_to_string(repo().join("README.md")).unwrap().lines().count();
    assert!(n <= 300, "README.md has {n} lines; move reference material to a page under docs/");
}
