//! Docs that cannot drift from the code: `docs/architecture.md`'s code map
//! names every source file and nothing else, the docs name only `.rs` files
//! that exist, and the types and functions the architecture cites exist.
//! Reads files only: no binary, no network.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// README.md and every `docs/*.md`, one after another: where the checks
/// that cite the docs by text (the upstream checklist, the conformance
/// allow-list) look.
pub fn all_docs_text(root: &Path) -> String {
    let mut text = fs::read_to_string(root.join("README.md")).unwrap_or_default();
    let mut docs: Vec<PathBuf> = fs::read_dir(root.join("docs"))
        .map(|d| {
            d.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "md")).collect()
        })
        .unwrap_or_default();
    docs.sort();
    for p in docs {
        text.push('\n');
        text.push_str(&fs::read_to_string(&p).unwrap_or_default());
    }
    text
}

/// Every `.rs` file under `dir`, as a path relative to `dir` with `/`.
fn rs_files(dir: &Path, skip: &[&str]) -> BTreeSet<String> {
    fn walk(base: &Path, dir: &Path, skip: &[&str], out: &mut BTreeSet<String>) {
        let Ok(entries) = fs::read_dir(dir) else { return };
        for e in entries.filter_map(|e| e.ok()) {
            let p = e.path();
            let rel = p.strip_prefix(base).unwrap_or(&p).to_string_lossy().replace('\\', "/");
            if skip.iter().any(|s| rel == *s || rel.starts_with(&format!("{s}/"))) {
                continue;
            }
            if p.is_dir() {
                walk(base, &p, skip, out);
            } else if rel.ends_with(".rs") {
                out.insert(rel);
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(dir, dir, skip, &mut out);
    out
}

/// The text of the `## heading` section of `text`, up to the next `## `.
fn section<'a>(text: &'a str, heading: &str) -> &'a str {
    let Some(start) = text.find(&format!("\n## {heading}\n")) else { return "" };
    let rest = &text[start + 1..];
    let end = rest[3..].find("\n## ").map_or(rest.len(), |i| i + 3);
    &rest[..end]
}

/// The first cell of each table row, when it is one backticked name.
fn first_cells(section: &str) -> Vec<String> {
    section
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split_once("` |").map(|(name, _)| name.to_string()))
        .collect()
}

/// Every `<path>.rs` written anywhere in `text` (in backticks or not).
fn rs_names(text: &str) -> BTreeSet<String> {
    let is_name = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '/' | '-' | '.');
    let mut names = BTreeSet::new();
    for (i, _) in text.match_indices(".rs") {
        let after = text[i + 3..].chars().next();
        if after.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue; // `.rsa`, `.rs_x`: not a file name
        }
        let start = text[..i].rfind(|c: char| !is_name(c)).map_or(0, |j| j + 1);
        let name = text[start..i + 3].trim_start_matches("./");
        if name.len() > 3 {
            names.insert(name.to_string());
        }
    }
    names
}

#[test]
fn code_map_names_every_source_file_and_nothing_else() {
    let arch = fs::read_to_string(root().join("docs/architecture.md")).expect("docs/architecture.md");
    let map = first_cells(section(&arch, "Code map"));
    assert!(map.len() >= 40, "only {} rows read from the code map", map.len());
    let src = rs_files(&root().join("src"), &[]);
    let mut problems = Vec::new();
    let mut seen = BTreeSet::new();
    for name in &map {
        if !seen.insert(name.clone()) {
            problems.push(format!("`{name}` is listed twice"));
        }
        if !src.contains(name) {
            problems.push(format!("`{name}` is in the code map but there is no src/{name}"));
        }
    }
    for f in &src {
        if !seen.contains(f) {
            problems.push(format!("src/{f} is missing from the code map (one line: its one job)"));
        }
    }
    assert!(problems.is_empty(), "docs/architecture.md, ## Code map:\n{}", problems.join("\n"));
}

