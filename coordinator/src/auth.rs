//! Who is calling, and what they may do.
//!
//! Every call is identified once, by a layer in front of all services: an
//! API key (`authorization: Bearer KEY`, what Bazel sends with
//! `--remote_header`), else a TLS client certificate, else nobody. The
//! [`Principal`] found rides in the request's extensions, and each service
//! method asks [`require`] for the [`Permission`] it needs on the instance it
//! touches. Keys are configured by their BLAKE3 hash, certificates by the
//! SHA-256 of their DER encoding; the table can be replaced while serving
//! ([`Authenticator::replace`]), which is how the coordinator reloads it.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};

use serde::Deserialize;
use sha2::Digest as _;
use tonic::{Request, Status};

/// A role granted to a key, a certificate or to anonymous callers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Read the action cache, the CAS and Remote Asset records.
    CacheRead,
    /// Also upload blobs and write action-cache and Remote Asset entries
    /// (what Bazel's `--remote_upload_local_results` needs).
    CacheWrite,
    /// Read the cache, upload inputs and run actions (Execute, graphs), and
    /// follow or cancel one's own operations.
    Execute,
    /// Serve as a worker: take leases, read inputs, upload outputs.
    Worker,
    /// Everything, including cancelling operations other callers share.
    Admin,
}

/// What one call needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Permission {
    /// GetActionResult, CAS and ByteStream reads, Remote Asset Fetch.
    ReadCache,
    /// BatchUpdateBlobs, ByteStream writes.
    WriteCas,
    /// UpdateActionResult, Remote Asset Push.
    WriteActionCache,
    /// Execute, WaitExecution, the Operations service, graphs.
    Execute,
    /// The Workers service.
    Work,
    /// Acting on what other callers own.
    Admin,
}

impl Role {
    fn grants(self, permission: Permission) -> bool {
        use Permission as P;
        match self {
            Role::Admin => true,
            Role::CacheRead => permission == P::ReadCache,
            Role::CacheWrite => matches!(permission, P::ReadCache | P::WriteCas | P::WriteActionCache),
            Role::Execute => matches!(permission, P::ReadCache | P::WriteCas | P::Execute),
            Role::Worker => matches!(permission, P::ReadCache | P::WriteCas | P::Work),
        }
    }
}

/// The `[auth]` table of the coordinator's config file.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Roles of calls that carry no credential (none by default).
    #[serde(default)]
    pub anonymous: Vec<Role>,
    /// API keys.
    #[serde(default)]
    pub keys: Vec<KeyConfig>,
    /// TLS client certificates.
    #[serde(default)]
    pub certs: Vec<CertConfig>,
}

/// One API key, by the BLAKE3 hash of its text (`casbuild auth new-key`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// Who holds it, for logs and error messages.
    pub name: String,
    /// 64 hex digits: BLAKE3 of the key.
    pub blake3: String,
    /// What it may do.
    pub roles: Vec<Role>,
    /// The instances the roles hold on; every instance when absent.
    pub instances: Option<Vec<String>>,
}

/// One client certificate, by the SHA-256 of its DER encoding (what
/// `openssl x509 -noout -fingerprint -sha256` prints, colons optional).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertConfig {
    /// Who holds it.
    pub name: String,
    /// 64 hex digits.
    pub sha256: String,
    /// What it may do.
    pub roles: Vec<Role>,
    /// The instances the roles hold on; every instance when absent.
    pub instances: Option<Vec<String>>,
}

/// An identified caller and its grants.
#[derive(Clone, Debug)]
pub struct Principal {
    name: Arc<str>,
    roles: Arc<[Role]>,
    /// `None`: every instance.
    instances: Option<Arc<HashSet<String>>>,
    anonymous: bool,
}

impl Principal {
    fn new(name: &str, roles: &[Role], instances: Option<&[String]>, anonymous: bool) -> Self {
        Principal {
            name: name.into(),
            roles: roles.into(),
            instances: instances.map(|list| Arc::new(list.iter().cloned().collect())),
            anonymous,
        }
    }

    /// A caller that may do everything (in-process callers and tests).
    pub fn trusted() -> Self {
        Principal::new("trusted", &[Role::Admin], None, false)
    }

    /// Who this is, for messages and logs ("anonymous" without credentials).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the caller holds `permission` on `instance`.
    pub fn may(&self, permission: Permission, instance: &str) -> bool {
        let on_instance = self.instances.as_ref().is_none_or(|set| set.contains(instance));
        on_instance && self.roles.iter().any(|role| role.grants(permission))
    }

