//! The namespace merge against scripted per-namespace watches. The oracle is kube-runtime's own
//! reflector store: fed the merged stream, it must hold exactly what one store per namespace,
//! each fed that namespace's watch, holds together.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;

use futures::executor::block_on;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::reflector::store::Writer;

use super::*;

fn object(ns: &str, name: &str, version: u32) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            namespace: Some(ns.to_owned()),
            name: Some(name.to_owned()),
            resource_version: Some(version.to_string()),
            ..ObjectMeta::default()
        },
        ..ConfigMap::default()
    }
}

fn id(object: &ConfigMap) -> String {
    format!(
        "{}/{}@{}",
        object.metadata.namespace.as_deref().unwrap_or_default(),
        object.name_any(),
        object
            .metadata
            .resource_version
            .as_deref()
            .unwrap_or_default()
    )
}

/// An event as a line: `Init`, `InitApply a/x@1`, `Delete b/y@2`, `Err`.
fn line(item: &Item<ConfigMap>) -> String {
    match item {
        Ok(Event::Init) => "Init".to_owned(),
        Ok(Event::InitDone) => "InitDone".to_owned(),
        Ok(Event::InitApply(o)) => format!("InitApply {}", id(o)),
        Ok(Event::Apply(o)) => format!("Apply {}", id(o)),
        Ok(Event::Delete(o)) => format!("Delete {}", id(o)),
        Err(_) => "Err".to_owned(),
    }
}

fn lines(items: &[Item<ConfigMap>]) -> Vec<String> {
    items.iter().map(line).collect()
}

/// A short script language for one namespace's watch: `init`, `+x1` (InitApply x at version 1),
/// `done`, `x2` (Apply), `-x1` (Delete), `err`.
fn script(ns: &str, steps: &[&str]) -> Vec<Item<ConfigMap>> {
    steps
        .iter()
        .map(|step| {
            let parse = |s: &str| {
                let (name, version) = s.split_at(1);
                object(ns, name, version.parse().unwrap())
            };
            match *step {
                "init" => Ok(Event::Init),
                "done" => Ok(Event::InitDone),
                "err" => Err(watcher::Error::NoResourceVersion),
                s if s.starts_with('+') => Ok(Event::InitApply(parse(&s[1..]))),
                s if s.starts_with('-') => Ok(Event::Delete(parse(&s[1..]))),
                s => Ok(Event::Apply(parse(s))),
            }
        })
        .collect()
}

/// Runs the merge over `(namespace index, event)` in this order; returns what it sent per step.
/// Namespace `a`'s steps, then namespace `b`'s (watch indexes 0 and 1).
fn a_then_b(a: &[&str], b: &[&str]) -> Vec<(usize, Item<ConfigMap>)> {
    script("a", a)
        .into_iter()
        .map(|e| (0, e))
        .chain(script("b", b).into_iter().map(|e| (1, e)))
        .collect()
}

fn run(namespaces: usize, steps: Vec<(usize, Item<ConfigMap>)>) -> Vec<Vec<Item<ConfigMap>>> {
    let mut merge = Merge::new(namespaces);
    steps
        .into_iter()
        .map(|(index, item)| merge.step(index, item))
        .collect()
}

fn contents(writer: &Writer<ConfigMap>) -> BTreeSet<String> {
    writer.as_reader().state().iter().map(|o| id(o)).collect()
}

fn feed(writer: &mut Writer<ConfigMap>, items: &[Item<ConfigMap>]) {
    for event in items.iter().flatten() {
        writer.apply_watcher_event(event);
    }
}

