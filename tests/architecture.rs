//! Holds the crate's layout to what `src/lib.rs` writes down: every room imports only the
//! rooms its line in the `//!` map names after the arrow, no two files import each other
//! through any chain, every file stays under the size limit, and an enrollment's counters and
//! state are written only by the telemetry events. Reads the sources as text; needs nothing
//! running.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// Lines of code (not blank, not comments, tests below `#[cfg(test)]` not counted).
const MAX_LINES_OF_CODE: usize = 400;

/// Calls that change an enrollment's live status or its per-message metrics, and the only
/// files allowed to make them: the status itself and the events that are its one writer.
const STATUS_WRITES: [&str; 17] = [
    ".record_hold(",
    ".release_hold(",
    ".clear_in_flight(",
    ".record_delivered(",
    ".record_failed(",
    ".record_retry(",
    ".record_dropped(",
    ".record_rejected(",
    ".add_in_flight(",
    ".set_state(",
    ".set_breaker(",
    ".set_failure_outcome(",
    ".set_last_error(",
    ".post_attempt(",
    ".redelivery(",
    ".message_age(",
    ".delivery(OutcomeLabel",
];
const STATUS_WRITERS: [&str; 2] = ["src/telemetry/events.rs", "src/enrollment/status.rs"];

struct SourceFile {
    /// Relative to the crate root, e.g. `src/amqp/link.rs`.
    path: String,
    /// Module path, e.g. `["amqp", "link"]`; empty for `lib.rs`.
    module: Vec<String>,
    /// The code above `#[cfg(test)]`, comment lines removed.
    code: String,
}

fn crate_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn module_of(relative: &Path) -> Vec<String> {
    let mut parts: Vec<String> = relative
        .iter()
        .skip(1) // src
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().unwrap_or_default();
    let stem = last.trim_end_matches(".rs");
    if stem != "mod" && stem != "lib" {
        parts.push(stem.to_string());
    }
    parts
}

fn code_of(text: &str) -> String {
    let above_tests = text.split("\n#[cfg(test)]").next().unwrap_or(text);
    above_tests
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn sources() -> Vec<SourceFile> {
    let root = crate_root();
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    files
        .into_iter()
        .filter(|p| !p.ends_with("main.rs"))
        .map(|p| {
            let relative = p.strip_prefix(&root).expect("under the crate root");
            let text = fs::read_to_string(&p).expect("readable source");
            SourceFile {
                path: relative.to_string_lossy().into_owned(),
                module: module_of(relative),
                code: code_of(&text),
            }
        })
        .collect()
}

/// Every `crate::…` and `super::…` path the code names, `use` trees expanded.
fn named_paths(code: &str) -> Vec<Vec<String>> {
    let mut paths = Vec::new();
    let bytes = code.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let rest = &code[i..];
        let starts_word = i == 0 || !is_ident(bytes[i - 1]);
        let head = ["crate::", "super::"]
            .into_iter()
            .find(|h| rest.starts_with(h));
        match head {
            Some(h) if starts_word => {
                let (mut found, used) = parse_tree(rest);
                paths.append(&mut found);
                i += used.max(h.len());
            }
            _ => i += 1,
        }
    }
    paths
}

