//! The chart's monitoring objects: every alert of the PrometheusRule, evaluated by `promtool test
//! rules` over series as Prometheus stores them after a ServiceMonitor scrape (the target's
//! `job`, `namespace`, `pod`, `service`, `endpoint`, `container` and `instance` labels, and with
//! `honorLabels` a per-node series' own `namespace`), fires when it should, with the labels, text
//! and runbook it should, and only then; every runbook it points at exists; the Grafana
//! dashboard renders as the ConfigMap Grafana's sidecar picks up and names only metrics the
//! binary exports (tests/install.rs checks that registry against a running replica's `/metrics`).

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;

use common::chart::{Release, chart_dir, documents_of, text};
use serde_json::{Value, json};

const RELEASE_NS: &str = "seinode-tls-system";
const CHART: Release = Release {
    name: "seinode-tls",
    namespace: RELEASE_NS,
};
/// The `job` label of a PodMonitor's scrape (`<namespace>/<name>`).
const PODMONITOR_JOB: &str = "seinode-tls-system/seinode-tls";
/// The chart's default `monitoring.prometheusRule.runbookBaseURL`.
const RUNBOOKS: &str = "https://github.com/sei-protocol/seinode-tls/blob/main/docs/operations.md";

/// The labels a ServiceMonitor scrape of replica `pod` adds to every series it stores.
fn scraped(pod: &str) -> Vec<(&'static str, String)> {
    vec![
        ("job", "seinode-tls".to_owned()),
        ("namespace", RELEASE_NS.to_owned()),
        ("service", "seinode-tls".to_owned()),
        ("endpoint", "metrics".to_owned()),
        ("container", "seinode-tls".to_owned()),
        ("pod", pod.to_owned()),
        ("instance", format!("{pod}.ip:8080")),
    ]
}

/// One input series: `name` with the scrape's labels of `pod`, then `own` (which, as with
/// `honorLabels`, win over the scrape's), and promtool's expanding notation `values`.
fn series(name: &str, pod: &str, own: &[(&str, &str)], values: &str) -> Value {
    let mut labels: Vec<(&str, String)> = scraped(pod)
        .into_iter()
        .filter(|(k, _)| own.iter().all(|(o, _)| o != k))
        .collect();
    labels.extend(own.iter().map(|(k, v)| (*k, (*v).to_owned())));
    let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    json!({"series": format!("{name}{{{}}}", labels.join(",")), "values": values})
}

/// An expected alert: its labels, and its summary and description (the runbook is added).
fn alert(name: &str, labels: Value, summary: &str, description: &str) -> Value {
    json!({
        "exp_labels": labels,
        "exp_annotations": {
            "summary": summary,
            "description": description,
            "runbook_url": format!("{RUNBOOKS}#{}", name.to_lowercase()),
        },
    })
}

/// One promtool test group: `input` series at 1-minute steps, and `(eval_time, alertname,
/// expected alerts)` checks.
fn group(input: Vec<Value>, checks: Vec<(&str, &str, Vec<Value>)>) -> Value {
    let checks: Vec<Value> = checks
        .into_iter()
        .map(|(at, name, alerts)| json!({"eval_time": at, "alertname": name, "exp_alerts": alerts}))
        .collect();
    json!({"interval": "1m", "input_series": input, "alert_rule_test": checks})
}

/// The rendered PrometheusRule's rule groups, with `extra` values.
fn rule_groups(extra: &[&str]) -> Value {
    let mut values = vec![
        "--set".to_owned(),
        "monitoring.prometheusRule.enabled=true".to_owned(),
    ];
    for value in extra {
        values.extend(["--set".to_owned(), (*value).to_owned()]);
    }
    let rule = documents_of(&CHART.render(&values), &["PrometheusRule"]);
    let rule: Value =
        serde_saphyr::from_str(rule.trim_start_matches("---")).expect("the PrometheusRule is YAML");
    rule["spec"].clone()
}

