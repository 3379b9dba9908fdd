//! The layer table of docs/architecture.md, checked against the code: no module names a
//! module above it or beside it (`crate::X` anywhere outside comments), and the submodules of
//! `jobs` and `qmp::ops` import each other without circles. Pure file reading: no binary.
#![allow(clippy::unwrap_used)] // test code: unwrap says where a step failed

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers, bottom first. A module may name modules of lower layers only; modules of one
/// layer never name each other. Keep in step with docs/architecture.md.
const LAYERS: &[&[&str]] = &[
    &["sys", "timefmt", "names", "calendar", "crypto"],
    &[
        "chunk", "store", "catalog", "nbd", "qmp", "guestfs", "policy", "notify",
    ],
    &["source"],
    &["error"],
    &["task", "hooks", "auth"],
    &["repo"],
    &["image"],
    &["browse"],
    &["jobs", "fuse"],
    &["ops"],
    &["api"],
    &["cli"],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The code of a file without its comments (line comments, doc comments, block comments) and
/// string literals, so that prose naming a module does not count.
fn code_only(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let b = text.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i..].starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            while i + 1 < b.len() && !b[i..].starts_with(b"*/") {
                i += 1;
            }
            i += 2;
        } else if b[i] == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("\"\"");
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

/// Every `PREFIX::ident` in `code` (the identifiers that follow the prefix).
fn names_after(code: &str, prefix: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = code;
    while let Some(at) = rest.find(prefix) {
        let before = rest[..at].chars().next_back();
        rest = &rest[at + prefix.len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let ident: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        if !ident.is_empty() {
            out.insert(ident);
        }
    }
    // `use crate::{a, b::c}` names several.
    let group = format!("{prefix}{{");
    let mut rest = code;
    while let Some(at) = rest.find(&group) {
        rest = &rest[at + group.len()..];
        // The top-level items of the group: split at commas outside nested braces.
        let (mut depth, mut start) = (0usize, 0usize);
        let mut items = Vec::new();
        for (i, c) in rest.char_indices() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => {
                    items.push(&rest[start..i]);
                    break;
                }
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    items.push(&rest[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        for part in items {
            let ident: String = part
                .trim()
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !ident.is_empty() && ident != "self" {
                out.insert(ident);
            }
        }
    }
    out
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The top-level module of a file under src/ (`jobs` for src/jobs/gc.rs, `sys` for src/sys.rs).
fn top_module(rel: &Path) -> String {
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy()
        .to_string();
    first.trim_end_matches(".rs").to_string()
}

#[test]
fn no_module_imports_a_module_above_or_beside_it() {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let mut bad = Vec::new();
    let mut unknown = BTreeSet::new();
    for f in &files {
        let rel = f.strip_prefix(src()).unwrap();
        let me = top_module(rel);
        if me == "lib" || me == "main" {
            continue;
        }
        let Some(mine) = layer_of(&me) else {
            unknown.insert(me);
            continue;
        };
        let code = code_only(&std::fs::read_to_string(f).unwrap());
        for used in names_after(&code, "crate::") {
            if used == me || used == "Error" || used == "Result" {
                continue;
            }
            match layer_of(&used) {
                Some(l) if l < mine => {}
                Some(_) => bad.push(format!("{} uses crate::{used}", rel.display())),
                None => {
                    unknown.insert(used);
                }
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "modules missing from the layer table: {unknown:?}"
    );
    assert!(
        bad.is_empty(),
        "imports against the layer table:\n{}",
        bad.join("\n")
    );
}

/// The submodules of `dir` (a module directory) and which of them each one names, through
/// `super::X` or `crate::PATH::X`.
fn submodule_graph(dir: &str, path: &str) -> BTreeMap<String, BTreeSet<String>> {
    let root = src().join(dir);
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    let subs: BTreeSet<String> = files
        .iter()
        .map(|f| top_module(f.strip_prefix(&root).unwrap()))
        .filter(|m| m != "mod" && m != "tests")
        .collect();
    let mut graph = BTreeMap::new();
    for f in &files {
        let rel = f.strip_prefix(&root).unwrap();
        let me = top_module(rel);
        if !subs.contains(&me) {
            continue;
        }
        let code = code_only(&std::fs::read_to_string(f).unwrap());
        // In a directory module (`snapshot/create.rs`), `super::` is the submodule itself.
        let nested = rel.components().count() > 1;
        let mut used = names_after(&code, &format!("crate::{path}::"));
        if !nested {
            used.extend(names_after(&code, "super::"));
        }
        used.retain(|u| subs.contains(u) && *u != me);
        graph.entry(me).or_insert_with(BTreeSet::new).extend(used);
    }
    graph
}

/// A circle in `graph`, if there is one.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = stack.iter().position(|s| s == n) {
            let mut c = stack[i..].to_vec();
            c.push(n.to_string());
            return Some(c);
        }
        if done.contains(n) {
            return None;
        }
        stack.push(n.to_string());
        for m in g.get(n).into_iter().flatten() {
            if let Some(c) = visit(m, g, stack, done) {
                return Some(c);
            }
        }
        stack.pop();
        done.insert(n.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for n in graph.keys() {
        if let Some(c) = visit(n, graph, &mut Vec::new(), &mut done) {
            return Some(c);
        }
    }
    None
}

#[test]
fn jobs_and_qemu_operations_have_no_circles() {
    for (dir, path) in [("jobs", "jobs"), ("qmp/ops", "qmp::ops")] {
        let g = submodule_graph(dir, path);
        assert!(g.len() > 3, "{dir}: found {g:?}");
        if let Some(c) = find_cycle(&g) {
            panic!("{dir}: a circle of imports: {}", c.join(" -> "));
        }
    }
}

#[test]
fn the_checker_sees_what_it_checks() {
    let code = code_only(
        "use crate::{a, b::{c, z}, f};\n// crate::hidden\nlet x = crate::d::e(\"crate::s\");",
    );
    let got: Vec<String> = names_after(&code, "crate::").into_iter().collect();
    assert_eq!(got, ["a", "b", "d", "f"]);
    let mut g = BTreeMap::new();
    g.insert("x".to_string(), BTreeSet::from(["y".to_string()]));
    g.insert("y".to_string(), BTreeSet::from(["x".to_string()]));
    assert!(find_cycle(&g).is_some());
}
