//! The crate's layers point one way, and no file imports a file that imports it back
//! (ARCHITECTURE.md, "Layers"). Read from the sources: every `crate::`/`super::` path in a
//! file's non-test code is an import of the file that defines what it names.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Source files by their name relative to `src/` (`qcow2/image.rs`).
fn sources() -> BTreeMap<String, String> {
    fn walk(dir: &Path, root: &Path, out: &mut BTreeMap<String, String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, root, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let name = path
                    .strip_prefix(root)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                out.insert(name, std::fs::read_to_string(&path).unwrap());
            }
        }
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out = BTreeMap::new();
    walk(&root, &root, &mut out);
    out
}

/// The code of a file without comments, string literals and its `#[cfg(test)]` module.
fn code(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(at) => &text[..at],
        None => text,
    };
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '/' if chars.peek() == Some(&'/') => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        out.push('\n');
                        break;
                    }
                }
            }
            '"' => {
                let mut escaped = false;
                for c in chars.by_ref() {
                    match c {
                        '\\' if !escaped => escaped = true,
                        '"' if !escaped => break,
                        _ => escaped = false,
                    }
                }
                out.push_str("\"\"");
            }
            '\'' => {
                // A char literal ('x', '\n') or a lifetime ('a): keep lifetimes.
                let rest: String = chars.clone().take(3).collect();
                if rest.starts_with('\\') || rest.chars().nth(1) == Some('\'') {
                    for c in chars.by_ref() {
                        if c == '\'' {
                            break;
                        }
                    }
                    out.push_str("' '");
                } else {
                    out.push(c);
                }
            }
            _ => out.push(c),
        }
    }
    out
}

/// Every path a piece of code names from `crate::` or `super::`, with `use` groups
/// (`use crate::{a::B, c}`) expanded; `super` is kept as a leading segment.
fn named_paths(code: &str) -> Vec<Vec<String>> {
    fn expand(prefix: &[String], text: &str, out: &mut Vec<Vec<String>>) {
        // `text` is a use tree: `a::b::{c, d::{e}}`, `a::B`, `a::b as c`, `*`.
        let text = text.trim();
        if let Some(open) = text.find('{') {
            let mut path = prefix.to_vec();
            path.extend(
                text[..open]
                    .split("::")
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from),
            );
            let inner = &text[open + 1..text.rfind('}').unwrap_or(text.len())];
            let mut depth = 0;
            let mut start = 0;
            for (i, c) in inner.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        expand(&path, &inner[start..i], out);
                        start = i + 1;
                    }
                    _ => {}
                }
            }
            expand(&path, &inner[start..], out);
        } else {
            let text = text.split(" as ").next().unwrap_or("").trim();
            if text.is_empty() {
                return;
            }
            let mut path = prefix.to_vec();
            path.extend(text.split("::").map(|s| s.trim().to_owned()));
            out.push(path);
        }
    }
    let mut out = Vec::new();
    // `use` statements, expanded.
    let mut rest = code;
    while let Some(at) = rest.find("use ") {
        let before = rest[..at].chars().last();
        let after = &rest[at + 4..];
        rest = after;
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let end = after.find(';').unwrap_or(after.len());
        let tree = &after[..end];
        let root = tree.trim_start();
        if root.starts_with("crate::") || root.starts_with("super::") || root.starts_with('{') {
            expand(&[], tree, &mut out);
        }
    }
    // Paths used inline (`crate::chain::resolve_relative(...)`, `super::f(...)`).
    let inline = code
        .match_indices("crate::")
        .chain(code.match_indices("super::"))
        .map(|(at, _)| at)
        .collect::<Vec<_>>();
    for at in inline {
        let before = code[..at].chars().last();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':' || c == '{')
            || code[..at].trim_end().ends_with("use")
            || code[..at].trim_end().ends_with(',')
        {
            continue;
        }
        let path: String = code[at..]
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
            .collect();
        out.push(
            path.split("::")
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect(),
        );
    }
    out
}

/// The directory module a file belongs to (`qcow2/image.rs` -> `qcow2`; `qcow2/mod.rs` ->
/// `qcow2`; `lib.rs` -> ``), and the module the file itself is.
fn module_of(file: &str) -> (String, String) {
    let without = file.trim_end_matches(".rs");
    let parts: Vec<&str> = without.split('/').collect();
    let (dir, me) = match parts.as_slice() {
        [.., last] if *last == "mod" || *last == "lib" => {
            let dir = parts[..parts.len() - 1].join("/");
            (dir.clone(), dir)
        }
        _ => (parts[..parts.len() - 1].join("/"), without.to_owned()),
    };
    (dir, me)
}

/// The file a module path (`qcow2/write`) is defined in, if it is one.
fn module_file(files: &BTreeMap<String, String>, module: &str) -> Option<String> {
    if module.is_empty() {
        return Some("lib.rs".into());
    }
    [format!("{module}.rs"), format!("{module}/mod.rs")]
        .into_iter()
        .find(|f| files.contains_key(f))
}

/// The file defining `item` as re-exported by the module file `file` (`pub use x::Item`),
/// following re-exports down; `file` itself when it does not re-export it.
fn defining_file(files: &BTreeMap<String, String>, file: &str, item: &str, depth: u32) -> String {
    if depth > 8 {
        return file.to_owned();
    }
    let (_, me) = module_of(file);
    let text = code(&files[file]);
    for path in named_paths_of_pub_use(&text) {
        if path.last().map(String::as_str) != Some(item) {
            continue;
        }
        let (module, _) = resolve_module(files, &me, &path[..path.len() - 1]);
        if let Some(next) = module_file(files, &module) {
            if next != file {
                return defining_file(files, &next, item, depth + 1);
            }
        }
    }
    file.to_owned()
}