/// Runs `promtool test rules` with `groups` over the rendered rules (with `extra` values);
/// panics with promtool's output when a check fails.
fn promtool_test_rules(extra: &[&str], groups: Vec<Value>) {
    let dir = common::temp_path("promtool");
    std::fs::create_dir_all(&dir).unwrap();
    // JSON is YAML: the rule's spec is a rule file as it is, and so is the test file.
    std::fs::write(dir.join("rules.json"), rule_groups(extra).to_string()).unwrap();
    let tests = json!({"rule_files": ["rules.json"], "evaluation_interval": "1m", "tests": groups});
    std::fs::write(dir.join("tests.json"), tests.to_string()).unwrap();
    let promtool = seinode_tls_devcluster::control_plane::promtool().expect("build promtool");
    let out = std::process::Command::new(promtool)
        .args(["test", "rules", "tests.json"])
        .current_dir(&dir)
        .output()
        .expect("run promtool");
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(
        out.status.success(),
        "promtool test rules failed:\n{}{}\ntests:\n{}",
        text(&out.stdout),
        text(&out.stderr),
        serde_json::to_string_pretty(&tests).unwrap()
    );
}

/// The per-node alerts: a node's Secret not ready, its certificate expiring (named by the node's
/// own namespace, once, though two replicas export it), and sidecar probes failing.
#[test]
fn the_node_alerts_fire_for_the_node_with_its_namespace_and_runbook() {
    promtool_test_rules(&[], node_alert_groups());
}

fn node_alert_groups() -> Vec<Value> {
    let by_reason = "seinode_tls_controller_seinodes_by_tls_reason";
    let not_after = "seinode_tls_controller_tls_certificate_not_after_timestamp_seconds";
    let probes = "seinode_tls_controller_sidecar_probes_total";
    let node = |ns: &'static str, name: &'static str| [("namespace", ns), ("seinode", name)];
    // Time starts at 0 in promtool: a notAfter of N seconds is N seconds after the start. With
    // the default certExpiryWarning (168h = 604800 s): rpc has 5 days (alert), archive 8 (none).
    let secret_not_ready = group(
        vec![
            series(
                by_reason,
                "leader",
                &[("reason", "TLSSecretExpired"), ("running", "true")],
                "1x40",
            ),
            series(
                by_reason,
                "follower",
                &[("reason", "TLSSecretExpired"), ("running", "true")],
                "0x40",
            ),
            // The same replica scraped by a PodMonitor too: not counted twice.
            series(
                by_reason,
                "leader",
                &[
                    ("reason", "TLSSecretExpired"),
                    ("running", "true"),
                    ("job", PODMONITOR_JOB),
                ],
                "1x40",
            ),
            series(
                by_reason,
                "leader",
                &[("reason", "TLSSecretNotFound"), ("running", "false")],
                "3x40",
            ),
        ],
        vec![
            ("10m", "SeiNodeTLSSecretNotReady", vec![]),
            (
                "20m",
                "SeiNodeTLSSecretNotReady",
                vec![alert(
                    "SeiNodeTLSSecretNotReady",
                    json!({"severity": "warning", "namespace": RELEASE_NS}),
                    "Running SeiNodes have a TLS Secret that does not meet the contract",
                    "1 TLS SeiNode(s) are not SidecarTLSSecretReady; see `kubectl get snode -A` (column TLS) and `seinode-tls status NODE -n NAMESPACE`.",
                )],
            ),
        ],
    );
    let expiring = group(
        vec![
            series(not_after, "leader", &node("sei-arctic", "rpc"), "432000x30"),
            // A replica that led before still exported it at its last scrape.
            series(
                not_after,
                "follower",
                &node("sei-arctic", "rpc"),
                "432000x30",
            ),
            series(
                not_after,
                "leader",
                &node("sei-arctic", "archive"),
                "691200x30",
            ),
        ],
        vec![(
            "10m",
            "SeiNodeTLSCertificateExpiringSoon",
            vec![alert(
                "SeiNodeTLSCertificateExpiringSoon",
                json!({"severity": "warning", "namespace": "sei-arctic", "seinode": "rpc"}),
                "A SeiNode's sidecar certificate expires soon",
                "The certificate of SeiNode sei-arctic/rpc expires in 4d 23h 50m 0s.",
            )],
        )],
    );
    // Unreachable sidecars for half an hour; NotProbed (the Secret's alert) and Healthy never.
    let probes_failing = group(
        vec![
            series(
                probes,
                "leader",
                &[("result", "SidecarUnreachable")],
                "0+2x40",
            ),
            series(
                probes,
                "leader",
                &[("result", "SidecarNotProbed")],
                "0+2x40",
            ),
            series(probes, "leader", &[("result", "SidecarHealthy")], "0+20x40"),
        ],
        vec![
            ("10m", "SeiNodeTLSSidecarProbesFailing", vec![]),
            (
                "30m",
                "SeiNodeTLSSidecarProbesFailing",
                vec![alert(
                    "SeiNodeTLSSidecarProbesFailing",
                    json!({"severity": "warning", "namespace": RELEASE_NS, "result": "SidecarUnreachable"}),
                    "SeiNode sidecars keep failing their probes",
                    "Probes of SeiNode sidecars end in SidecarUnreachable; `kubectl get snode -A` (column SIDECAR) shows which nodes.",
                )],
            ),
        ],
    );
    vec![secret_not_ready, expiring, probes_failing]
}

