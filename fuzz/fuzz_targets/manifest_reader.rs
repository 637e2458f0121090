//! `seinode_tls::offline::parse_secret_manifest`, the reader behind `check-secret -f`, over the
//! input as UTF-8 (invalid sequences replaced).
//!
//! Invariants: no panic, and an error message (with its causes, as `check-secret` prints it)
//! never holds 16 or more consecutive bytes of the input's `tls.key` value. An occurrence counts
//! when it follows the input (see the crate's lib): with the letters and digits of the value
//! rotated, the message must hold the rotated run.
//!
//! Findings, fixed (docs/testing.md, "Findings"; reproducers in fuzz/artifacts-kept/, also run by
//! `offline::tests` in `cargo test`): serde-saphyr's excerpt of a YAML syntax error, and serde's
//! quote of a value of the wrong type.

#![no_main]

use std::ops::Range;

use libfuzzer_sys::fuzz_target;
use seinode_tls::offline::{ManifestError, parse_secret_manifest};
use seinode_tls_crds::error_chain;
use seinode_tls_fuzz::{find, rotate_alphanumerics, rotated, runs_in};

/// Shortest run of the key value that counts as an echo.
const MIN_RUN: usize = 16;
const PATH: &str = "secret.yaml";
const KEY: &[u8] = b"tls.key";

/// The error as `check-secret` prints it.
fn message_of(error: &ManifestError) -> String {
    error_chain(error)
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let Err(error) = parse_secret_manifest(&text, PATH) else {
        return;
    };
    let message = message_of(&error);
    let ranges: Vec<Range<usize>> = key_value_ranges(text.as_bytes())
        .into_iter()
        .filter(|range| range.len() >= MIN_RUN)
        .collect();
    let echoed: Vec<(Range<usize>, usize)> = ranges
        .iter()
        .flat_map(|range| {
            runs_in(&text.as_bytes()[range.clone()], message.as_bytes(), MIN_RUN)
                .into_iter()
                .map(move |at| (range.clone(), at))
        })
        .collect();
    if echoed.is_empty() {
        return;
    }
    // Does the message follow the input? Rotate the value and read it again.
    let mut changed = text.as_bytes().to_vec();
    for range in &ranges {
        rotate_alphanumerics(&mut changed[range.clone()]);
    }
    let changed = String::from_utf8(changed).expect("rotation keeps UTF-8");
    let Err(changed_error) = parse_secret_manifest(&changed, PATH) else {
        return;
    };
    let changed_message = message_of(&changed_error);
    for (range, at) in echoed {
        let run = &text.as_bytes()[range.start + at..range.start + at + MIN_RUN];
        assert!(
            find(changed_message.as_bytes(), &rotated(run)).is_none(),
            "the error message echoes {MIN_RUN}+ bytes of tls.key ({:?}): {message}",
            String::from_utf8_lossy(run)
        );
    }
});

/// Byte ranges of the values of `tls.key` in a YAML or JSON manifest, found the way a person
/// reads one (not with the parser under test): after `tls.key`, an optional closing quote and
/// `:`, the quoted or plain value on that line; for a YAML block scalar (`|`, `>`), each
/// non-blank line that follows, indented deeper than the key's line.
fn key_value_ranges(text: &[u8]) -> Vec<Range<usize>> {
    let mut ranges = Vec::new();
    let mut from = 0;
    while let Some(at) = find(&text[from..], KEY) {
        let key_at = from + at;
        from = key_at + KEY.len();
        if !at_key_position(text, key_at) {
            continue;
        }
        let mut i = skip(text, from, |b| matches!(b, b'"' | b'\''));
        i = skip(text, i, |b| matches!(b, b' ' | b'\t'));
        if text.get(i) != Some(&b':') {
            continue;
        }
        i = skip(text, i + 1, |b| matches!(b, b' ' | b'\t'));
        let eol = line_end(text, i);
        match text.get(i) {
            Some(&quote @ (b'"' | b'\'')) => {
                let end = text[i + 1..eol]
                    .iter()
                    .position(|&b| b == quote)
                    .map_or(eol, |p| i + 1 + p);
                ranges.push(i + 1..end);
            }
            Some(b'|' | b'>') => {
                let key_line = text[..key_at]
                    .iter()
                    .rposition(|&b| b == b'\n')
                    .map_or(0, |p| p + 1);
                let key_indent = indent(text, key_line);
                let mut line = eol + 1;
                while line < text.len() {
                    let end = line_end(text, line);
                    let start = line + indent(text, line);
                    if start < end && !text[start..end].iter().all(u8::is_ascii_whitespace) {
                        if start - line <= key_indent {
                            break;
                        }
                        ranges.push(start..trim_end(text, start, end));
                    }
                    line = end + 1;
                }
            }
            _ => {
                let end = text[i..eol]
                    .iter()
                    .position(|&b| matches!(b, b',' | b'}' | b']' | b'#'))
                    .map_or(eol, |p| i + p);
                ranges.push(i..trim_end(text, i, end));
            }
        }
    }
    ranges
}

/// Whether a name at `at` stands where a mapping key does: first on its line, or after `{` or
/// `,` (flow style and JSON), with an optional opening quote. `kind: tls.key:x` holds no key.
fn at_key_position(text: &[u8], at: usize) -> bool {
    let mut i = at;
    if i > 0 && matches!(text[i - 1], b'"' | b'\'') {
        i -= 1;
    }
    while i > 0 && matches!(text[i - 1], b' ' | b'\t') {
        i -= 1;
    }
    i == 0 || matches!(text[i - 1], b'\n' | b'{' | b',')
}

fn skip(text: &[u8], mut i: usize, what: impl Fn(u8) -> bool) -> usize {
    while i < text.len() && what(text[i]) {
        i += 1;
    }
    i
}

fn line_end(text: &[u8], from: usize) -> usize {
    text[from.min(text.len())..]
        .iter()
        .position(|&b| b == b'\n')
        .map_or(text.len(), |p| from + p)
}

fn indent(text: &[u8], line: usize) -> usize {
    skip(text, line, |b| b == b' ') - line
}

fn trim_end(text: &[u8], start: usize, mut end: usize) -> usize {
    while end > start && text[end - 1].is_ascii_whitespace() {
        end -= 1;
    }
    end
}