/// Paths of `pub use` and `pub(crate) use` statements, relative to the module.
fn named_paths_of_pub_use(code: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for statement in code.split(';') {
        let s = statement.trim();
        let tree = s
            .strip_prefix("pub use ")
            .or_else(|| s.strip_prefix("pub(crate) use "));
        if let Some(tree) = tree {
            let mut paths = Vec::new();
            let wrapped = format!("use {tree};");
            for p in named_paths(&wrapped.replace("use ", "use super::DUMMY::")) {
                paths.push(p[2..].to_vec());
            }
            out.extend(paths);
        }
    }
    out
}

/// Resolves a module path relative to module `me` (segments may start with `crate` or
/// `super`); returns the deepest module it names and the rest.
fn resolve_module(
    files: &BTreeMap<String, String>,
    me: &str,
    path: &[String],
) -> (String, Vec<String>) {
    let mut module: Vec<String> = if me.is_empty() {
        Vec::new()
    } else {
        me.split('/').map(String::from).collect()
    };
    let mut rest = path;
    match rest.first().map(String::as_str) {
        Some("crate") => {
            module.clear();
            rest = &rest[1..];
        }
        Some("super") => {
            while rest.first().map(String::as_str) == Some("super") {
                module.pop();
                rest = &rest[1..];
            }
        }
        _ => {}
    }
    let mut i = 0;
    while i < rest.len() {
        let candidate = if module.is_empty() {
            rest[i].clone()
        } else {
            format!("{}/{}", module.join("/"), rest[i])
        };
        if module_file(files, &candidate).is_none() {
            break;
        }
        module.push(rest[i].clone());
        i += 1;
    }
    (module.join("/"), rest[i..].to_vec())
}

/// Which files each file imports.
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let files = sources();
    let mut graph = BTreeMap::new();
    for (file, text) in &files {
        let (_, me) = module_of(file);
        // `super::` in `a/b.rs` names module `a`; in `a/mod.rs` it names the parent of `a`.
        let code = code(text);
        let mut deps = BTreeSet::new();
        for path in named_paths(&code) {
            let (module, rest) = resolve_module(&files, &me, &path);
            let Some(target) = module_file(&files, &module) else {
                continue;
            };
            let target = match rest.first() {
                Some(item) if item != "*" && item != "self" => {
                    defining_file(&files, &target, item, 0)
                }
                _ => target,
            };
            if &target != file && target != "lib.rs" {
                deps.insert(target);
            }
        }
        graph.insert(file.clone(), deps);
    }
    graph
}

#[test]
fn no_file_imports_a_file_that_imports_it_back() {
    let graph = imports();
    // Tarjan's strongly connected components, iteratively simple: for each file, the files
    // reachable from it; a cycle is a file reachable from one of its own imports.
    let mut cycles = BTreeSet::new();
    for start in graph.keys() {
        let mut seen = BTreeSet::new();
        let mut stack: Vec<(String, Vec<String>)> = graph[start]
            .iter()
            .map(|d| (d.clone(), vec![start.clone(), d.clone()]))
            .collect();
        while let Some((file, path)) = stack.pop() {
            if &file == start {
                let mut cycle = path.clone();
                cycle.pop();
                let min = cycle.iter().min().unwrap().clone();
                let at = cycle.iter().position(|f| *f == min).unwrap();
                cycle.rotate_left(at);
                cycles.insert(cycle.join(" -> "));
                continue;
            }
            if !seen.insert(file.clone()) {
                continue;
            }
            for next in graph.get(&file).into_iter().flatten() {
                let mut p = path.clone();
                p.push(next.clone());
                stack.push((next.clone(), p));
            }
        }
    }
    assert!(
        cycles.is_empty(),
        "import cycles:\n{}",
        cycles.into_iter().collect::<Vec<_>>().join("\n")
    );
}

#[test]
fn layers_only_point_down() {
    // What each layer may import, besides itself and the error type: only layers below
    // it (ARCHITECTURE.md, "Layers"). `testing/` and `lib.rs` sit above everything.
    const LEAVES: &[&str] = &["format/", "storage/", "names.rs", "progress.rs"];
    let below = |extra: &[&'static str]| -> Vec<&'static str> {
        LEAVES.iter().chain(extra).copied().collect()
    };
    let allowed: Vec<(&str, Vec<&str>)> = vec![
        ("format/", vec![]),
        ("storage/", vec![]),
        ("names.rs", vec![]),
        ("progress.rs", vec![]),
        ("qcow2/", below(&[])),
        ("layers/", below(&["qcow2/"])),
        ("create/", below(&["qcow2/", "layers/"])),
        ("chain/", below(&["qcow2/", "layers/"])),
        ("ops/", below(&["qcow2/", "layers/", "create/", "chain/"])),
        // The NBD codec is pure like `format/`; the server sits above `ops/`.
        ("nbd/codec/", vec![]),
        (
            "nbd/",
            below(&["qcow2/", "layers/", "create/", "chain/", "ops/"]),
        ),
    ];
    let graph = imports();
    let mut wrong = Vec::new();
    for (file, deps) in &graph {
        let Some((dir, may)) = allowed.iter().find(|(dir, _)| file.starts_with(dir)) else {
            continue;
        };
        for dep in deps {
            let ok =
                dep.starts_with(dir) || dep == "error.rs" || may.iter().any(|m| dep.starts_with(m));
            if !ok {
                wrong.push(format!("{file} imports {dep}"));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against the layers:\n{}",
        wrong.join("\n")
    );
}

#[test]
#[ignore]
fn print_imports() {
    for (file, deps) in imports() {
        println!("{file}: {}", deps.into_iter().collect::<Vec<_>>().join(" "));
    }
}
