//! What the fuzz targets and the corpus generator share: how `secret_inspection` reads its
//! input (so the generator writes seeds in the same layout), and the check that a message does
//! not echo key bytes.
//!
//! The echo check has to resist the fuzzer itself: libFuzzer watches the comparisons the check
//! makes and can copy a message's own words into the key, so "the key occurs in the message"
//! alone would soon be a false alarm ("has an empty tls.crt" contains "an empty tls"). A run
//! found in a message counts only when it follows the input: with every letter and digit of the
//! key rotated (a→b, Z→A, 9→0), the message must hold the rotated run instead.

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use seinode_tls_crds::validation::TLS_SECRET_TYPE;

// === secret_inspection's input ===

/// Separates tls.crt, tls.key and ca.crt in the `Fields` layout.
pub const FIELD_SEPARATOR: &[u8] = b"\n%%\n";

/// How the bytes after the first become a Secret; the first byte's low two bits pick it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// tls.crt, tls.key and ca.crt separated by [`FIELD_SEPARATOR`] (missing ones absent);
    /// bits 2–3 pick the type: 0 and 1 `kubernetes.io/tls`, 2 `Opaque`, 3 none.
    Fields = 0,
    /// DER of a certificate, framed as a PEM CERTIFICATE, with the fixed key; bit 2 puts it
    /// after the fixed leaf (an intermediate) instead of as the leaf.
    CertificateDer = 1,
    /// DER of a key, framed as PEM with the tag bits 2–3 pick ([`KEY_TAGS`]), with the fixed
    /// leaf.
    KeyDer = 2,
    /// PEM text as tls.crt with the fixed key (bit 2 clear) or as tls.key with the fixed leaf.
    Pem = 3,
}

/// The PEM tags of the `KeyDer` layout, by bits 2–3 of the first byte.
pub const KEY_TAGS: [&str; 4] = [
    "PRIVATE KEY",
    "RSA PRIVATE KEY",
    "EC PRIVATE KEY",
    "ENCRYPTED PRIVATE KEY",
];

/// A certificate and its key, PEM: what a layout does not take from the input.
pub struct FixedPair {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

/// The parts of a Secret a fuzz input describes.
#[derive(Debug, Clone, Default)]
pub struct SecretParts {
    pub type_: Option<String>,
    pub tls_crt: Option<Vec<u8>>,
    pub tls_key: Option<Vec<u8>>,
    pub ca_crt: Option<Vec<u8>>,
}

impl SecretParts {
    /// Reads a fuzz input in the layout its first byte names.
    pub fn decode(data: &[u8], fixed: &FixedPair) -> Option<Self> {
        let (&mode, rest) = data.split_first()?;
        let tls = Some(TLS_SECRET_TYPE.to_owned());
        let bits = (mode >> 2) & 0b11;
        let parts = match mode & 0b11 {
            0 => {
                let mut fields = split(rest, FIELD_SEPARATOR).into_iter().map(<[u8]>::to_vec);
                SecretParts {
                    type_: match bits {
                        0 | 1 => tls,
                        2 => Some("Opaque".to_owned()),
                        _ => None,
                    },
                    tls_crt: fields.next(),
                    tls_key: fields.next(),
                    ca_crt: fields.next(),
                }
            }
            1 => {
                let framed = pem_frame("CERTIFICATE", rest);
                let tls_crt = if bits & 1 == 1 {
                    [fixed.cert_pem.as_slice(), &framed].concat()
                } else {
                    framed
                };
                SecretParts {
                    type_: tls,
                    tls_crt: Some(tls_crt),
                    tls_key: Some(fixed.key_pem.clone()),
                    ca_crt: None,
                }
            }
            2 => SecretParts {
                type_: tls,
                tls_crt: Some(fixed.cert_pem.clone()),
                tls_key: Some(pem_frame(KEY_TAGS[usize::from(bits)], rest)),
                ca_crt: None,
            },
            _ if bits & 1 == 0 => SecretParts {
                type_: tls,
                tls_crt: Some(rest.to_vec()),
                tls_key: Some(fixed.key_pem.clone()),
                ca_crt: None,
            },
            _ => SecretParts {
                type_: tls,
                tls_crt: Some(fixed.cert_pem.clone()),
                tls_key: Some(rest.to_vec()),
                ca_crt: None,
            },
        };
        Some(parts)
    }