    /// Whether the caller holds `permission` on every instance (worker and
    /// admin actions, which are not tied to one).
    pub fn may_everywhere(&self, permission: Permission) -> bool {
        self.instances.is_none() && self.roles.iter().any(|role| role.grants(permission))
    }

    fn denied(&self, permission: Permission, instance: Option<&str>) -> Status {
        let what = match permission {
            Permission::ReadCache => "read the cache",
            Permission::WriteCas => "upload blobs",
            Permission::WriteActionCache => "write action-cache or asset entries (needs the cache-write role)",
            Permission::Execute => "execute actions",
            Permission::Work => "serve as a worker",
            Permission::Admin => "act on other callers' operations (needs the admin role)",
        };
        let place = match instance {
            Some(instance) => format!(" on instance {instance:?}"),
            None => String::new(),
        };
        if self.anonymous {
            Status::unauthenticated(format!(
                "calls without credentials may not {what}{place}; send an API key (authorization: Bearer KEY) or a \
                 client certificate"
            ))
        } else {
            Status::permission_denied(format!("{:?} may not {what}{place}", &*self.name))
        }
    }
}

/// Unwraps `request` for a caller who holds `permission` on the instance
/// the message names (whose shape is checked first).
pub fn admit<T>(
    request: Request<T>,
    permission: Permission,
    instance_of: impl Fn(&T) -> &str,
) -> Result<(Principal, T), Status> {
    let principal = principal(&request)?;
    let message = request.into_inner();
    let instance = instance_of(&message);
    crate::status::check_instance(instance)?;
    check(&principal, permission, instance)?;
    Ok((principal, message))
}

/// Checks that `principal` holds `permission` on `instance`.
pub fn check(principal: &Principal, permission: Permission, instance: &str) -> Result<(), Status> {
    if principal.may(permission, instance) {
        Ok(())
    } else {
        Err(principal.denied(permission, Some(instance)))
    }
}

/// The caller of `request`, which must hold `permission` on every instance.
pub fn require_everywhere<T>(request: &Request<T>, permission: Permission) -> Result<Principal, Status> {
    let principal = principal(request)?;
    if principal.may_everywhere(permission) {
        Ok(principal)
    } else {
        Err(principal.denied(permission, None))
    }
}

/// The caller the authentication layer found. A request that did not pass
/// through it is refused: a wiring mistake must not open the server.
pub fn principal<T>(request: &Request<T>) -> Result<Principal, Status> {
    request.extensions().get::<Principal>().cloned().ok_or_else(|| Status::internal("the call was not authenticated"))
}

/// The identification table, replaceable while serving.
pub struct Authenticator {
    table: RwLock<Arc<Table>>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let table = self.table();
        f.debug_struct("Authenticator")
            .field("keys", &table.keys.len())
            .field("certs", &table.certs.len())
            .field("anonymous", &table.anonymous.roles)
            .finish()
    }
}

struct Table {
    anonymous: Principal,
    keys: HashMap<[u8; 32], Principal>,
    certs: HashMap<[u8; 32], Principal>,
}

/// Roles of callers without credentials when no `[auth]` table is given:
/// today's open server (everything but admin), and the worker role only
/// while no worker token guards it.
fn open_roles(worker_token: bool) -> Vec<Role> {
    let mut roles = vec![Role::CacheWrite, Role::Execute];
    if !worker_token {
        roles.push(Role::Worker);
    }
    roles
}

impl Authenticator {
    /// The table for `config` (or the open server without one), plus the
    /// worker token, which is a key with the worker role.
    pub fn new(config: Option<&AuthConfig>, worker_token: Option<&str>) -> Result<Self, String> {
        let table = Table::build(config, worker_token)?;
        Ok(Authenticator { table: RwLock::new(Arc::new(table)) })
    }

    /// Replaces the table; on error the old one stays.
    pub fn replace(&self, config: Option<&AuthConfig>, worker_token: Option<&str>) -> Result<(), String> {
        let table = Table::build(config, worker_token)?;
        *self.table.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(table);
        Ok(())
    }

    /// How many keys and certificates are configured.
    pub fn counts(&self) -> (usize, usize) {
        let table = self.table();
        (table.keys.len(), table.certs.len())
    }

    /// Whether calls without any credential may write, execute or serve as
    /// a worker (the open configuration, fit for loopback only).
    pub fn anonymous_may_write(&self) -> bool {
        let table = self.table();
        [Permission::WriteCas, Permission::WriteActionCache, Permission::Execute, Permission::Work]
            .into_iter()
            .any(|p| table.anonymous.may_everywhere(p))
    }