fn is_ident(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// Parses `a::b::{c, d::e}` from the start of `text`: the expanded paths and the bytes used.
fn parse_tree(text: &str) -> (Vec<Vec<String>>, usize) {
    let bytes = text.as_bytes();
    let mut prefix = Vec::new();
    let mut i = 0;
    loop {
        let start = i;
        while i < bytes.len() && is_ident(bytes[i]) {
            i += 1;
        }
        if i > start {
            prefix.push(text[start..i].to_string());
        }
        if text[i..].starts_with("::") {
            i += 2;
            if text[i..].starts_with('{') {
                i += 1;
                let mut out = Vec::new();
                loop {
                    while i < bytes.len() && (bytes[i] as char).is_whitespace() {
                        i += 1;
                    }
                    if i >= bytes.len() || bytes[i] == b'}' {
                        i += 1;
                        break;
                    }
                    let (inner, used) = parse_tree(&text[i..]);
                    for mut path in inner {
                        let mut full = prefix.clone();
                        full.append(&mut path);
                        out.push(full);
                    }
                    if out.is_empty() {
                        out.push(prefix.clone());
                    }
                    i += used.max(1);
                    while i < bytes.len() && (bytes[i] as char).is_whitespace() {
                        i += 1;
                    }
                    if i < bytes.len() && bytes[i] == b',' {
                        i += 1;
                    }
                }
                return (out, i);
            }
            continue;
        }
        return (vec![prefix], i);
    }
}

/// The deepest module file a path leads into, as a module path.
fn resolve(from: &[String], path: &[String], modules: &BTreeSet<Vec<String>>) -> Vec<String> {
    let mut base: Vec<String> = Vec::new();
    let mut segments = path.iter().peekable();
    match segments.peek().map(|s| s.as_str()) {
        Some("crate") => {
            segments.next();
        }
        Some("super") => {
            // In `x/mod.rs` (module `x`) and in `x.rs` alike, `super` is `x`'s parent.
            base = from.to_vec();
            while segments.peek().map(|s| s.as_str()) == Some("super") {
                segments.next();
                base.pop();
            }
        }
        _ => {}
    }
    for segment in segments {
        let mut next = base.clone();
        next.push(segment.clone());
        if modules.contains(&next) {
            base = next;
        } else {
            break;
        }
    }
    base
}

fn room_of(module: &[String]) -> String {
    module.first().cloned().unwrap_or_else(|| "lib".into())
}

/// The map in `lib.rs`: `//! - [`room`] → a, b: what it owns`.
fn written_direction() -> BTreeMap<String, BTreeSet<String>> {
    let lib = fs::read_to_string(crate_root().join("src/lib.rs")).expect("lib.rs");
    let mut rooms = BTreeMap::new();
    for line in lib.lines() {
        let Some(entry) = line.strip_prefix("//! - [`") else {
            continue;
        };
        let Some((room, rest)) = entry.split_once("`]") else {
            continue;
        };
        let Some(after_arrow) = rest.trim_start().strip_prefix('→') else {
            continue;
        };
        let targets = after_arrow.split(':').next().unwrap_or("");
        let allowed: BTreeSet<String> = targets
            .split(',')
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty() && t != "(nothing)")
            .collect();
        rooms.insert(room.to_string(), allowed);
    }
    rooms
}

struct Graph {
    /// File module path → module paths it names, with the file that names it.
    edges: BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
}

fn graph(files: &[SourceFile]) -> Graph {
    let modules: BTreeSet<Vec<String>> = files.iter().map(|f| f.module.clone()).collect();
    let mut edges = BTreeMap::new();
    for f in files {
        let targets: BTreeSet<Vec<String>> = named_paths(&f.code)
            .iter()
            .map(|p| resolve(&f.module, p, &modules))
            .filter(|t| *t != f.module && !t.is_empty())
            .collect();
        edges.insert(f.module.clone(), targets);
    }
    Graph { edges }
}

#[test]
fn the_written_direction_covers_every_room_and_has_no_circle() {
    let rooms = written_direction();
    let files = sources();
    for f in &files {
        let room = room_of(&f.module);
        if room != "lib" {
            assert!(
                rooms.contains_key(&room),
                "{}: room `{room}` has no line in lib.rs's map",
                f.path
            );
        }
    }
    // Rank the rooms: a room's rank is above every room it may import.
    let mut ranked: BTreeSet<String> = BTreeSet::new();
    while ranked.len() < rooms.len() {
        let next: Vec<String> = rooms
            .iter()
            .filter(|(r, allowed)| {
                !ranked.contains(*r) && allowed.iter().all(|a| ranked.contains(a))
            })
            .map(|(r, _)| r.clone())
            .collect();
        assert!(
            !next.is_empty(),
            "lib.rs's map has a circle among: {:?}",
            rooms
                .keys()
                .filter(|r| !ranked.contains(*r))
                .collect::<Vec<_>>()
        );
        ranked.extend(next);
    }
    assert!(
        rooms.get("amqp").is_some_and(|a| !a.contains("delivery"))
            && rooms.get("delivery").is_some_and(|a| !a.contains("amqp")),
        "amqp and delivery must never import each other"
    );
}