#[test]
fn the_first_sync_is_one_init_and_one_init_done_once_every_namespace_listed() {
    let a = script("a", &["init", "+x1", "+y1", "done"]);
    let b = script("b", &["init", "+w1", "done"]);
    let out = run(
        2,
        vec![
            (0, a[0].clone_ok()),
            (1, b[0].clone_ok()),
            (0, a[1].clone_ok()),
            (1, b[1].clone_ok()),
            (0, a[2].clone_ok()),
            (0, a[3].clone_ok()),
            (1, b[2].clone_ok()),
        ],
    );
    assert_eq!(lines(&out[0]), ["Init"]);
    assert!(
        out[1..6].iter().all(Vec::is_empty),
        "nothing until b has listed: {:?}",
        out.iter().map(|o| lines(o)).collect::<Vec<_>>()
    );
    assert_eq!(
        lines(&out[6]),
        [
            "InitApply a/x@1",
            "InitApply a/y@1",
            "InitApply b/w@1",
            "InitDone"
        ]
    );
}

#[test]
fn live_events_of_a_listed_namespace_before_the_first_sync_are_folded_into_it() {
    let steps = a_then_b(
        &["init", "+x1", "+y1", "done", "x2", "-y1", "z1"],
        &["init", "+w1", "done"],
    );
    let out = run(2, steps);
    let sent: Vec<String> = out.iter().flat_map(|o| lines(o)).collect();
    assert_eq!(
        sent,
        [
            "Init",
            "InitApply a/x@2",
            "InitApply a/z@1",
            "InitApply b/w@1",
            "InitDone"
        ],
        "the live update, deletion and creation are in the first list, not lost or replayed"
    );
}

#[test]
fn a_relist_after_the_first_sync_applies_what_it_lists_and_deletes_what_it_dropped() {
    let mut writer = Writer::<ConfigMap>::default();
    let first = a_then_b(&["init", "+x1", "+y1", "done"], &["init", "+w1", "done"]);
    let mut merge = Merge::new(2);
    for (index, item) in first {
        feed(&mut writer, &merge.step(index, item));
    }
    assert_eq!(contents(&writer), set(&["a/x@1", "a/y@1", "b/w@1"]));

    // a's watch expired (410): it lists again, y is gone and x changed.
    let mut sent = Vec::new();
    for item in script("a", &["init", "+x3", "done"]) {
        let out = merge.step(0, item);
        feed(&mut writer, &out);
        sent.extend(lines(&out));
    }
    assert_eq!(sent, ["Delete a/y@1", "Apply a/x@3"]);
    assert_eq!(
        contents(&writer),
        set(&["a/x@3", "b/w@1"]),
        "b's objects survive a's relist"
    );
}

#[test]
fn a_delete_for_an_object_a_relist_dropped_carries_the_last_version_sent() {
    let mut merge = Merge::new(1);
    for item in script("a", &["init", "done", "x1", "x2"]) {
        merge.step(0, item);
    }
    let sent: Vec<String> = script("a", &["init", "done"])
        .into_iter()
        .flat_map(|item| lines(&merge.step(0, item)))
        .collect();
    assert_eq!(sent, ["Delete a/x@2"]);
}

#[test]
fn a_list_restarted_before_it_completed_counts_only_its_last_attempt() {
    let sent: Vec<String> = run(
        1,
        script("a", &["init", "+x1", "+y1", "err", "init", "+x2", "done"])
            .into_iter()
            .map(|e| (0, e))
            .collect(),
    )
    .iter()
    .flat_map(|o| lines(o))
    .collect();
    assert_eq!(sent, ["Init", "Err", "InitApply a/x@2", "InitDone"]);
}

#[test]
fn a_namespace_that_relists_during_the_first_sync_is_sent_as_its_latest_list() {
    let steps: Vec<_> = [
        (0, "init"),
        (0, "+x1"),
        (0, "+y1"),
        (0, "done"),
        (0, "err"),
        (0, "init"),
        (0, "+x1"),
        (0, "done"),
        (1, "init"),
        (1, "done"),
    ]
    .into_iter()
    .map(|(i, s)| (i, script(["a", "b"][i], &[s]).remove(0)))
    .collect();
    let sent: Vec<String> = run(2, steps).iter().flat_map(|o| lines(o)).collect();
    assert_eq!(sent, ["Init", "Err", "InitApply a/x@1", "InitDone"]);
}