    /// Whether anyone without credentials may serve as a worker.
    pub fn anonymous_workers(&self) -> bool {
        self.table().anonymous.may_everywhere(Permission::Work)
    }

    fn table(&self) -> Arc<Table> {
        self.table.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Identifies a caller from its metadata and TLS certificates.
    pub fn identify(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        peer_certs: Option<&[tonic::transport::CertificateDer<'static>]>,
    ) -> Result<Principal, Status> {
        let table = self.table();
        if let Some(value) = metadata.get("authorization") {
            let text = value.to_str().map_err(|_| Status::unauthenticated("the authorization header is not text"))?;
            let key = text
                .strip_prefix("Bearer ")
                .or_else(|| text.strip_prefix("bearer "))
                .ok_or_else(|| Status::unauthenticated("the authorization header must read \"Bearer KEY\""))?;
            let hash: [u8; 32] = blake3::hash(key.trim().as_bytes()).into();
            return table.keys.get(&hash).cloned().ok_or_else(|| Status::unauthenticated("unknown API key"));
        }
        if let Some(leaf) = peer_certs.and_then(|certs| certs.first()) {
            let fingerprint: [u8; 32] = sha2::Sha256::digest(leaf.as_ref()).into();
            if let Some(principal) = table.certs.get(&fingerprint) {
                return Ok(principal.clone());
            }
        }
        Ok(table.anonymous.clone())
    }

    /// The layer's function: identify, then hand the principal on.
    pub fn intercept(&self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let certs = request.peer_certs();
        let principal = self.identify(request.metadata(), certs.as_deref().map(Vec::as_slice))?;
        request.extensions_mut().insert(principal);
        Ok(request)
    }
}

impl Table {
    fn build(config: Option<&AuthConfig>, worker_token: Option<&str>) -> Result<Table, String> {
        let anonymous_roles = match config {
            Some(config) => config.anonymous.clone(),
            None => open_roles(worker_token.is_some()),
        };
        let mut table = Table {
            anonymous: Principal::new("anonymous", &anonymous_roles, None, true),
            keys: HashMap::new(),
            certs: HashMap::new(),
        };
        if let Some(token) = worker_token {
            // Keys are compared as `identify` reads them: without surrounding blanks.
            let hash: [u8; 32] = blake3::hash(token.trim().as_bytes()).into();
            table.keys.insert(hash, Principal::new("worker-token", &[Role::Worker], None, false));
        }
        for key in config.map(|c| c.keys.as_slice()).unwrap_or_default() {
            let hash = hex32(&key.blake3).map_err(|why| format!("auth key {:?}: blake3 {why}", key.name))?;
            let principal = Principal::new(&key.name, &key.roles, key.instances.as_deref(), false);
            if table.keys.insert(hash, principal).is_some() {
                return Err(format!("auth key {:?}: the same key is configured twice", key.name));
            }
        }
        for cert in config.map(|c| c.certs.as_slice()).unwrap_or_default() {
            let hash = hex32(&cert.sha256).map_err(|why| format!("auth cert {:?}: sha256 {why}", cert.name))?;
            let principal = Principal::new(&cert.name, &cert.roles, cert.instances.as_deref(), false);
            if table.certs.insert(hash, principal).is_some() {
                return Err(format!("auth cert {:?}: the same certificate is configured twice", cert.name));
            }
        }
        Ok(table)
    }
}

/// 32 bytes from 64 hex digits, colons allowed between pairs.
fn hex32(text: &str) -> Result<[u8; 32], String> {
    let digits: String = text.chars().filter(|c| *c != ':').collect();
    if digits.len() != 64 || !digits.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!("must be 64 hex digits, not {text:?}"));
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&digits[2 * i..2 * i + 2], 16).map_err(|e| e.to_string())?;
    }
    Ok(out)
}

