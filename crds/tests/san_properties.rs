//! Properties of `san_covers`, checked against models written here from the rules, not from the
//! code:
//!
//! - [`promised_covers`]: what the project promises (README "The contract", the doc of
//!   `san_covers`): case-insensitive; a wildcard only as the whole left-most label, covering
//!   exactly one label; no partial-label or inner wildcards; a SAN with a trailing dot covers
//!   nothing; a host may be written absolute (one trailing dot).
//! - [`webpki_covers`]: what rustls-webpki 0.103 does (`subject_name/dns_name.rs`,
//!   `presented_id_matches_reference_id` and `is_valid_dns_id`), the client that verifies the
//!   sidecar. It also refuses names that are not DNS names (a label that starts or ends with `-`,
//!   a `*` in a host) and a wildcard with fewer than two labels after it. `san_covers` does
//!   not check syntax, so the two agree only for hosts that are valid DNS names of three labels
//!   or more; every contract name is one (`<node>.<namespace>.svc.<domain>`, five or more).
//!
//! Names are drawn from a five-character alphabet (`a`, `b`, `A`, `-`, `*`), one to four labels
//! of one to three characters, with an optional trailing dot, and a SAN is often derived from the
//! host (same labels in another case, a wildcard in place of the first label), so that matches
//! are frequent.

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use seinode_tls_crds::contract::san_covers;

// === Models ===

fn lower_labels(name: &str) -> Vec<String> {
    name.split('.').map(str::to_ascii_lowercase).collect()
}

/// The project's promise.
fn promised_covers(san: &str, host: &str) -> bool {
    // A SAN with a trailing dot is not a valid presented identifier: it covers nothing.
    if san.is_empty() || san.ends_with('.') {
        return false;
    }
    // An absolute host (`a.b.`) is the same name as `a.b`.
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.is_empty() {
        return false;
    }
    let san = lower_labels(san);
    let host = lower_labels(host);
    // `*` is a wildcard only as the whole left-most label of a name with more labels after it.
    let wildcard = san.len() > 1 && san[0] == "*";
    let stray_star = san
        .iter()
        .enumerate()
        .any(|(i, label)| label.contains('*') && !(i == 0 && wildcard));
    if stray_star || san.len() != host.len() {
        return false;
    }
    san.iter().zip(&host).enumerate().all(|(i, (s, h))| {
        if i == 0 && wildcard {
            // Exactly one label, which must be there.
            !h.is_empty()
        } else {
            s == h
        }
    })
}

/// A DNS name as webpki reads one: labels of letters, digits, `_` and `-`, not empty, not
/// starting or ending with `-`, the last not all digits, at most 253 bytes. A SAN
/// (`presented`) may start with the label `*` followed by two labels or more and may not end in
/// a dot; a host (reference) may not hold a `*` and may end in one dot.
fn webpki_valid(name: &str, presented: bool) -> bool {
    if name.len() > 253 {
        return false;
    }
    let mut rest = name;
    let mut wildcard = false;
    if presented && let Some(after) = name.strip_prefix("*.") {
        rest = after;
        wildcard = true;
    }
    if !presented && let Some(relative) = rest.strip_suffix('.') {
        rest = relative;
    }
    let labels: Vec<&str> = rest.split('.').collect();
    let labels_ok = labels.iter().all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    });
    let last_not_numeric = labels
        .last()
        .is_some_and(|l| !l.bytes().all(|b| b.is_ascii_digit()));
    labels_ok && last_not_numeric && (!wildcard || labels.len() >= 2)
}

/// rustls-webpki's match of a presented DNS identifier (SAN) against a reference one (host).
fn webpki_covers(san: &str, host: &str) -> bool {
    if !webpki_valid(san, true) || !webpki_valid(host, false) {
        return false;
    }
    let host = host.strip_suffix('.').unwrap_or(host);
    let san = lower_labels(san);
    let host = lower_labels(host);
    san.len() == host.len()
        && san
            .iter()
            .zip(&host)
            .enumerate()
            .all(|(i, (s, h))| (i == 0 && s == "*") || s == h)
}

// === Names ===

fn label() -> impl Strategy<Value = String> {
    proptest::collection::vec(prop::sample::select(vec!['a', 'b', 'A', '-', '*']), 1..=3)
        .prop_map(|chars| chars.into_iter().collect())
}

/// A label webpki accepts in a host: no `*`, no `-` first or last.
fn host_label() -> impl Strategy<Value = String> {
    let letter = || prop::sample::select(vec!['a', 'b', 'A']);
    (
        letter(),
        proptest::option::of((prop::sample::select(vec!['a', 'b', 'A', '-']), letter())),
    )
        .prop_map(|(first, rest)| match rest {
            Some((middle, last)) => format!("{first}{middle}{last}"),
            None => first.to_string(),
        })
}

/// `labels` labels joined, with an optional trailing dot.
fn name_of(
    label: impl Strategy<Value = String>,
    labels: std::ops::RangeInclusive<usize>,
) -> impl Strategy<Value = String> {
    (proptest::collection::vec(label, labels), any::<bool>()).prop_map(|(labels, absolute)| {
        let name = labels.join(".");
        if absolute { name + "." } else { name }
    })
}

fn name() -> impl Strategy<Value = String> {
    name_of(label(), 1..=4)
}

/// A host webpki accepts with three labels or more, as every contract name is.
fn contract_like_host() -> impl Strategy<Value = String> {
    name_of(host_label(), 3..=4)
}

