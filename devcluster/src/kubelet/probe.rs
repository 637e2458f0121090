//! Probes run from the host against the pod's address, as the real kubelet does.
//!
//! `tcpSocket` connects; `httpGet` sends one HTTP/1.1 request (over TLS without certificate
//! verification for `HTTPS`, like the kubelet) and counts 200–399 as success. `exec` and `grpc`
//! probes are not supported and make the container fail to start with a message.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, HTTPGetAction, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::env::ConfigError;

/// What a probe or an HTTP hook does, with ports resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeAction {
    Tcp {
        addr: SocketAddr,
    },
    Http {
        addr: SocketAddr,
        https: bool,
        host: String,
        path: String,
        headers: Vec<(String, String)>,
    },
}

/// Timing of a probe, with Kubernetes' defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeTiming {
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

/// A probe ready to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbePlan {
    pub action: ProbeAction,
    pub timing: ProbeTiming,
}

fn seconds(value: Option<i32>, default: u64) -> Duration {
    Duration::from_secs(value.and_then(|v| u64::try_from(v).ok()).unwrap_or(default))
}

fn count(value: Option<i32>, default: u32) -> u32 {
    value
        .and_then(|v| u32::try_from(v).ok())
        .filter(|v| *v > 0)
        .unwrap_or(default)
}

/// The plan for `probe` of `container`, or why it cannot run here.
pub fn plan(
    probe: &Probe,
    container: &Container,
    pod_ip: Ipv4Addr,
    kind: &str,
) -> Result<ProbePlan, ConfigError> {
    let timing = ProbeTiming {
        initial_delay: seconds(probe.initial_delay_seconds, 0),
        period: seconds(probe.period_seconds, 10).max(Duration::from_secs(1)),
        timeout: seconds(probe.timeout_seconds, 1).max(Duration::from_secs(1)),
        success_threshold: count(probe.success_threshold, 1),
        failure_threshold: count(probe.failure_threshold, 3),
    };
    let action = if let Some(tcp) = &probe.tcp_socket {
        let port = resolve_port(&tcp.port, container)?;
        let ip = probe_target(tcp.host.as_deref(), pod_ip, container)?;
        ProbeAction::Tcp {
            addr: SocketAddr::new(ip, port),
        }
    } else if let Some(http) = &probe.http_get {
        http_action(http, container, pod_ip)?
    } else {
        return Err(ConfigError(format!(
            "{kind} of container {} is not tcpSocket or httpGet; exec and grpc probes are not \
             supported by the devcluster kubelet",
            container.name
        )));
    };
    Ok(ProbePlan { action, timing })
}

/// Where a probe or hook connects: the Pod itself unless `host` says otherwise, and then only
/// an address of this cluster's Pod network or loopback: a Pod spec never makes the host send
/// traffic anywhere else.
fn probe_target(
    host: Option<&str>,
    pod_ip: Ipv4Addr,
    container: &Container,
) -> Result<IpAddr, ConfigError> {
    let Some(host) = host.filter(|h| !h.is_empty()) else {
        return Ok(IpAddr::V4(pod_ip));
    };
    let ip: IpAddr = host.parse().map_err(|_| {
        ConfigError(format!(
            "probe host {host:?} of container {} is not an IP address; the devcluster kubelet \
             probes addresses only",
            container.name
        ))
    })?;
    let [a, b, c, _] = pod_ip.octets();
    let allowed = ip.is_loopback()
        || matches!(ip, IpAddr::V4(v4) if crate::network::in_pod_network(v4, pod_ip));
    if allowed {
        Ok(ip)
    } else {
        Err(ConfigError(format!(
            "probe host {ip} of container {} is outside the Pod network ({a}.{b}.{c}.0/24) and \
             loopback; the devcluster kubelet sends no traffic elsewhere",
            container.name
        )))
    }
}