#[test]
fn every_interleaving_of_two_namespaces_gives_the_consumer_what_both_watches_said() {
    let a = script(
        "a",
        &[
            "init", "+x1", "+y1", "done", "x2", "-y1", "init", "+z1", "done", "q1",
        ],
    );
    let b = script("b", &["init", "+w1", "done", "v1", "init", "+v2", "done"]);
    let mut count = 0;
    for order in interleavings(a.len(), b.len()) {
        count += 1;
        let mut merge = Merge::new(2);
        let mut merged = Writer::<ConfigMap>::default();
        // The oracle: a store per namespace, fed that namespace's watch as it is.
        let mut alone = [Writer::<ConfigMap>::default(), Writer::default()];
        let (mut next, mut sent, mut synced) = ([0, 0], Vec::new(), false);
        for index in order {
            let event = [&a, &b][index][next[index]].clone_ok();
            next[index] += 1;
            feed(&mut alone[index], std::slice::from_ref(&event));
            let out = merge.step(index, event);
            feed(&mut merged, &out);
            sent.extend(lines(&out));
            synced |= out.iter().any(|e| matches!(e, Ok(Event::InitDone)));
            let expected = if synced {
                &contents(&alone[0]) | &contents(&alone[1])
            } else {
                BTreeSet::new()
            };
            assert_eq!(contents(&merged), expected, "after {sent:?}");
        }
        let count_of = |what: &str| sent.iter().filter(|l| *l == what).count();
        assert_eq!((count_of("Init"), count_of("InitDone")), (1, 1), "{sent:?}");
        let done = sent.iter().position(|l| l == "InitDone").unwrap();
        assert!(
            sent[..done]
                .iter()
                .all(|l| l == "Init" || l == "Err" || l.starts_with("InitApply")),
            "only the first list before InitDone: {sent:?}"
        );
        assert_eq!(contents(&merged), set(&["a/z@1", "a/q@1", "b/v@2"]));
    }
    assert_eq!(count, 19_448, "C(17, 7) interleavings");
}

/// A namespace's watch that the test feeds by hand.
fn channel() -> (
    futures::channel::mpsc::UnboundedSender<Item<ConfigMap>>,
    futures::channel::mpsc::UnboundedReceiver<Item<ConfigMap>>,
) {
    futures::channel::mpsc::unbounded()
}

fn send(
    to: &futures::channel::mpsc::UnboundedSender<Item<ConfigMap>>,
    items: Vec<Item<ConfigMap>>,
) {
    for item in items {
        to.unbounded_send(item).unwrap();
    }
}

/// Everything the merged stream has ready now.
fn ready(merged: &mut WatchEvents<ConfigMap>) -> Vec<String> {
    let mut sent = Vec::new();
    while let Some(Some(item)) = futures::FutureExt::now_or_never(merged.next()) {
        sent.push(line(&item));
    }
    sent
}

#[test]
fn an_erring_namespace_does_not_hold_back_the_others_once_synced() {
    let ((a, a_rx), (b, b_rx)) = (channel(), channel());
    let mut merged = merge_namespaces(vec![a_rx, b_rx]);
    send(&a, script("a", &["init", "+x1", "done"]));
    send(&b, script("b", &["init", "+y1", "done"]));
    assert_eq!(
        ready(&mut merged),
        ["Init", "InitApply a/x@1", "InitApply b/y@1", "InitDone"]
    );
    // a fails and keeps failing (its watcher backs off on its own); b goes on.
    send(&a, script("a", &["err"]));
    assert_eq!(ready(&mut merged), ["Err"]);
    send(&b, script("b", &["y2", "z1", "-y2"]));
    assert_eq!(
        ready(&mut merged),
        ["Apply b/y@2", "Apply b/z@1", "Delete b/y@2"]
    );
    send(&a, script("a", &["err", "init", "+x1", "done"]));
    assert_eq!(ready(&mut merged), ["Err", "Apply a/x@1"]);
}

