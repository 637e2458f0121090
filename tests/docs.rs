//! What the user-facing docs (README.md, docs/operations.md, docs/architecture.md) name exists:
//! every `seinode-tls` command and flag in the binary's `--help`, every chart value in
//! values.yaml, every metric in the registry the server commands export, and every link to a
//! file of the repository, with its anchor, resolves. A stale sentence in the docs fails here.

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

const USER_DOCS: [&str; 3] = ["README.md", "docs/operations.md", "docs/architecture.md"];

/// Flags of other programs the docs show in commands, by program.
const FOREIGN_FLAGS: &[(&str, &[&str])] = &[
    (
        "kubectl",
        &[
            "--server-side",
            "--dry-run",
            "--for",
            "--timeout",
            "--namespace",
            "--as",
            "--type",
            "--from-file",
            "--cert",
            "--key",
            "--image",
            "--rm",
            "--restart",
            "--overrides",
        ],
    ),
    (
        "docker (docs: the CLI from the image)",
        &["--rm", "--network", "--user"],
    ),
    (
        "helm",
        &[
            "--set",
            "--set-file",
            "--set-string",
            "--create-namespace",
            "--wait",
            "--reuse-values",
            "--skip-crds",
            "--logs",
            "--namespace",
            "--timeout",
        ],
    ),
    ("curl", &["--cacert", "--cert", "--key"]),
    (
        "cargo",
        &[
            "--bench",
            "--no-default-features",
            "--features",
            "--locked",
            "--all-targets",
            "--test",
            "--nocapture",
            "--path",
            "--check",
        ],
    ),
    (
        "kube-rbac-proxy",
        &[
            "--client-ca-file",
            "--ignore-paths",
            "--auth-header-fields-enabled",
            "--auth-token-audiences",
        ],
    ),
    (
        "aws, gcloud (docs: network policy)",
        &["--subnet-ids", "--query", "--name", "--format"],
    ),
    (
        "kube-controller-manager",
        &[
            "--use-service-account-credentials",
            "--root-ca-file",
            "--service-account-private-key-file",
            "--controllers",
        ],
    ),
    ("kube-apiserver", &["--enable-aggregator-routing"]),
    ("etcd", &["--unsafe-no-fsync"]),
    ("unshare", &["--uts", "--ipc"]),
    ("seid (the node's own flags)", &["--home"]),
    (
        "benchmarks (cargo bench -- ...)",
        &[
            "--nodes",
            "--secrets",
            "--late",
            "--steady",
            "--floor",
            "--duration",
            "--rounds",
            "--concurrency",
            "--max-requests",
            "--hung",
            "--warmup",
            "--floor-write",
            "--floor-watches",
            "--replicas",
            "--call-graph",
        ],
    ),
];

/// Words after "seinode-tls " in the docs that are not a command: prose, paths, example output,
/// and the hidden `stand-in` command (in `local` builds only; it does not list itself in
/// `--help`).
const NOT_COMMANDS: [&str; 7] = ["binary", "charts", "is", "may", "on", "sidecar", "stand-in"];

/// Names the upgrade notes mention because they are gone: each must indeed be gone (checked
/// below), and only these may be named without existing.
const RETIRED_VALUES: [&str; 2] = [
    "monitoring.prometheusRule.expiryWarningSeconds",
    "monitoring.prometheusRule.servingCertificateExpiryWarningSeconds",
];
const RETIRED_METRICS: [&str; 1] = ["seinode_tls_controller_tls_certificate_expiry_seconds"];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn seinode_tls(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_seinode-tls"))
        .args(args)
        .output()
        .expect("run seinode-tls");
    assert!(out.status.success(), "seinode-tls {args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// Every command's flags, with the global ones (the top-level `--help`'s) in each.
fn flags_by_command(commands: &BTreeSet<String>) -> BTreeMap<String, BTreeSet<String>> {
    let global = flags_in(&seinode_tls(&["--help"]));
    commands
        .iter()
        .map(|command| {
            let mut flags = flags_in(&seinode_tls(&[command, "--help"]));
            flags.extend(global.iter().cloned());
            (command.clone(), flags)
        })
        .collect()
}

/// The command lines of a document that run `seinode-tls COMMAND` (a `\`-continued line is one
/// line): the command and what follows it, up to a pipe, the end of a code span or a comment.
fn command_lines<'a>(text: &str, commands: &'a BTreeSet<String>) -> Vec<(&'a String, String)> {
    let joined = text.replace("\\\n", " ");
    let mut lines = Vec::new();
    for line in joined.lines() {
        for (at, _) in line.match_indices("seinode-tls ") {
            let rest = &line[at + "seinode-tls ".len()..];
            let word: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            if let Some(command) = commands.get(&word) {
                // Up to the next command of the line (a pipe, `&&`, `;`), the end of a code
                // span, or a comment.
                let args = rest[word.len()..]
                    .split(['|', '`', '#', ';', '&'])
                    .next()
                    .unwrap_or("")
                    .to_owned();
                lines.push((command, args));
            }
        }
    }
    lines
}

/// The binary's subcommands (as `--help` lists them) and every flag of it and of them.
fn commands_and_flags() -> (BTreeSet<String>, BTreeSet<String>) {
    let top = seinode_tls(&["--help"]);
    let commands: BTreeSet<String> = top
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_owned)
        .collect();
    assert!(commands.contains("contract"), "{top}");
    let mut flags = flags_in(&top);
    for command in &commands {
        flags.extend(flags_in(&seinode_tls(&[command, "--help"])));
    }
    (commands, flags)
}