/// A new random API key and the hash a config file names it by.
pub fn new_key() -> (String, String) {
    let key = format!("cbk_{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple());
    let hash = blake3::hash(key.as_bytes()).to_hex().to_string();
    (key, hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> AuthConfig {
        let (_, hash) = new_key();
        toml_config(&format!(
            r#"
            anonymous = ["cache-read"]
            [[keys]]
            name = "ci"
            blake3 = "{hash}"
            roles = ["execute"]
            instances = ["team-a"]
            "#
        ))
    }

    fn toml_config(text: &str) -> AuthConfig {
        toml::from_str(text).unwrap()
    }

    fn metadata(key: &str) -> tonic::metadata::MetadataMap {
        let mut map = tonic::metadata::MetadataMap::new();
        map.insert("authorization", format!("Bearer {key}").parse().unwrap());
        map
    }

    #[test]
    fn roles_hold_on_their_instances_only() {
        let (key, hash) = new_key();
        let mut config = config();
        config.keys[0].blake3 = hash;
        let auth = Authenticator::new(Some(&config), None).unwrap();
        let ci = auth.identify(&metadata(&key), None).unwrap();
        assert_eq!(ci.name(), "ci");
        assert!(ci.may(Permission::Execute, "team-a"));
        assert!(ci.may(Permission::WriteCas, "team-a"));
        assert!(!ci.may(Permission::Execute, "team-b"));
        assert!(!ci.may(Permission::WriteActionCache, "team-a"));
        assert!(!ci.may_everywhere(Permission::Execute));
        let anonymous = auth.identify(&tonic::metadata::MetadataMap::new(), None).unwrap();
        assert!(anonymous.may(Permission::ReadCache, "anything"));
        assert!(!anonymous.may(Permission::WriteCas, "anything"));
        assert_eq!(anonymous.denied(Permission::WriteCas, Some("")).code(), tonic::Code::Unauthenticated);
        assert_eq!(ci.denied(Permission::WriteActionCache, Some("")).code(), tonic::Code::PermissionDenied);
    }

    #[test]
    fn unknown_or_malformed_keys_are_refused() {
        let auth = Authenticator::new(Some(&config()), None).unwrap();
        let err = auth.identify(&metadata("not-a-key"), None).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        let mut basic = tonic::metadata::MetadataMap::new();
        basic.insert("authorization", "Basic dXNlcjpwdw==".parse().unwrap());
        assert_eq!(auth.identify(&basic, None).unwrap_err().code(), tonic::Code::Unauthenticated);
    }

    #[test]
    fn the_open_server_grants_all_but_admin_and_a_worker_token_takes_the_worker_role() {
        let open = Authenticator::new(None, None).unwrap();
        let anyone = open.identify(&tonic::metadata::MetadataMap::new(), None).unwrap();
        assert!(anyone.may_everywhere(Permission::Work) && anyone.may(Permission::WriteActionCache, ""));
        assert!(!anyone.may_everywhere(Permission::Admin));
        let guarded = Authenticator::new(None, Some("s3cret")).unwrap();
        let anyone = guarded.identify(&tonic::metadata::MetadataMap::new(), None).unwrap();
        assert!(!anyone.may_everywhere(Permission::Work) && anyone.may(Permission::Execute, ""));
        let worker = guarded.identify(&metadata("s3cret"), None).unwrap();
        assert!(worker.may_everywhere(Permission::Work) && !worker.may(Permission::Execute, ""));
    }

    #[test]
    fn a_bad_table_is_refused_and_the_old_one_stays() {
        let (key, hash) = new_key();
        let mut config = config();
        config.keys[0].blake3 = hash;
        let auth = Authenticator::new(Some(&config), None).unwrap();
        let mut bad = config.clone();
        bad.keys[0].blake3 = "xyz".into();
        let err = auth.replace(Some(&bad), None).unwrap_err();
        assert!(err.contains("\"ci\"") && err.contains("64 hex digits"), "{err}");
        assert!(auth.identify(&metadata(&key), None).is_ok());
        auth.replace(Some(&AuthConfig::default()), None).unwrap();
        assert!(auth.identify(&metadata(&key), None).is_err());
    }

    #[test]
    fn certificates_are_named_by_their_fingerprint() {
        let der = tonic::transport::CertificateDer::from(b"not really DER, but hashed all the same".to_vec());
        let fingerprint = sha2::Sha256::digest(der.as_ref());
        let colons: Vec<String> = fingerprint.iter().map(|b| format!("{b:02X}")).collect();
        let config = AuthConfig {
            certs: vec![CertConfig {
                name: "worker-7".into(),
                sha256: colons.join(":"),
                roles: vec![Role::Worker],
                instances: None,
            }],
            ..Default::default()
        };
        let auth = Authenticator::new(Some(&config), None).unwrap();
        let found = auth.identify(&tonic::metadata::MetadataMap::new(), Some(std::slice::from_ref(&der))).unwrap();
        assert_eq!(found.name(), "worker-7");
        let other = tonic::transport::CertificateDer::from(b"another".to_vec());
        let found = auth.identify(&tonic::metadata::MetadataMap::new(), Some(&[other])).unwrap();
        assert_eq!(found.name(), "anonymous");
    }
}