/// One threshold: `controller.certExpiryWarning` moves both expiry alerts (the nodes' and the
/// webhook's own certificate); with cert-manager the webhook's alert never fires before half of
/// its certificate's `renewBefore` is gone.
#[test]
fn one_threshold_drives_both_expiry_alerts() {
    let node = "seinode_tls_controller_tls_certificate_not_after_timestamp_seconds";
    let serving = "seinode_tls_webhook_serving_certificate_not_after_timestamp_seconds";
    // 5 days left: no alert with a 48-hour warning, as the default 168 hours would raise.
    let quiet = group(
        vec![
            series(
                node,
                "leader",
                &[("namespace", "sei"), ("seinode", "rpc")],
                "432000x30",
            ),
            series(serving, "leader", &[], "432000x30"),
        ],
        vec![
            ("10m", "SeiNodeTLSCertificateExpiringSoon", vec![]),
            (
                "10m",
                "SeiNodeTLSWebhookServingCertificateExpiringSoon",
                vec![],
            ),
        ],
    );
    promtool_test_rules(&["controller.certExpiryWarning=48h"], vec![quiet]);
    let thresholds = |values: &[&str]| {
        let exprs = alert_exprs(&rule_groups(values));
        let threshold =
            |name: &str| -> u64 { exprs[name].rsplit("< ").next().unwrap().parse().unwrap() };
        (
            threshold("SeiNodeTLSCertificateExpiringSoon"),
            threshold("SeiNodeTLSWebhookServingCertificateExpiringSoon"),
        )
    };
    assert_eq!(thresholds(&[]), (604_800, 604_800), "168h");
    assert_eq!(
        thresholds(&["controller.certExpiryWarning=48h"]),
        (172_800, 172_800)
    );
    // Above half of the webhook certificate's renewBefore (360h), the webhook's alert waits for
    // a renewal that is overdue (180h left), or it would fire before every renewal.
    assert_eq!(
        thresholds(&["controller.certExpiryWarning=720h"]),
        (2_592_000, 648_000)
    );
    assert_eq!(
        thresholds(&[
            "controller.certExpiryWarning=720h",
            "tls.certManager.renewBefore=2000h"
        ]),
        (2_592_000, 2_592_000)
    );
    // Without cert-manager nothing renews it on a schedule: the one threshold.
    assert_eq!(
        thresholds(&[
            "controller.certExpiryWarning=720h",
            "tls.certManager.enabled=false",
            "tls.secretName=webhook-tls",
            "tls.caBundle=x",
            "sidecarClient.secretName=client"
        ]),
        (2_592_000, 2_592_000)
    );
}

/// The controller-wide alerts: reconcile errors, no leader (none leading, or nothing scraped),
/// a replica not scraped.
#[test]
fn the_controller_alerts_fire_when_nothing_reconciles_or_a_replica_is_down() {
    promtool_test_rules(&[], controller_alert_groups());
}

