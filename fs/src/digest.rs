//! Content digests: which function, the hash, the size — and how they travel
//! on the wire (REAPI `Digest` protos and `HASH/SIZE` strings).
//!
//! Both supported functions produce 32-byte hashes, so a [`Digest`] is a small
//! `Copy` value that can key maps without allocation.

use std::fmt;
use std::str::FromStr;

use casbuild_proto::reapi;
use casbuild_proto::reapi::digest_function::Value as ProtoFunction;
use sha2::Digest as _;

/// The hash functions casbuild stores blobs under.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum DigestFunction {
    /// BLAKE3: the default for casbuild's own clients (fast, parallel).
    #[default]
    Blake3,
    /// SHA-256: what Bazel and most REAPI clients use.
    Sha256,
}

impl DigestFunction {
    /// Every supported function, in the order capabilities announce them.
    pub const ALL: [DigestFunction; 2] = [DigestFunction::Sha256, DigestFunction::Blake3];

    /// The lowercase name used in resource names and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            DigestFunction::Blake3 => "blake3",
            DigestFunction::Sha256 => "sha256",
        }
    }

    /// The REAPI `DigestFunction.Value` for this function.
    pub fn to_proto(self) -> ProtoFunction {
        match self {
            DigestFunction::Blake3 => ProtoFunction::Blake3,
            DigestFunction::Sha256 => ProtoFunction::Sha256,
        }
    }

    /// Resolves the function of a request: its `digest_function` field when set,
    /// otherwise inferred from the hash length as REAPI asks (64 hex digits mean
    /// SHA-256 — BLAKE3 must always be named explicitly).
    pub fn resolve(requested: i32, hash_hex: &str) -> Result<Self, DigestError> {
        match ProtoFunction::try_from(requested) {
            Ok(ProtoFunction::Unknown) => match hash_hex.len() {
                64 => Ok(DigestFunction::Sha256),
                n => Err(DigestError::UnknownFunction(format!(
                    "no digest_function given and a {n}-digit hash names no supported function"
                ))),
            },
            Ok(ProtoFunction::Sha256) => Ok(DigestFunction::Sha256),
            Ok(ProtoFunction::Blake3) => Ok(DigestFunction::Blake3),
            Ok(other) => Err(DigestError::UnknownFunction(format!(
                "digest function {} is not supported (use sha256 or blake3)",
                other.as_str_name().to_lowercase()
            ))),
            Err(_) => Err(DigestError::UnknownFunction(format!(
                "digest_function {requested} is not a known DigestFunction value"
            ))),
        }
    }

    /// Starts a streaming hash.
    pub fn hasher(self) -> Hasher {
        let state = match self {
            DigestFunction::Blake3 => HashState::Blake3(Box::new(blake3::Hasher::new())),
            DigestFunction::Sha256 => HashState::Sha256(sha2::Sha256::new()),
        };
        Hasher { state, count: 0 }
    }

    /// Digest of `data` in one call.
    pub fn digest_of(self, data: &[u8]) -> Digest {
        let mut hasher = self.hasher();
        hasher.update(data);
        hasher.finish()
    }

    /// The digest of the empty blob, which every store holds implicitly.
    pub fn empty(self) -> Digest {
        self.digest_of(&[])
    }
}

impl FromStr for DigestFunction {
    type Err = DigestError;
    fn from_str(s: &str) -> Result<Self, DigestError> {
        match s {
            "blake3" => Ok(DigestFunction::Blake3),
            "sha256" => Ok(DigestFunction::Sha256),
            other => {
                Err(DigestError::UnknownFunction(format!("unknown digest function {other:?} (use sha256 or blake3)")))
            }
        }
    }
}

impl fmt::Display for DigestFunction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A streaming hasher for either function; [`Hasher::finish`] yields the digest
/// including the number of bytes fed.
pub struct Hasher {
    state: HashState,
    count: u64,
}

enum HashState {
    // Boxed: BLAKE3's state is almost 2 KiB.
    Blake3(Box<blake3::Hasher>),
    Sha256(sha2::Sha256),
}

