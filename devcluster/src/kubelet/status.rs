//! Pod status as the kubelet reports it, computed from what the containers are doing.
//!
//! Pure: the pod worker keeps a [`ContainerRecord`] per container and asks [`pod_status`] for
//! the status to write, so phases, conditions and the CrashLoopBackOff wording are unit-tested.

use std::net::Ipv4Addr;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateTerminated, ContainerStateWaiting, ContainerStatus, HostIP, Pod,
    PodCondition, PodIP, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

/// The longest restart back-off, as the kubelet's.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// A container that ran this long has its back-off reset.
pub const BACKOFF_RESET: Duration = Duration::from_secs(600);

/// The back-off before restart number `failures` (0-based): `base` doubling, capped.
pub fn backoff(base: Duration, failures: u32) -> Duration {
    let factor = 2u32.saturating_pow(failures.min(20));
    base.saturating_mul(factor).min(MAX_BACKOFF)
}

/// A duration as Go prints it (`10s`, `1m20s`, `5m0s`), for kubelet-shaped messages.
pub fn go_duration(duration: Duration) -> String {
    let secs = duration.as_secs();
    if secs >= 60 {
        format!("{}m{}s", secs / 60, secs % 60)
    } else if duration.subsec_millis() > 0 && secs == 0 {
        format!("{}ms", duration.as_millis())
    } else {
        format!("{secs}s")
    }
}

/// The kubelet's CrashLoopBackOff message.
pub fn crash_loop_message(delay: Duration, container: &str, pod: &Pod) -> String {
    format!(
        "back-off {} restarting failed container={container} pod={}_{}({})",
        go_duration(delay),
        pod.metadata.name.as_deref().unwrap_or_default(),
        pod.metadata.namespace.as_deref().unwrap_or_default(),
        pod.metadata.uid.as_deref().unwrap_or_default(),
    )
}

pub fn waiting(reason: &str, message: impl Into<String>) -> ContainerState {
    ContainerState {
        waiting: Some(ContainerStateWaiting {
            reason: Some(reason.to_owned()),
            message: Some(message.into()),
        }),
        ..ContainerState::default()
    }
}

pub fn terminated(
    exit_code: i32,
    started: Option<Timestamp>,
    finished: Timestamp,
) -> ContainerState {
    ContainerState {
        terminated: Some(ContainerStateTerminated {
            exit_code,
            reason: Some(if exit_code == 0 { "Completed" } else { "Error" }.to_owned()),
            started_at: started.map(Time),
            finished_at: Some(Time(finished)),
            ..ContainerStateTerminated::default()
        }),
        ..ContainerState::default()
    }
}

/// What one container is doing.
#[derive(Debug, Clone, PartialEq)]
pub struct ContainerRecord {
    pub name: String,
    pub image: String,
    pub state: ContainerState,
    pub last_state: Option<ContainerState>,
    pub ready: bool,
    pub started: bool,
    pub restart_count: i32,
    pub pid: Option<u32>,
    /// It will not run again (completed init container, or terminal under the restart policy).
    pub finished: bool,
}

impl ContainerRecord {
    pub fn new(name: &str, image: &str) -> Self {
        Self {
            name: name.to_owned(),
            image: image.to_owned(),
            state: waiting("ContainerCreating", ""),
            last_state: None,
            ready: false,
            started: false,
            restart_count: 0,
            pid: None,
            finished: false,
        }
    }

    fn exit_code(&self) -> Option<i32> {
        self.state.terminated.as_ref().map(|t| t.exit_code)
    }

    /// An init container that completed, or a sidecar that started and keeps running.
    fn initialized(&self) -> bool {
        if self.finished {
            self.exit_code() == Some(0)
        } else {
            self.started && self.running()
        }
    }

    fn running(&self) -> bool {
        self.state.running.is_some()
    }

    fn has_run(&self) -> bool {
        self.running() || self.state.terminated.is_some() || self.last_state.is_some()
    }

    fn status(&self) -> ContainerStatus {
        ContainerStatus {
            name: self.name.clone(),
            image: self.image.clone(),
            image_id: format!("devcluster://{}", super::images::repository_of(&self.image)),
            container_id: self.pid.map(|pid| format!("devcluster://{pid}")),
            ready: self.ready,
            started: Some(self.started),
            restart_count: self.restart_count,
            state: Some(self.state.clone()),
            last_state: Some(self.last_state.clone().unwrap_or_default()),
            ..ContainerStatus::default()
        }
    }
}

/// Everything the status depends on besides the pod.
#[derive(Debug, Clone)]
pub struct StatusInput<'a> {
    pub pod: &'a Pod,
    pub pod_ip: Option<Ipv4Addr>,
    pub host_ip: Ipv4Addr,
    pub start_time: Timestamp,
    pub init: &'a [ContainerRecord],
    pub containers: &'a [ContainerRecord],
    /// A sandbox exists (the pod has its network).
    pub sandbox_ready: bool,
}