fn controller_alert_groups() -> Vec<Value> {
    let leader = "seinode_tls_controller_leader";
    let errors = group(
        vec![
            series(
                "seinode_tls_controller_reconciles_total",
                "leader",
                &[("outcome", "error")],
                "0+60x40",
            ),
            // Scraped by a PodMonitor too: the rate is not doubled.
            series(
                "seinode_tls_controller_reconciles_total",
                "leader",
                &[("outcome", "error"), ("job", PODMONITOR_JOB)],
                "0+60x40",
            ),
            series(
                "seinode_tls_controller_reconciles_total",
                "leader",
                &[("outcome", "success")],
                "0+600x40",
            ),
        ],
        vec![
            ("10m", "SeiNodeTLSReconcileErrors", vec![]),
            (
                "30m",
                "SeiNodeTLSReconcileErrors",
                vec![alert(
                    "SeiNodeTLSReconcileErrors",
                    json!({"severity": "warning", "namespace": RELEASE_NS}),
                    "The seinode-tls controller keeps failing reconciles",
                    "1 reconciles per second end in an error (retried with backoff); the leader's log says which node and why.",
                )],
            ),
        ],
    );
    let no_leader = alert(
        "SeiNodeTLSNoLeader",
        json!({"severity": "critical"}),
        "No seinode-tls replica is reconciling SeiNodes",
        &format!(
            "No replica in {RELEASE_NS} holds the leader Lease (or none is scraped): SeiNode plans, status and conditions are not updated."
        ),
    );
    // Two replicas, neither leading; then one takes the Lease at minute 12.
    let leaderless = group(
        vec![
            series(leader, "a", &[], "0x11 1x20"),
            series(leader, "b", &[], "0x40"),
            // Another release's leader, in another namespace, does not count.
            series(leader, "other", &[("namespace", "elsewhere")], "1x40"),
        ],
        vec![
            ("3m", "SeiNodeTLSNoLeader", vec![]),
            ("8m", "SeiNodeTLSNoLeader", vec![no_leader.clone()]),
            ("20m", "SeiNodeTLSNoLeader", vec![]),
        ],
    );
    // Nothing scraped at all.
    let unscraped = group(
        vec![series("up", "a", &[("job", "something-else")], "1x20")],
        vec![("8m", "SeiNodeTLSNoLeader", vec![no_leader])],
    );
    let down = |pod: &str| {
        alert(
            "SeiNodeTLSTargetDown",
            json!({"severity": "warning", "namespace": RELEASE_NS, "pod": pod,
                   "job": if pod == "b" { format!("{RELEASE_NS}/seinode-tls") } else { "seinode-tls".to_owned() },
                   "service": "seinode-tls", "endpoint": "metrics", "container": "seinode-tls",
                   "instance": format!("{pod}.ip:8080")}),
            "A seinode-tls replica cannot be scraped",
            &format!(
                "Prometheus cannot scrape {RELEASE_NS}/{pod}; with the SeiNode webhooks failing closed, admission rests on the other replicas."
            ),
        )
    };
    // a through the ServiceMonitor, b through a PodMonitor (job "<namespace>/<name>"); c is up;
    // another job of the namespace being down is not ours.
    let targets = group(
        vec![
            series("up", "a", &[], "1x2 0x20"),
            series(
                "up",
                "b",
                &[("job", &format!("{RELEASE_NS}/seinode-tls"))],
                "0x20",
            ),
            series("up", "c", &[], "1x20"),
            series("up", "d", &[("job", "another-app")], "0x20"),
        ],
        vec![
            ("4m", "SeiNodeTLSTargetDown", vec![]),
            ("10m", "SeiNodeTLSTargetDown", vec![down("a"), down("b")]),
        ],
    );
    vec![errors, leaderless, unscraped, targets]
}

/// The webhook's alerts: shedding (429s or refused connections), its own serving certificate
/// expiring, failing to reload or to be watched, and 400s.
#[test]
fn the_webhook_alerts_fire_for_the_replica_that_has_the_problem() {
    promtool_test_rules(&[], webhook_alert_groups());
}