impl Hasher {
    /// Feeds bytes.
    pub fn update(&mut self, data: &[u8]) {
        self.count += data.len() as u64;
        match &mut self.state {
            HashState::Blake3(h) => {
                h.update(data);
            }
            HashState::Sha256(h) => h.update(data),
        }
    }

    /// Bytes fed so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Finishes the hash.
    pub fn finish(self) -> Digest {
        let (function, hash) = match self.state {
            HashState::Blake3(h) => (DigestFunction::Blake3, *h.finalize().as_bytes()),
            HashState::Sha256(h) => (DigestFunction::Sha256, h.finalize().into()),
        };
        Digest { function, hash, size_bytes: self.count }
    }
}

/// A content digest. Store keys are exactly this triple.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    /// The function that produced `hash`.
    pub function: DigestFunction,
    /// The raw 32-byte hash.
    pub hash: [u8; 32],
    /// The blob's size in bytes.
    pub size_bytes: u64,
}

impl Digest {
    /// Parses a lowercase-hex hash and a size, as found in protos and resource names.
    pub fn from_hex(function: DigestFunction, hash_hex: &str, size: i64) -> Result<Self, DigestError> {
        if hash_hex.len() != 64 {
            return Err(DigestError::Malformed(format!(
                "{function} hash {hash_hex:?} must be 64 hex digits, not {}",
                hash_hex.len()
            )));
        }
        let mut hash = [0u8; 32];
        hex::decode_to_slice(hash_hex, &mut hash)
            .map_err(|_| DigestError::Malformed(format!("hash {hash_hex:?} is not lowercase hex")))?;
        if hash_hex.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(DigestError::Malformed(format!("hash {hash_hex:?} is not lowercase hex")));
        }
        let size_bytes = u64::try_from(size)
            .map_err(|_| DigestError::Malformed(format!("size {size} of {hash_hex} is negative")))?;
        Ok(Digest { function, hash, size_bytes })
    }

    /// Converts a REAPI `Digest` under a known function.
    pub fn from_proto(function: DigestFunction, proto: &reapi::Digest) -> Result<Self, DigestError> {
        Self::from_hex(function, &proto.hash, proto.size_bytes)
    }

    /// Converts a REAPI `Digest`, resolving the function from the request's
    /// `digest_function` field (see [`DigestFunction::resolve`]).
    pub fn from_request(requested: i32, proto: &reapi::Digest) -> Result<Self, DigestError> {
        let function = DigestFunction::resolve(requested, &proto.hash)?;
        Self::from_proto(function, proto)
    }

    /// The REAPI `Digest` proto (the function travels separately on the wire).
    pub fn to_proto(&self) -> reapi::Digest {
        reapi::Digest { hash: self.hash_hex(), size_bytes: self.size_bytes as i64 }
    }

    /// The hash as lowercase hex.
    pub fn hash_hex(&self) -> String {
        hex::encode(self.hash)
    }

    /// Parses `HASH/SIZE` (the form the CLI prints) under `function`.
    pub fn parse(function: DigestFunction, text: &str) -> Result<Self, DigestError> {
        let (hash, size) = text
            .split_once('/')
            .or_else(|| text.split_once('-'))
            .ok_or_else(|| DigestError::Malformed(format!("digest {text:?} is not HASH/SIZE")))?;
        let size: i64 =
            size.parse().map_err(|_| DigestError::Malformed(format!("size in digest {text:?} is not a number")))?;
        Self::from_hex(function, hash, size)
    }

    /// Whether this is the digest of the empty blob.
    pub fn is_empty_blob(&self) -> bool {
        self.size_bytes == 0 && *self == self.function.empty()
    }
}

impl fmt::Display for Digest {
    /// `HASH/SIZE`, the form clients paste into commands.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.hash_hex(), self.size_bytes)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.function, self)
    }
}

/// Why a digest or digest function could not be accepted.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum DigestError {
    /// The digest function is missing, unknown or unsupported.
    #[error("{0}")]
    UnknownFunction(String),
    /// The hash or size is not well formed.
    #[error("{0}")]
    Malformed(String),
}