/// An `httpGet` action (probes and lifecycle hooks).
pub fn http_action(
    http: &HTTPGetAction,
    container: &Container,
    pod_ip: Ipv4Addr,
) -> Result<ProbeAction, ConfigError> {
    let port = resolve_port(&http.port, container)?;
    let ip = probe_target(http.host.as_deref(), pod_ip, container)?;
    let https = match http.scheme.as_deref() {
        None | Some("HTTP") => false,
        Some("HTTPS") => true,
        Some(other) => {
            return Err(ConfigError(format!(
                "httpGet scheme {other} of container {} is not HTTP or HTTPS",
                container.name
            )));
        }
    };
    let mut host = http.host.clone().unwrap_or_else(|| ip.to_string());
    let mut headers = Vec::new();
    for header in http.http_headers.iter().flatten() {
        if header.name.eq_ignore_ascii_case("host") {
            host = header.value.clone();
        } else {
            headers.push((header.name.clone(), header.value.clone()));
        }
    }
    let path = match http.path.as_deref() {
        Some(p) if p.starts_with('/') => p.to_owned(),
        Some(p) => format!("/{p}"),
        None => "/".to_owned(),
    };
    // Each goes into the request as written: no line breaks that would add request lines.
    let texts = [path.as_str(), host.as_str()]
        .into_iter()
        .chain(headers.iter().flat_map(|(n, v)| [n.as_str(), v.as_str()]));
    for text in texts {
        if text.contains(['\r', '\n']) {
            return Err(ConfigError(format!(
                "httpGet of container {} has a line break in its path, host or headers",
                container.name
            )));
        }
    }
    Ok(ProbeAction::Http {
        addr: SocketAddr::new(ip, port),
        https,
        host,
        path,
        headers,
    })
}

/// A port number, or a named port of the container.
pub fn resolve_port(port: &IntOrString, container: &Container) -> Result<u16, ConfigError> {
    match port {
        IntOrString::Int(n) => u16::try_from(*n).map_err(|_| {
            ConfigError(format!(
                "port {n} of container {} is invalid",
                container.name
            ))
        }),
        IntOrString::String(name) => container
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name))
            .and_then(|p| u16::try_from(p.container_port).ok())
            .or_else(|| name.parse().ok())
            .ok_or_else(|| {
                ConfigError(format!(
                    "container {} has no port named {name:?}",
                    container.name
                ))
            }),
    }
}

/// Runs the action once; `Err` carries a short reason for logs.
pub async fn run(action: &ProbeAction, timeout: Duration) -> Result<(), String> {
    match tokio::time::timeout(timeout, run_inner(action)).await {
        Ok(result) => result,
        Err(_) => Err(format!("timed out after {timeout:?}")),
    }
}

async fn run_inner(action: &ProbeAction) -> Result<(), String> {
    match action {
        ProbeAction::Tcp { addr } => TcpStream::connect(addr)
            .await
            .map(drop)
            .map_err(|e| format!("dial tcp {addr}: {e}")),
        ProbeAction::Http {
            addr,
            https,
            host,
            path,
            headers,
        } => {
            let stream = TcpStream::connect(addr)
                .await
                .map_err(|e| format!("dial tcp {addr}: {e}"))?;
            let mut request = format!(
                "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: kube-probe/1.36\r\n\
                 Accept: */*\r\nConnection: close\r\n"
            );
            for (name, value) in headers {
                request.push_str(&format!("{name}: {value}\r\n"));
            }
            request.push_str("\r\n");
            let status = if *https {
                let connector = tokio_rustls::TlsConnector::from(insecure_tls_config()?);
                let name = ServerName::IpAddress(addr.ip().into());
                let tls = connector
                    .connect(name, stream)
                    .await
                    .map_err(|e| format!("tls handshake with {addr}: {e}"))?;
                exchange(tls, &request).await?
            } else {
                exchange(stream, &request).await?
            };
            if (200..400).contains(&status) {
                Ok(())
            } else {
                Err(format!("HTTP probe failed with statuscode: {status}"))
            }
        }
    }
}