fn webhook_alert_groups() -> Vec<Value> {
    let shed = "seinode_tls_webhook_requests_shed_total";
    let refused = "seinode_tls_webhook_connections_refused_total";
    let replica = |pod: &str| json!({"severity": "warning", "namespace": RELEASE_NS, "pod": pod});
    let shedding = |pod: &str| {
        alert(
            "SeiNodeTLSWebhookShedding",
            replica(pod),
            "The seinode-tls webhook is shedding load",
            &format!(
                "{RELEASE_NS}/{pod} answers 429 or refuses connections (1/s): its limits are reached, by load or by a client holding them."
            ),
        )
    };
    // a sheds requests, b refuses connections, c does neither.
    let load = group(
        vec![
            series(shed, "a", &[], "0+60x20"),
            series(refused, "a", &[], "0x20"),
            series(shed, "b", &[], "0x20"),
            series(refused, "b", &[], "0+60x20"),
            series(shed, "c", &[], "0x20"),
            series(refused, "c", &[], "0x20"),
        ],
        vec![
            ("3m", "SeiNodeTLSWebhookShedding", vec![]),
            (
                "12m",
                "SeiNodeTLSWebhookShedding",
                vec![shedding("a"), shedding("b")],
            ),
        ],
    );
    let not_after = "seinode_tls_webhook_serving_certificate_not_after_timestamp_seconds";
    let reloads = "seinode_tls_webhook_serving_certificate_reloads_total";
    let watch_failures = "seinode_tls_webhook_serving_certificate_watch_failures_total";
    let failure = [("result", "failure")];
    // healthy: 10 days left, reloads fine, watching. stale: 5 days left, a failed reload at
    // minute 10. polling: its watch failed when it started.
    let certificates = group(
        vec![
            series(not_after, "healthy", &[], "864000x40"),
            series(reloads, "healthy", &failure, "0x40"),
            series(watch_failures, "healthy", &[], "0x40"),
            series(not_after, "stale", &[], "432000x40"),
            series(reloads, "stale", &failure, "0x9 1x30"),
            series(watch_failures, "stale", &[], "0x40"),
            series(not_after, "polling", &[], "864000x40"),
            series(reloads, "polling", &failure, "0x40"),
            series(watch_failures, "polling", &[], "1x40"),
        ],
        vec![
            (
                "20m",
                "SeiNodeTLSWebhookServingCertificateExpiringSoon",
                vec![alert(
                    "SeiNodeTLSWebhookServingCertificateExpiringSoon",
                    replica("stale"),
                    "The seinode-tls webhook's serving certificate expires soon",
                    &format!(
                        "The serving certificate of {RELEASE_NS}/stale expires in 4d 23h 40m 0s. When it expires the API server refuses the webhook and SeiNode admission fails closed. Check the Secret it mounts (tls.secretName or the cert-manager Certificate) and the reload alerts."
                    ),
                )],
            ),
            (
                "5m",
                "SeiNodeTLSWebhookServingCertificateReloadFailed",
                vec![],
            ),
            (
                "20m",
                "SeiNodeTLSWebhookServingCertificateReloadFailed",
                vec![alert(
                    "SeiNodeTLSWebhookServingCertificateReloadFailed",
                    replica("stale"),
                    "The seinode-tls webhook could not load a new serving certificate",
                    &format!(
                        "{RELEASE_NS}/stale found a certificate or key on disk it cannot serve and keeps serving the previous one, which will expire. Its log says why (\"new serving certificate is unusable\")."
                    ),
                )],
            ),
            (
                "20m",
                "SeiNodeTLSWebhookServingCertificateWatchFailed",
                vec![alert(
                    "SeiNodeTLSWebhookServingCertificateWatchFailed",
                    json!({"severity": "info", "namespace": RELEASE_NS, "pod": "polling"}),
                    "The seinode-tls webhook cannot watch its certificate files",
                    &format!(
                        "{RELEASE_NS}/polling re-reads its serving certificate every 30s instead of on change. Usually the node's inotify limits (fs.inotify.max_user_instances, fs.inotify.max_user_watches) are used up."
                    ),
                )],
            ),
        ],
    );
    let bad_requests = group(
        vec![
            series(
                "seinode_tls_webhook_requests_total",
                "a",
                &[
                    ("webhook", "validate_seinodes"),
                    ("operation", "unknown"),
                    ("outcome", "bad_request"),
                ],
                "0+60x40",
            ),
            series(
                "seinode_tls_webhook_requests_total",
                "a",
                &[
                    ("webhook", "validate_seinodes"),
                    ("operation", "CREATE"),
                    ("outcome", "denied"),
                ],
                "0+60x40",
            ),
        ],
        vec![
            ("5m", "SeiNodeTLSWebhookErrors", vec![]),
            (
                "30m",
                "SeiNodeTLSWebhookErrors",
                vec![alert(
                    "SeiNodeTLSWebhookErrors",
                    json!({"severity": "warning", "namespace": RELEASE_NS}),
                    "The seinode-tls webhook is answering malformed requests with HTTP 400",
                    "1 admission requests per second are answered 400; the webhook's log says why, the API server's admission log says from where.",
                )],
            ),
        ],
    );
    vec![load, certificates, bad_requests]
}

