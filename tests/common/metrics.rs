//! The metrics the binary exports, by name: from the registry its server commands build
//! (tests/monitoring.rs, tests/docs.rs), and as a running replica's `/metrics` serves them
//! (tests/install.rs checks that the two agree).

use std::collections::BTreeSet;

/// The sample names of every metric a server command's registry holds (`run`'s: the build info,
/// the webhook's and the controller's metrics, registered by the same code), in Prometheus'
/// naming: a counter's `_total`, a histogram's `_bucket`, `_sum` and `_count`, an info's `_info`.
pub fn registered_names() -> BTreeSet<String> {
    let mut registry = seinode_tls::serve::registry();
    seinode_tls_webhook::metrics::WebhookMetrics::register(&mut registry);
    seinode_tls_controller::metrics::ControllerMetrics::register(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    exposition_names(&text)
}

/// The sample names an exposition's `# TYPE` lines declare.
pub fn exposition_names(exposition: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in exposition.lines() {
        let mut words = line.split_whitespace();
        if (words.next(), words.next()) != (Some("#"), Some("TYPE")) {
            continue;
        }
        let (Some(name), Some(kind)) = (words.next(), words.next()) else {
            continue;
        };
        let suffixes: &[&str] = match kind {
            "counter" => &["_total"],
            "histogram" => &["_bucket", "_sum", "_count"],
            "info" => &["_info"],
            _ => &[""],
        };
        names.extend(suffixes.iter().map(|s| format!("{name}{s}")));
    }
    names
}

/// The metric names in a text (a PromQL expression, a document): every metric this project
/// exports starts with the binary's prefix, `seinode_tls_`.
pub fn named_in(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("seinode_tls_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        names.insert(name);
    }
    names
}

/// The sum of the samples `registry` exports on lines that start with `prefix` (a metric's name
/// and, to pick series, the start of its labels); `None` when no line does.
pub fn samples_sum(registry: &prometheus_client::registry::Registry, prefix: &str) -> Option<u64> {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .reduce(|a, b| a + b)
}