/// A `.rs` name in the README or docs/ is a file of the repository: a path
/// from the root or from `src/`, or the end of one (`fake_server.rs`,
/// `client/wire.rs`). A module removed or renamed fails here until the
/// docs follow.
#[test]
fn docs_name_only_source_files_that_exist() {
    let files = rs_files(&root(), &["target", ".git", "fuzz/target"]);
    assert!(files.iter().any(|f| f == "src/main.rs"), "walked {} files", files.len());
    let exists = |name: &str| files.iter().any(|f| f == name || f.ends_with(&format!("/{name}")));
    let mut docs = vec![root().join("README.md")];
    if let Ok(d) = fs::read_dir(root().join("docs")) {
        docs.extend(d.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "md")));
    }
    docs.sort();
    assert!(docs.len() >= 5, "{docs:?}");
    let mut problems = Vec::new();
    for doc in &docs {
        let text = fs::read_to_string(doc).unwrap();
        for name in rs_names(&text) {
            if !exists(&name) {
                problems
                    .push(format!("{}: `{name}` does not exist", doc.strip_prefix(root()).unwrap_or(doc).display()));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Names of other crates the architecture cites, not ours.
const FOREIGN: &[&str] = &["DeJsonState"];

/// Backticked `Type` and `Type::function` in docs/architecture.md exist in
/// `src/`: a type renamed (or never written) fails here.
#[test]
fn types_and_functions_the_architecture_cites_exist() {
    let arch = fs::read_to_string(root().join("docs/architecture.md")).unwrap();
    let mut src = String::new();
    for f in rs_files(&root().join("src"), &[]) {
        src.push_str(&fs::read_to_string(root().join("src").join(&f)).unwrap());
        src.push('\n');
    }
    let declared = |ty: &str| {
        ["struct", "enum", "trait", "type", "mod"].iter().any(|kw| {
            src.match_indices(&format!("{kw} {ty}"))
                .any(|(i, m)| !src[i + m.len()..].starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_'))
        })
    };
    let has_fn =
        |name: &str| src.match_indices(&format!("fn {name}")).any(|(i, m)| src[i + m.len()..].starts_with(['(', '<']));
    let mut cited = 0;
    let mut problems = Vec::new();
    for token in arch.split('`').skip(1).step_by(2) {
        let (ty, func) = match token.split_once("::") {
            Some((t, f)) => (t, Some(f)),
            None => (token, None),
        };
        let type_like = ty.starts_with(|c: char| c.is_ascii_uppercase())
            && ty.chars().all(|c| c.is_ascii_alphanumeric())
            && ty.chars().any(|c| c.is_ascii_lowercase());
        let fn_like = func.is_none_or(|f| {
            !f.is_empty() && f.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        });
        if !type_like || !fn_like || FOREIGN.contains(&ty) {
            continue;
        }
        cited += 1;
        if !declared(ty) {
            problems.push(format!("`{token}`: no struct, enum, trait or type {ty} in src/"));
        } else if let Some(f) = func {
            if !has_fn(f) {
                problems.push(format!("`{token}`: no fn {f} in src/"));
            }
        }
    }
    assert!(cited >= 20, "only {cited} type names read from docs/architecture.md");
    assert!(problems.is_empty(), "docs/architecture.md:\n{}", problems.join("\n"));
}

/// GitHub's anchor for a heading: lower case, punctuation dropped, spaces
/// to hyphens.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

fn anchors(text: &str) -> BTreeSet<String> {
    let mut in_code = false;
    let mut out = BTreeSet::new();
    for line in text.lines() {
        if line.starts_with("```") {
            in_code = !in_code;
        } else if !in_code && line.starts_with('#') {
            out.insert(slug(line.trim_start_matches('#')));
        }
    }
    out
}

/// Every relative link in the README and docs/ leads to a file that exists
/// and, with `#anchor`, to a heading of that file: moving a section
/// between documents cannot leave a link behind.
#[test]
fn links_between_the_docs_lead_somewhere() {
    let mut docs = vec![root().join("README.md")];
    if let Ok(d) = fs::read_dir(root().join("docs")) {
        docs.extend(d.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "md")));
    }
    docs.sort();
    let mut problems = Vec::new();
    let mut links = 0;
    for doc in &docs {
        let text = fs::read_to_string(doc).unwrap();
        for (i, _) in text.match_indices("](") {
            let rest = &text[i + 2..];
            let Some(end) = rest.find(')') else { continue };
            let target = &rest[..end];
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            links += 1;
            let (path, anchor) = target.split_once('#').unwrap_or((target, ""));
            let file = if path.is_empty() { doc.clone() } else { doc.parent().unwrap().join(path) };
            let name = doc.strip_prefix(root()).unwrap_or(doc).display().to_string();
            let Ok(linked) = fs::read_to_string(&file) else {
                if !file.exists() {
                    problems.push(format!("{name}: link to {target}: no such file"));
                }
                continue;
            };
            if !anchor.is_empty() && !anchors(&linked).contains(anchor) {
                problems.push(format!("{name}: link to {target}: no heading with that anchor"));
            }
        }
    }
    assert!(links >= 20, "only {links} links read");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