/// The `--flag` words of a text.
fn flags_in(text: &str) -> BTreeSet<String> {
    let mut flags = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("--") {
        let start = i + at;
        let before = start.checked_sub(1).map(|b| bytes[b]);
        let flag: String = text[start + 2..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
            .collect();
        i = start + 2 + flag.len();
        let word_start = before.is_none_or(|b| !(b.is_ascii_alphanumeric() || b == b'-'));
        if word_start && flag.starts_with(|c: char| c.is_ascii_lowercase()) {
            flags.insert(format!("--{flag}"));
        }
    }
    flags
}

#[test]
fn every_flag_and_command_the_docs_name_exists() {
    let (commands, flags) = commands_and_flags();
    let foreign: BTreeSet<&str> = FOREIGN_FLAGS
        .iter()
        .flat_map(|(_, f)| f.iter().copied())
        .collect();
    let mut missing = Vec::new();
    for doc in USER_DOCS {
        let text = read(doc);
        for flag in flags_in(&text) {
            if !flags.contains(&flag) && !foreign.contains(flag.as_str()) {
                missing.push(format!("{doc}: {flag}"));
            }
        }
        // `seinode-tls WORD`: WORD is a command, a hidden one, or a word of prose.
        for (at, _) in text.match_indices("seinode-tls ") {
            let word: String = text[at + "seinode-tls ".len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            let command = word.starts_with(|c: char| c.is_ascii_lowercase());
            if command && !commands.contains(&word) && !NOT_COMMANDS.contains(&word.as_str()) {
                missing.push(format!("{doc}: seinode-tls {word}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "the docs name flags or commands seinode-tls does not have (and no other program listed \
         in FOREIGN_FLAGS): {missing:#?}"
    );
}

/// A flag given to `seinode-tls COMMAND` on a command line of the docs is that command's (or a
/// global one), whatever other programs call their flags.
#[test]
fn every_command_line_of_the_docs_uses_its_commands_flags() {
    let (commands, _) = commands_and_flags();
    let by_command = flags_by_command(&commands);
    let mut wrong = Vec::new();
    let mut lines = 0;
    for doc in USER_DOCS {
        for (command, args) in command_lines(&read(doc), &commands) {
            lines += 1;
            for flag in flags_in(&args) {
                if !by_command[command].contains(&flag) {
                    wrong.push(format!("{doc}: seinode-tls {command} ... {flag}"));
                }
            }
        }
    }
    assert!(lines > 10, "{lines} command lines found");
    assert!(
        wrong.is_empty(),
        "flags their command does not have: {wrong:#?}"
    );
}

/// The chart values the docs name: `a.b.c` in a code span whose first part is a top-level
/// value (file names such as `tls.crt` aside), and every `--set a.b=...`, exist in the chart's
/// values.schema.json, which describes every value, also those values.yaml leaves unset.
#[test]
fn every_chart_value_the_docs_name_exists() {
    let schema: Value =
        serde_json::from_str(&read("charts/seinode-tls/values.schema.json")).unwrap();
    let top: BTreeSet<&str> = schema["properties"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let mut missing = Vec::new();
    for doc in USER_DOCS.iter().chain(&["examples/README.md"]) {
        let text = read(doc);
        let mut named = BTreeSet::new();
        for span in text.split('`').skip(1).step_by(2) {
            named.insert(span.to_owned());
        }
        for (at, _) in text.match_indices("--set ") {
            let rest = &text[at + "--set ".len()..];
            named.insert(rest.split_whitespace().next().unwrap_or("").to_owned());
        }
        for name in named {
            let path = name.split('=').next().unwrap();
            let parts: Vec<&str> = path.split('.').collect();
            let looks_like_a_value = parts.len() > 1
                && top.contains(parts[0])
                && parts
                    .iter()
                    .all(|p| *p == "*" || p.chars().all(|c| c.is_ascii_alphanumeric()));
            let a_file = [".rs", ".yaml", ".md", ".json", ".crt", ".key", ".pem"]
                .iter()
                .any(|e| path.ends_with(e));
            if !looks_like_a_value || a_file {
                continue;
            }
            let exists = schema_has(&schema, &parts);
            if RETIRED_VALUES.contains(&path) {
                assert!(!exists, "{path} is listed as retired but exists");
            } else if !exists {
                missing.push(format!("{doc}: {path}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "the docs name chart values that values.yaml does not have: {missing:#?}"
    );
}

/// Whether the values schema describes the value at `parts` (up to a `*`).
fn schema_has(schema: &Value, parts: &[&str]) -> bool {
    let mut at = schema;
    for part in parts.iter().take_while(|p| **p != "*") {
        match at["properties"].get(part) {
            Some(next) => at = next,
            None => return false,
        }
    }
    true
}

/// Crate names share the metrics' prefix (in log filters and paths); they are not metrics.
const CRATES: [&str; 6] = [
    "seinode_tls_crds",
    "seinode_tls_kube",
    "seinode_tls_controller",
    "seinode_tls_webhook",
    "seinode_tls_devcluster",
    "seinode_tls_testkit",
];

#[test]
fn every_metric_the_docs_name_is_exported_and_the_metrics_table_is_complete() {
    let exported = common::metrics::registered_names();
    let mut missing = Vec::new();
    for doc in USER_DOCS
        .iter()
        .chain(&["docs/benchmarks.md", "charts/seinode-tls/values.yaml"])
    {
        for name in common::metrics::named_in(&read(doc)) {
            // A histogram is named by its family too.
            let histogram = exported.contains(&format!("{name}_bucket"));
            let exists = exported.contains(&name) || histogram;
            if RETIRED_METRICS.contains(&name.as_str()) {
                assert!(!exists, "{name} is listed as retired but exported");
            } else if !exists && !CRATES.contains(&name.as_str()) {
                missing.push(format!("{doc}: {name}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "the docs name metrics the binary does not export: {missing:#?}"
    );
    // The table in docs/operations.md ("Metrics") lists every family.
    let operations = read("docs/operations.md");
    let table = &operations[operations.find("## Metrics").unwrap()..];
    let table = &table[..table[3..].find("\n## ").unwrap()];
    let listed = common::metrics::named_in(table);
    let unlisted: Vec<_> = exported
        .iter()
        .filter(|name| {
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name);
            !listed.contains(*name) && !listed.contains(family)
        })
        .collect();
    assert!(
        unlisted.is_empty(),
        "docs/operations.md, \"Metrics\", does not list: {unlisted:?}"
    );
}

/// GitHub's anchor of a Markdown heading.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// The anchors of a Markdown file's ATX headings (a `#` line inside a fenced code block is
/// code, not a heading).
fn anchors(markdown: &str) -> BTreeSet<String> {
    let mut fenced = false;
    let mut anchors = BTreeSet::new();
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        } else if !fenced && line.starts_with('#') {
            anchors.insert(anchor(line.trim_start_matches('#')));
        }
    }
    anchors
}

/// Every relative link of the docs (`[text](path#anchor)`) names a file of the repository, and
/// its anchor a heading of that file.
#[test]
fn every_link_of_the_docs_resolves() {
    let mut broken = Vec::new();
    let docs = [
        "README.md",
        "docs/operations.md",
        "docs/architecture.md",
        "docs/benchmarks.md",
        "docs/testing.md",
        "docs/control-plane.md",
        "examples/README.md",
    ];
    for doc in docs {
        let text = read(doc);
        let base = Path::new(doc).parent().unwrap();
        for (at, _) in text.match_indices("](") {
            let target: String = text[at + 2..].chars().take_while(|c| *c != ')').collect();
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let (path, fragment) = target.split_once('#').unwrap_or((&target, ""));
            let file = if path.is_empty() {
                PathBuf::from(doc)
            } else {
                base.join(path)
            };
            if !repo().join(&file).exists() {
                broken.push(format!("{doc}: {target} (no file {})", file.display()));
                continue;
            }
            if !fragment.is_empty() {
                let linked = std::fs::read_to_string(repo().join(&file)).unwrap_or_default();
                if !anchors(&linked).contains(fragment) {
                    broken.push(format!("{doc}: {target} (no heading #{fragment})"));
                }
            }
        }
    }
    assert!(broken.is_empty(), "broken links: {broken:#?}");
}