/// The pod's status; conditions keep their transition time while their status holds, and
/// conditions the kubelet does not own (PodScheduled, readiness gates) are kept.
pub fn pod_status(input: &StatusInput<'_>, now: Timestamp) -> PodStatus {
    let pod = input.pod;
    let previous = pod.status.clone().unwrap_or_default();
    let init_failed = input
        .init
        .iter()
        .any(|c| c.finished && c.exit_code().is_some_and(|code| code != 0));
    let initialized = input.init.iter().all(ContainerRecord::initialized);
    let all_finished = !input.containers.is_empty() && input.containers.iter().all(|c| c.finished);
    let phase = if init_failed {
        "Failed"
    } else if !initialized {
        "Pending"
    } else if all_finished {
        if input.containers.iter().all(|c| c.exit_code() == Some(0)) {
            "Succeeded"
        } else {
            "Failed"
        }
    } else if input.containers.iter().any(ContainerRecord::has_run) {
        "Running"
    } else {
        "Pending"
    };

    let unready: Vec<&str> = input
        .containers
        .iter()
        .filter(|c| !c.ready)
        .map(|c| c.name.as_str())
        .collect();
    let incomplete: Vec<&str> = input
        .init
        .iter()
        .filter(|c| !c.initialized())
        .map(|c| c.name.as_str())
        .collect();
    let gates_ok = pod
        .spec
        .as_ref()
        .and_then(|s| s.readiness_gates.as_ref())
        .into_iter()
        .flatten()
        .all(|gate| {
            previous
                .conditions
                .iter()
                .flatten()
                .any(|c| c.type_ == gate.condition_type && c.status == "True")
        });
    let completed = phase == "Succeeded" || phase == "Failed";

    let mut owned = vec![
        condition("PodReadyToStartContainers", input.sandbox_ready, None, None),
        if initialized {
            condition("Initialized", true, None, None)
        } else {
            condition(
                "Initialized",
                false,
                Some("ContainersNotInitialized"),
                Some(format!(
                    "containers with incomplete status: [{}]",
                    incomplete.join(" ")
                )),
            )
        },
    ];
    let (ready, reason, message) = if completed {
        (false, Some("PodCompleted"), None)
    } else if !unready.is_empty() {
        (
            false,
            Some("ContainersNotReady"),
            Some(format!(
                "containers with unready status: [{}]",
                unready.join(" ")
            )),
        )
    } else {
        (true, None, None)
    };
    owned.push(condition("ContainersReady", ready, reason, message.clone()));
    let pod_ready = ready && gates_ok;
    let (reason, message) = if ready && !gates_ok {
        (
            Some("ReadinessGatesNotReady"),
            Some("the status of pod readiness gates is not \"True\"".to_owned()),
        )
    } else {
        (reason, message)
    };
    owned.push(condition("Ready", pod_ready, reason, message));

    let mut conditions: Vec<PodCondition> = previous
        .conditions
        .iter()
        .flatten()
        .filter(|c| !owned.iter().any(|o| o.type_ == c.type_))
        .cloned()
        .collect();
    for mut new in owned {
        let old = previous
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == new.type_);
        new.last_transition_time = match old {
            Some(old) if old.status == new.status => old.last_transition_time.clone(),
            _ => Some(Time(now)),
        };
        conditions.push(new);
    }

    let ip = input.pod_ip.map(|ip| ip.to_string());
    PodStatus {
        phase: Some(phase.to_owned()),
        conditions: Some(conditions),
        pod_ip: ip.clone(),
        pod_ips: ip.map(|ip| vec![PodIP { ip }]),
        host_ip: Some(input.host_ip.to_string()),
        host_ips: Some(vec![HostIP {
            ip: input.host_ip.to_string(),
        }]),
        start_time: Some(Time(input.start_time)),
        qos_class: previous.qos_class.clone(),
        container_statuses: Some(
            input
                .containers
                .iter()
                .map(ContainerRecord::status)
                .collect(),
        ),
        init_container_statuses: (!input.init.is_empty())
            .then(|| input.init.iter().map(ContainerRecord::status).collect()),
        ..PodStatus::default()
    }
}

