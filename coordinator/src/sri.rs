//! `checksum.sri` qualifiers of the Remote Asset API: a Subresource
//! Integrity value (`sha256-BASE64`, several separated by spaces) that the
//! asset's content must match. A pushed blob is hashed from the CAS before
//! the asset is recorded, and again before it is served, so no qualifier
//! ever vouches for bytes it does not describe.

use base64::Engine;
use casbuild_cas::digest::Digest;
use casbuild_cas::store::BlobStore;
use futures::StreamExt;
use sha2::Digest as _;
use tonic::Status;

use crate::status::store_status;

/// The qualifier's name.
pub const QUALIFIER: &str = "checksum.sri";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Algorithm {
    Sha256,
    Sha384,
    Sha512,
}

/// The (algorithm, expected hash) pairs of an SRI value; options after `?`
/// are ignored, as the SRI spec says.
fn parse(value: &str) -> Result<Vec<(Algorithm, Vec<u8>)>, String> {
    let mut out = Vec::new();
    for token in value.split_ascii_whitespace() {
        let token = token.split('?').next().unwrap_or_default();
        let (name, encoded) = token.split_once('-').ok_or_else(|| format!("{token:?} is not ALGORITHM-BASE64"))?;
        let algorithm = match name {
            "sha256" => Algorithm::Sha256,
            "sha384" => Algorithm::Sha384,
            "sha512" => Algorithm::Sha512,
            other => return Err(format!("hash algorithm {other:?} is not one of sha256, sha384, sha512")),
        };
        let hash = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .map_err(|e| format!("{token:?}: the hash is not base64: {e}"))?;
        out.push((algorithm, hash));
    }
    if out.is_empty() {
        return Err("the value lists no hash".into());
    }
    Ok(out)
}

/// Hashes of `digest`'s content with every algorithm `wanted` names.
async fn hashes(
    cas: &dyn BlobStore,
    digest: &Digest,
    wanted: &[Algorithm],
) -> Result<Vec<(Algorithm, Vec<u8>)>, Status> {
    let (mut a, mut b, mut c) = (sha2::Sha256::new(), sha2::Sha384::new(), sha2::Sha512::new());
    let mut stream = cas.read(digest, 0, None).await.map_err(store_status)?;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(store_status)?;
        for algorithm in wanted {
            match algorithm {
                Algorithm::Sha256 => a.update(&chunk),
                Algorithm::Sha384 => b.update(&chunk),
                Algorithm::Sha512 => c.update(&chunk),
            }
        }
    }
    let all = [
        (Algorithm::Sha256, a.finalize().to_vec()),
        (Algorithm::Sha384, b.finalize().to_vec()),
        (Algorithm::Sha512, c.finalize().to_vec()),
    ];
    Ok(all.into_iter().filter(|(algorithm, _)| wanted.contains(algorithm)).collect())
}

/// Checks the blob `digest` against the `checksum.sri` value among
/// `qualifiers`, if there is one: INVALID_ARGUMENT when the value is
/// malformed or names another content.
pub async fn check(cas: &dyn BlobStore, digest: &Digest, qualifiers: &[(String, String)]) -> Result<(), Status> {
    let Some((_, value)) = qualifiers.iter().find(|(name, _)| name == QUALIFIER) else { return Ok(()) };
    let expected = parse(value).map_err(|e| Status::invalid_argument(format!("qualifier {QUALIFIER}: {e}")))?;
    let wanted: Vec<Algorithm> = expected.iter().map(|(algorithm, _)| *algorithm).collect();
    let actual = hashes(cas, digest, &wanted).await?;
    if expected.iter().any(|pair| actual.contains(pair)) {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "qualifier {QUALIFIER} {value:?} does not match the content of blob {digest}"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sri_values_parse_with_clear_errors() {
        let parsed = parse("sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU= sha512-z4PhNX7vuL3xVChQ1m2AB9Yg5AULVxXcg/SpIdNs6c5H0NE8XYXysP+DGNKHfuwvY7kxvUdBeoGlODJ6+SfaPg==?opt").unwrap();
        assert_eq!(parsed[0].0, Algorithm::Sha256);
        assert_eq!(parsed[0].1, sha2::Sha256::digest(b"").to_vec());
        assert_eq!(parsed[1].1, sha2::Sha512::digest(b"").to_vec());
        assert!(parse("md5-1B2M2Y8AsgTpgAmY7PhCfg==").unwrap_err().contains("not one of"));
        assert!(parse("sha256-!!!").unwrap_err().contains("base64"));
        assert!(parse("  ").is_err());
    }
}