/// Sends the request and returns the response's status code.
async fn exchange(
    mut stream: impl AsyncRead + AsyncWrite + Unpin,
    request: &str,
) -> Result<u16, String> {
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("write request: {e}"))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 512];
    while !head.windows(2).any(|w| w == b"\r\n") && head.len() < 8192 {
        let n = stream
            .read(&mut buf)
            .await
            .map_err(|e| format!("read response: {e}"))?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    parse_status(&head).ok_or_else(|| "malformed HTTP response".to_owned())
}

fn parse_status(head: &[u8]) -> Option<u16> {
    let line = String::from_utf8_lossy(head);
    let mut words = line.split_whitespace();
    words.next().filter(|v| v.starts_with("HTTP/"))?;
    words.next()?.parse().ok()
}

fn insecure_tls_config() -> Result<Arc<rustls::ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("tls config: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(NoVerification(provider)))
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The kubelet does not verify probe targets' certificates; neither does this.
#[derive(Debug)]
struct NoVerification(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod target_tests {
    use super::*;

    #[test]
    fn probes_reach_only_the_pod_network_and_loopback() {
        let pod = Ipv4Addr::new(198, 18, 3, 7);
        let container = Container::default();
        assert_eq!(
            probe_target(None, pod, &container).unwrap(),
            IpAddr::V4(pod)
        );
        assert!(probe_target(Some("198.18.3.9"), pod, &container).is_ok());
        assert!(probe_target(Some("127.0.0.1"), pod, &container).is_ok());
        assert!(probe_target(Some("1.1.1.1"), pod, &container).is_err());
        assert!(probe_target(Some("10.0.0.1"), pod, &container).is_err());
        assert!(probe_target(Some("example.com"), pod, &container).is_err());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ContainerPort, TCPSocketAction};

    fn container() -> Container {
        Container {
            name: "app".into(),
            ports: Some(vec![ContainerPort {
                name: Some("https".into()),
                container_port: 8443,
                ..ContainerPort::default()
            }]),
            ..Container::default()
        }
    }

    #[test]
    fn named_ports_resolve_from_the_container() {
        let c = container();
        assert_eq!(
            resolve_port(&IntOrString::String("https".into()), &c).unwrap(),
            8443
        );
        assert_eq!(resolve_port(&IntOrString::Int(80), &c).unwrap(), 80);
        assert!(resolve_port(&IntOrString::String("metrics".into()), &c).is_err());
    }

    #[test]
    fn probe_plan_uses_kubernetes_defaults_and_the_pod_ip() {
        let probe = Probe {
            tcp_socket: Some(TCPSocketAction {
                port: IntOrString::String("https".into()),
                host: None,
            }),
            ..Probe::default()
        };
        let plan = plan(
            &probe,
            &container(),
            Ipv4Addr::new(10, 0, 0, 3),
            "readinessProbe",
        )
        .unwrap();
        assert_eq!(
            plan.action,
            ProbeAction::Tcp {
                addr: "10.0.0.3:8443".parse().unwrap()
            }
        );
        assert_eq!(plan.timing.period, Duration::from_secs(10));
        assert_eq!(plan.timing.failure_threshold, 3);
        assert_eq!(plan.timing.success_threshold, 1);
    }

    #[test]
    fn exec_probe_is_reported_as_unsupported() {
        let probe = Probe::default();
        let error = plan(&probe, &container(), Ipv4Addr::LOCALHOST, "livenessProbe").unwrap_err();
        assert!(
            error.0.contains("livenessProbe of container app"),
            "{error}"
        );
    }

    #[test]
    fn status_line_is_parsed() {
        assert_eq!(parse_status(b"HTTP/1.1 204 No Content\r\n"), Some(204));
        assert_eq!(parse_status(b"garbage"), None);
    }

    #[tokio::test]
    async fn http_probe_succeeds_against_a_local_server() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = socket.read(&mut buf).await;
            let _ = socket
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                .await;
        });
        let action = ProbeAction::Http {
            addr,
            https: false,
            host: "x".into(),
            path: "/healthz".into(),
            headers: vec![],
        };
        run(&action, Duration::from_secs(5)).await.unwrap();
    }
}
