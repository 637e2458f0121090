//! A Kubernetes cluster on one machine, for the tests and for `seinode-tls local`; never part of
//! the shipped binary.
//!
//! The control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler) is built
//! from Go modules into a cache outside the repository (`tools/control-plane/build.sh`) and run
//! as child processes on loopback. As root, a process kubelet runs the Pods the scheduler binds
//! to its Node from their specs, each in a network namespace of its own, with images mapped to
//! local executables. Everything it starts is stopped on drop, and by a watchdog process when
//! the owning process dies without dropping it.

pub mod cluster;
pub mod control_plane;
pub mod kubelet;
pub mod network;
pub mod standin;
pub mod watchdog;
