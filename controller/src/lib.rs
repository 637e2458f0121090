//! SeiNode reconciler (built after the foundation and control plane).