fn condition(
    type_: &str,
    status: bool,
    reason: Option<&str>,
    message: Option<String>,
) -> PodCondition {
    PodCondition {
        type_: type_.to_owned(),
        status: if status { "True" } else { "False" }.to_owned(),
        reason: reason.map(str::to_owned),
        message,
        ..PodCondition::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ContainerStateRunning, PodSpec};
    use kube::api::ObjectMeta;

    fn pod() -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("web-0".into()),
                namespace: Some("ns".into()),
                uid: Some("u-1".into()),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec::default()),
            status: Some(PodStatus {
                conditions: Some(vec![PodCondition {
                    type_: "PodScheduled".into(),
                    status: "True".into(),
                    ..PodCondition::default()
                }]),
                ..PodStatus::default()
            }),
        }
    }

    fn running(name: &str, ready: bool) -> ContainerRecord {
        ContainerRecord {
            state: ContainerState {
                running: Some(ContainerStateRunning::default()),
                ..ContainerState::default()
            },
            ready,
            started: true,
            pid: Some(42),
            ..ContainerRecord::new(name, "app:v1")
        }
    }

    fn status_of(pod: &Pod, init: &[ContainerRecord], containers: &[ContainerRecord]) -> PodStatus {
        pod_status(
            &StatusInput {
                pod,
                pod_ip: Some(Ipv4Addr::new(10, 0, 0, 4)),
                host_ip: Ipv4Addr::new(10, 0, 0, 1),
                start_time: Timestamp::UNIX_EPOCH,
                init,
                containers,
                sandbox_ready: true,
            },
            Timestamp::UNIX_EPOCH,
        )
    }

    fn condition_of<'a>(status: &'a PodStatus, type_: &str) -> &'a PodCondition {
        status
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == type_)
            .unwrap()
    }

    #[test]
    fn backoff_doubles_from_the_base_and_stops_at_five_minutes() {
        let base = Duration::from_secs(10);
        let delays: Vec<u64> = (0..7).map(|n| backoff(base, n).as_secs()).collect();
        assert_eq!(delays, [10, 20, 40, 80, 160, 300, 300]);
        assert_eq!(backoff(base, 1000), MAX_BACKOFF);
    }

    #[test]
    fn crash_loop_message_reads_like_the_kubelets() {
        assert_eq!(
            crash_loop_message(Duration::from_secs(80), "app", &pod()),
            "back-off 1m20s restarting failed container=app pod=web-0_ns(u-1)"
        );
        assert_eq!(go_duration(Duration::from_secs(300)), "5m0s");
        assert_eq!(go_duration(Duration::from_secs(20)), "20s");
    }

    #[test]
    fn running_ready_pod_is_ready_and_keeps_pod_scheduled() {
        let pod = pod();
        let status = status_of(&pod, &[], &[running("app", true)]);
        assert_eq!(status.phase.as_deref(), Some("Running"));
        assert_eq!(condition_of(&status, "Ready").status, "True");
        assert_eq!(condition_of(&status, "PodScheduled").status, "True");
        assert_eq!(status.pod_ip.as_deref(), Some("10.0.0.4"));
        let container = &status.container_statuses.unwrap()[0];
        assert_eq!(container.container_id.as_deref(), Some("devcluster://42"));
    }

    #[test]
    fn unready_container_is_named_in_the_conditions() {
        let pod = pod();
        let status = status_of(&pod, &[], &[running("app", true), running("proxy", false)]);
        let ready = condition_of(&status, "ContainersReady");
        assert_eq!(ready.status, "False");
        assert_eq!(
            ready.message.as_deref(),
            Some("containers with unready status: [proxy]")
        );
        assert_eq!(condition_of(&status, "Ready").status, "False");
    }

    #[test]
    fn pod_waiting_for_init_is_pending_and_not_initialized() {
        let pod = pod();
        let mut init = ContainerRecord::new("setup", "app:v1");
        init.state = waiting("CrashLoopBackOff", "back-off");
        let status = status_of(&pod, &[init], &[ContainerRecord::new("app", "app:v1")]);
        assert_eq!(status.phase.as_deref(), Some("Pending"));
        let initialized = condition_of(&status, "Initialized");
        assert_eq!(initialized.status, "False");
        assert_eq!(
            initialized.message.as_deref(),
            Some("containers with incomplete status: [setup]")
        );
        assert_eq!(status.init_container_statuses.unwrap().len(), 1);
    }

    #[test]
    fn finished_containers_decide_succeeded_or_failed() {
        let pod = pod();
        let done = |code| ContainerRecord {
            state: terminated(code, None, Timestamp::UNIX_EPOCH),
            finished: true,
            ..ContainerRecord::new("job", "app:v1")
        };
        assert_eq!(
            status_of(&pod, &[], &[done(0)]).phase.as_deref(),
            Some("Succeeded")
        );
        let failed = status_of(&pod, &[], &[done(2)]);
        assert_eq!(failed.phase.as_deref(), Some("Failed"));
        assert_eq!(
            condition_of(&failed, "Ready").reason.as_deref(),
            Some("PodCompleted")
        );
    }

    #[test]
    fn transition_time_stays_while_the_condition_holds() {
        let mut pod = pod();
        let first = status_of(&pod, &[], &[running("app", true)]);
        pod.status = Some(first.clone());
        let later = pod_status(
            &StatusInput {
                pod: &pod,
                pod_ip: Some(Ipv4Addr::new(10, 0, 0, 4)),
                host_ip: Ipv4Addr::new(10, 0, 0, 1),
                start_time: Timestamp::UNIX_EPOCH,
                init: &[],
                containers: &[running("app", true)],
                sandbox_ready: true,
            },
            Timestamp::UNIX_EPOCH + jiff::SignedDuration::from_secs(60),
        );
        assert_eq!(first, later);
    }
}