/// `alert name -> expr` of the rendered rules.
fn alert_exprs(groups: &Value) -> std::collections::BTreeMap<String, String> {
    groups["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .map(|r| {
            (
                r["alert"].as_str().unwrap().to_owned(),
                r["expr"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// Every alert has a runbook, and the runbook is a section of docs/operations.md; every alert
/// fires in a promtool check above (a new alert without one fails here).
#[test]
fn every_alert_has_a_runbook_section_and_a_promtool_test() {
    let groups = rule_groups(&[]);
    let operations = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/operations.md"),
    )
    .unwrap();
    let sections: BTreeSet<String> = operations
        .lines()
        .filter_map(|l| l.strip_prefix("### "))
        .map(str::to_lowercase)
        .collect();
    // The alerts some promtool check above expects to fire.
    let fired: BTreeSet<String> = [
        node_alert_groups(),
        controller_alert_groups(),
        webhook_alert_groups(),
    ]
    .concat()
    .iter()
    .flat_map(|g| g["alert_rule_test"].as_array().unwrap().clone())
    .filter(|check| !check["exp_alerts"].as_array().unwrap().is_empty())
    .map(|check| check["alertname"].as_str().unwrap().to_owned())
    .collect();
    for rule in groups["groups"][0]["rules"].as_array().unwrap() {
        let name = rule["alert"].as_str().unwrap();
        let runbook = rule["annotations"]["runbook_url"].as_str().unwrap_or("");
        assert_eq!(
            runbook,
            format!("{RUNBOOKS}#{}", name.to_lowercase()),
            "{name}"
        );
        assert!(
            sections.contains(&name.to_lowercase()),
            "docs/operations.md has no section \"### {name}\""
        );
        assert!(
            fired.contains(name),
            "{name} has no promtool check that it fires in tests/monitoring.rs"
        );
    }
}

/// The dashboard renders as a ConfigMap labelled for Grafana's sidecar, holds valid dashboard
/// JSON with a Prometheus datasource variable, and every panel query names metrics the
/// binary's metric code registers (the names are also checked against a running `/metrics`
/// in tests/install.rs).
#[test]
fn the_dashboard_is_a_labelled_config_map_whose_queries_name_exported_metrics() {
    assert!(
        documents_of(&CHART.render(&[]), &["ConfigMap"]).is_empty(),
        "no dashboard unless asked"
    );
    let rendered = CHART.render(&[
        "--set".to_owned(),
        "monitoring.grafanaDashboard.enabled=true".to_owned(),
    ]);
    let config_map = documents_of(&rendered, &["ConfigMap"]);
    let config_map: Value = serde_saphyr::from_str(config_map.trim_start_matches("---")).unwrap();
    assert_eq!(config_map["metadata"]["labels"]["grafana_dashboard"], "1");
    let dashboard: Value =
        serde_json::from_str(config_map["data"]["seinode-tls.json"].as_str().unwrap())
            .expect("the dashboard is JSON");
    let file: Value = serde_json::from_str(
        &std::fs::read_to_string(chart_dir().join("dashboards/seinode-tls.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(dashboard, file, "the ConfigMap carries the file as it is");
    assert_eq!(dashboard["templating"]["list"][0]["query"], "prometheus");
    let exported = common::metrics::registered_names();
    // Every query, in every panel (rows nest theirs) and every variable.
    let mut queried = BTreeSet::new();
    let mut panels: Vec<&Value> = dashboard["panels"].as_array().unwrap().iter().collect();
    let mut targets = 0;
    while let Some(panel) = panels.pop() {
        panels.extend(panel["panels"].as_array().into_iter().flatten());
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap();
            let names = common::metrics::named_in(expr);
            assert!(!names.is_empty(), "{}: {expr}", panel["title"]);
            // One release (scrape job) at a time: nothing is counted twice, or across releases.
            assert_eq!(
                expr.matches("seinode_tls_").count(),
                expr.matches(r#"{job=~"$job""#).count(),
                "{}: every selector is the chosen job's: {expr}",
                panel["title"]
            );
            queried.extend(names);
            targets += 1;
        }
    }
    assert!(targets > 10, "{targets} queries");
    for variable in dashboard["templating"]["list"].as_array().unwrap() {
        if let Some(query) = variable["query"]["query"].as_str() {
            queried.extend(common::metrics::named_in(query));
        }
    }
    let unknown: Vec<_> = queried.difference(&exported).collect();
    assert!(
        unknown.is_empty(),
        "the dashboard queries metrics nothing exports: {unknown:?}"
    );
    // And the alerts.
    let alerted: BTreeSet<String> = alert_exprs(&rule_groups(&[]))
        .values()
        .flat_map(|e| common::metrics::named_in(e))
        .collect();
    let unknown: Vec<_> = alerted.difference(&exported).collect();
    assert!(
        unknown.is_empty(),
        "alerts use metrics nothing exports: {unknown:?}"
    );
}