    /// The same parts with the letters and digits of tls.key rotated (see the module doc).
    pub fn with_rotated_key(&self) -> Self {
        let mut rotated = self.clone();
        if let Some(key) = rotated.tls_key.as_mut() {
            rotate_alphanumerics(key);
        }
        rotated
    }

    pub fn to_secret(&self) -> Secret {
        let data = [
            ("tls.crt", &self.tls_crt),
            ("tls.key", &self.tls_key),
            ("ca.crt", &self.ca_crt),
        ]
        .into_iter()
        .filter_map(|(name, value)| Some((name.to_owned(), ByteString(value.clone()?))))
        .collect();
        Secret {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                name: Some("rpc-tls".to_owned()),
                namespace: Some("sei".to_owned()),
                ..Default::default()
            },
            type_: self.type_.clone(),
            data: Some(data),
            ..Default::default()
        }
    }
}

/// An input of the `Fields` layout (for the corpus generator).
pub fn encode_fields(type_bits: u8, fields: &[&[u8]]) -> Vec<u8> {
    let mut data = vec![(type_bits & 0b11) << 2];
    data.extend_from_slice(&fields.join(FIELD_SEPARATOR));
    data
}

/// An input of another layout (for the corpus generator).
pub fn encode(layout: Layout, bits: u8, payload: &[u8]) -> Vec<u8> {
    let mut data = vec![layout as u8 | ((bits & 0b11) << 2)];
    data.extend_from_slice(payload);
    data
}

fn pem_frame(tag: &str, der: &[u8]) -> Vec<u8> {
    pem::encode(&pem::Pem::new(tag, der.to_vec())).into_bytes()
}

fn split<'a>(bytes: &'a [u8], separator: &[u8]) -> Vec<&'a [u8]> {
    let mut parts = Vec::new();
    let mut rest = bytes;
    while let Some(at) = find(rest, separator) {
        parts.push(&rest[..at]);
        rest = &rest[at + separator.len()..];
    }
    parts.push(rest);
    parts
}

// === Echo check ===

/// Where `needle` first occurs in `haystack`.
pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Rotates ASCII letters and digits by one within their class; leaves other bytes alone, so
/// lengths, UTF-8 validity and the base64 alphabet are kept.
pub fn rotate_alphanumerics(bytes: &mut [u8]) {
    for byte in bytes {
        *byte = match *byte {
            b'z' => b'a',
            b'Z' => b'A',
            b'9' => b'0',
            b if b.is_ascii_alphanumeric() => b + 1,
            b => b,
        };
    }
}

/// A copy of `bytes` rotated by [`rotate_alphanumerics`].
pub fn rotated(bytes: &[u8]) -> Vec<u8> {
    let mut copy = bytes.to_vec();
    rotate_alphanumerics(&mut copy);
    copy
}

/// Runs of `len` bytes of `secret` (with at least one letter or digit, so rotation moves them)
/// that occur in `message`, as offsets into `secret`. Linear in both lengths: the message's runs
/// go into a set first.
pub fn runs_in(secret: &[u8], message: &[u8], len: usize) -> Vec<usize> {
    if secret.len() < len || message.len() < len {
        return Vec::new();
    }
    let in_message: std::collections::HashSet<&[u8]> = message.windows(len).collect();
    secret
        .windows(len)
        .enumerate()
        .filter(|(_, run)| in_message.contains(run))
        .filter(|(_, run)| run.iter().any(u8::is_ascii_alphanumeric))
        .map(|(at, _)| at)
        .collect()
}