#[test]
fn the_first_sync_waits_for_a_namespace_that_has_not_listed_yet() {
    // a cannot list (say, Forbidden): the merged watch never claims a complete list.
    let ((a, a_rx), (b, b_rx)) = (channel(), channel());
    let mut merged = merge_namespaces(vec![a_rx, b_rx]);
    send(&a, script("a", &["err", "err"]));
    send(&b, script("b", &["init", "+y1", "done", "z1"]));
    let mut sent = ready(&mut merged);
    sent.sort();
    assert_eq!(sent, ["Err", "Err", "Init"]);
    send(&a, script("a", &["init", "done"]));
    assert_eq!(
        ready(&mut merged),
        ["InitApply b/y@1", "InitApply b/z@1", "InitDone"],
        "b's live event is in the first list"
    );
}

#[test]
fn no_namespace_at_all_is_an_empty_completed_list() {
    let merged = merge_namespaces::<ConfigMap, WatchEvents<ConfigMap>>(Vec::new());
    let sent = lines(&block_on(merged.take(2).collect::<Vec<_>>()));
    assert_eq!(sent, ["Init", "InitDone"]);
}

#[test]
fn parses_a_namespace_list() {
    assert_eq!(WatchScope::parse("").unwrap(), WatchScope::Cluster);
    assert_eq!(WatchScope::parse("  ").unwrap(), WatchScope::Cluster);
    assert_eq!(
        WatchScope::parse("sei-a, b2 ,c").unwrap(),
        WatchScope::Namespaces(vec!["sei-a".into(), "b2".into(), "c".into()])
    );
    let long = "a".repeat(63);
    assert!(WatchScope::parse(&long).is_ok());
    for (list, error) in [
        ("a,,b", WatchScopeError::EmptyName),
        ("a,", WatchScopeError::EmptyName),
        ("Sei", WatchScopeError::InvalidName("Sei".into())),
        ("-a", WatchScopeError::InvalidName("-a".into())),
        ("a-", WatchScopeError::InvalidName("a-".into())),
        ("a.b", WatchScopeError::InvalidName("a.b".into())),
        ("é", WatchScopeError::InvalidName("é".into())),
        ("a,b,a", WatchScopeError::Duplicate("a".into())),
    ] {
        assert_eq!(WatchScope::parse(list), Err(error), "{list:?}");
    }
    let too_long = "a".repeat(64);
    assert_eq!(
        WatchScope::parse(&too_long),
        Err(WatchScopeError::InvalidName(too_long.clone()))
    );
    assert!(
        WatchScopeError::Duplicate("a".into())
            .to_string()
            .contains("listed twice")
    );
}

#[test]
fn a_scope_includes_exactly_its_namespaces() {
    let scope = WatchScope::parse("a,b").unwrap();
    assert!(scope.includes("a") && scope.includes("b") && !scope.includes("c"));
    assert!(WatchScope::Cluster.includes("anything"));
}

fn set(ids: &[&str]) -> BTreeSet<String> {
    ids.iter().map(|s| (*s).to_owned()).collect()
}

/// Every order of `a` steps of one namespace and `b` of the other, as namespace indices.
fn interleavings(a: usize, b: usize) -> Vec<Vec<usize>> {
    if a == 0 || b == 0 {
        return vec![[0].repeat(a).into_iter().chain([1].repeat(b)).collect()];
    }
    let mut all = Vec::new();
    for (first, rest) in [(0, interleavings(a - 1, b)), (1, interleavings(a, b - 1))] {
        all.extend(rest.into_iter().map(|tail| {
            let mut order = vec![first];
            order.extend(tail);
            order
        }));
    }
    all
}

/// `watcher::Error` is not `Clone`; the scripts use only `NoResourceVersion`.
trait CloneOk {
    fn clone_ok(&self) -> Item<ConfigMap>;
}

impl CloneOk for Item<ConfigMap> {
    fn clone_ok(&self) -> Item<ConfigMap> {
        match self {
            Ok(event) => Ok(event.clone()),
            Err(_) => Err(watcher::Error::NoResourceVersion),
        }
    }
}
