//! Admission webhook for SeiNodes (see issue: built after the foundation and control plane).