/// Flips the case of the letters whose bit in `mask` is set.
fn flip_case(name: &str, mask: u64) -> String {
    name.chars()
        .enumerate()
        .map(|(i, c)| {
            if mask >> (i % 64) & 1 == 1 {
                if c.is_ascii_lowercase() {
                    c.to_ascii_uppercase()
                } else {
                    c.to_ascii_lowercase()
                }
            } else {
                c
            }
        })
        .collect()
}

/// A host and a SAN: independent, or the SAN derived from the host (case changed, first label
/// made a wildcard, trailing dot added or removed), so that both answers are common.
fn san_and_host() -> impl Strategy<Value = (String, String)> {
    san_for(name())
}

fn san_for(host: impl Strategy<Value = String>) -> impl Strategy<Value = (String, String)> {
    (host, name(), 0..5u8, any::<u64>()).prop_map(|(host, other, how, mask)| {
        let san = match how {
            0 => other,
            1 => flip_case(&host, mask),
            2 => match host.split_once('.') {
                Some((_, rest)) => format!("*.{}", flip_case(rest, mask)),
                None => format!("*.{host}"),
            },
            3 => match host.strip_suffix('.') {
                Some(relative) => relative.to_owned(),
                None => format!("{host}."),
            },
            _ => format!("{}.{}", flip_case(&other, mask), host),
        };
        (san, host)
    })
}

// === Properties ===

/// `cases` cases; a failure is reported with its smallest case, not saved to a file (proptest
/// looks for the crate's lib.rs next to the test, which an integration test does not have).
fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config(10_000))]

    #[test]
    fn san_covers_keeps_the_promised_rules((san, host) in san_and_host()) {
        prop_assert_eq!(san_covers(&san, &host), promised_covers(&san, &host), "san {:?} host {:?}", san, host);
    }

    #[test]
    fn san_covers_agrees_with_webpki_for_host_names_like_the_contracts(
        (san, host) in san_for(contract_like_host())
    ) {
        prop_assert!(webpki_valid(&host, false), "the generator makes valid hosts: {:?}", host);
        prop_assert_eq!(san_covers(&san, &host), webpki_covers(&san, &host), "san {:?} host {:?}", san, host);
    }
}

proptest! {
    #![proptest_config(config(2_000))]

    #[test]
    fn case_never_matters((san, host) in san_and_host(), san_mask in any::<u64>(), host_mask in any::<u64>()) {
        prop_assert_eq!(
            san_covers(&san, &host),
            san_covers(&flip_case(&san, san_mask), &flip_case(&host, host_mask))
        );
    }

    #[test]
    fn a_san_with_a_trailing_dot_covers_nothing(san in name(), host in name()) {
        let absolute = format!("{}.", san.trim_end_matches('.'));
        prop_assert!(!san_covers(&absolute, &host), "san {:?} host {:?}", absolute, host);
    }

    #[test]
    fn a_host_and_its_absolute_form_are_covered_alike(san in name(), host in name()) {
        let relative = host.trim_end_matches('.');
        prop_assert_eq!(san_covers(&san, relative), san_covers(&san, &format!("{relative}.")));
    }

    #[test]
    fn a_star_other_than_the_whole_left_most_label_covers_nothing(
        (san, host) in san_and_host(), at in any::<prop::sample::Index>(), star in "\\*|a\\*|\\*b",
    ) {
        // Put a `*`-bearing label anywhere but first, or a partial wildcard first.
        let mut labels: Vec<String> = san.trim_end_matches('.').split('.').map(str::to_owned).collect();
        let position = at.index(labels.len() + 1);
        if position == 0 {
            labels[0] = format!("{star}a");
        } else {
            labels.insert(position, star.clone());
        }
        let san = labels.join(".");
        prop_assert!(!san_covers(&san, &host), "san {:?} host {:?}", san, host);
    }

    #[test]
    fn a_wildcard_covers_the_pod_name_and_not_the_service_name(
        node in "[a-z][a-z0-9-]{0,10}[a-z0-9]",
        namespace in "[a-z][a-z0-9-]{0,10}[a-z0-9]",
    ) {
        let service = format!("{node}.{namespace}.svc.cluster.local");
        let pod = format!("{node}-0.{service}");
        let wildcard = format!("*.{service}");
        prop_assert!(san_covers(&wildcard, &pod));
        prop_assert!(!san_covers(&wildcard, &service));
        prop_assert!(san_covers(&service.to_ascii_uppercase(), &service));
    }
}

/// The generator is only useful if both answers, and wildcard matches, are common.
#[test]
fn the_generator_makes_matches_of_every_kind() {
    let mut runner = TestRunner::deterministic();
    let strategy = san_and_host();
    let (mut covered, mut by_wildcard, mut absolute_host, total) = (0, 0, 0, 4_000);
    for _ in 0..total {
        let (san, host) = strategy.new_tree(&mut runner).expect("a value").current();
        if promised_covers(&san, &host) {
            covered += 1;
            by_wildcard += usize::from(san.starts_with("*."));
            absolute_host += usize::from(host.ends_with('.'));
        }
    }
    assert!(covered > total / 10, "{covered} of {total} covered");
    assert!(
        by_wildcard > total / 50,
        "{by_wildcard} of {total} covered by a wildcard"
    );
    assert!(
        absolute_host > total / 50,
        "{absolute_host} of {total} absolute hosts covered"
    );
    assert!(covered < total * 9 / 10, "{covered} of {total} covered");
}