#[test]
fn every_import_follows_the_written_direction() {
    let rooms = written_direction();
    let files = sources();
    let g = graph(&files);
    let mut wrong = Vec::new();
    for f in &files {
        let from = room_of(&f.module);
        if from == "lib" {
            continue;
        }
        for target in &g.edges[&f.module] {
            let to = room_of(target);
            if to != from && !rooms[&from].contains(&to) {
                wrong.push(format!(
                    "{} imports {} ({from} → {to})",
                    f.path,
                    target.join("::")
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against lib.rs's map:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn no_two_files_import_each_other_through_any_chain() {
    let files = sources();
    let g = graph(&files);
    // Depth-first search with colours; a grey node reached again closes a circle.
    #[derive(Clone, Copy, PartialEq)]
    enum Colour {
        White,
        Grey,
        Black,
    }
    let mut colour: BTreeMap<Vec<String>, Colour> =
        g.edges.keys().map(|k| (k.clone(), Colour::White)).collect();
    fn visit(
        node: &Vec<String>,
        g: &Graph,
        colour: &mut BTreeMap<Vec<String>, Colour>,
        stack: &mut Vec<Vec<String>>,
    ) -> Option<Vec<Vec<String>>> {
        colour.insert(node.clone(), Colour::Grey);
        stack.push(node.clone());
        for next in g.edges.get(node).into_iter().flatten() {
            match colour.get(next).copied() {
                Some(Colour::Grey) => {
                    let start = stack.iter().position(|n| n == next).unwrap_or(0);
                    let mut circle = stack[start..].to_vec();
                    circle.push(next.clone());
                    return Some(circle);
                }
                Some(Colour::White) => {
                    if let Some(c) = visit(next, g, colour, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        colour.insert(node.clone(), Colour::Black);
        None
    }
    let nodes: Vec<Vec<String>> = g.edges.keys().cloned().collect();
    for node in nodes {
        if colour[&node] == Colour::White {
            let mut stack = Vec::new();
            if let Some(circle) = visit(&node, &g, &mut colour, &mut stack) {
                let shown: Vec<String> = circle
                    .iter()
                    .map(|m| {
                        if m.is_empty() {
                            "crate".into()
                        } else {
                            m.join("::")
                        }
                    })
                    .collect();
                panic!("import circle: {}", shown.join(" → "));
            }
        }
    }
}

#[test]
fn files_stay_under_the_size_limit() {
    let mut large = Vec::new();
    for f in sources() {
        let loc = f.code.lines().filter(|l| !l.trim().is_empty()).count();
        if loc > MAX_LINES_OF_CODE {
            large.push(format!("{}: {loc} lines of code", f.path));
        }
    }
    assert!(
        large.is_empty(),
        "files over {MAX_LINES_OF_CODE} lines of code:\n{}",
        large.join("\n")
    );
}

#[test]
fn status_and_per_message_metrics_have_one_writer() {
    let mut wrong = Vec::new();
    for f in sources() {
        if STATUS_WRITERS.contains(&f.path.as_str()) {
            continue;
        }
        for call in STATUS_WRITES {
            if f.code.contains(call) {
                wrong.push(format!("{} calls {call}…)", f.path));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "only the telemetry events may write an enrollment's status and metrics:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_parser_sees_use_trees_and_inline_paths() {
    let code = "use crate::a::{b::C, d};\nfn f() { super::e::g(); let x = my_crate::z; }";
    let paths: Vec<String> = named_paths(code).iter().map(|p| p.join("::")).collect();
    assert_eq!(paths, ["crate::a::b::C", "crate::a::d", "super::e::g"]);
}
