//! `Capabilities.GetCapabilities`: what this server supports, so clients pick
//! a digest function, batch sizes and compression that will work.

use casbuild_cas::digest::DigestFunction;
use casbuild_proto::reapi::capabilities_server::Capabilities;
use casbuild_proto::reapi::{
    compressor, symlink_absolute_path_strategy, ActionCacheUpdateCapabilities, CacheCapabilities,
    ExecutionCapabilities, GetCapabilitiesRequest, ServerCapabilities,
};
use casbuild_proto::semver::SemVer;
use tonic::{Request, Response, Status};

/// Answers capability queries from the server's configuration.
pub struct CapabilitiesService {
    max_batch_bytes: u64,
    exec_enabled: bool,
}

impl CapabilitiesService {
    /// A service announcing `max_batch_bytes` as the batch limit.
    pub fn new(max_batch_bytes: u64, exec_enabled: bool) -> Self {
        CapabilitiesService { max_batch_bytes, exec_enabled }
    }
}

fn version(major: i32, minor: i32) -> Option<SemVer> {
    Some(SemVer { major, minor, patch: 0, prerelease: String::new() })
}

#[tonic::async_trait]
impl Capabilities for CapabilitiesService {
    async fn get_capabilities(
        &self,
        request: Request<GetCapabilitiesRequest>,
    ) -> Result<Response<ServerCapabilities>, Status> {
        let (principal, request) =
            crate::auth::admit(request, crate::auth::Permission::ReadCache, |r| &r.instance_name)?;
        // Clients learn here whether they may write results themselves.
        let update_enabled = principal.may(crate::auth::Permission::WriteActionCache, &request.instance_name);
        let cache = CacheCapabilities {
            digest_functions: DigestFunction::ALL.iter().map(|f| f.to_proto() as i32).collect(),
            action_cache_update_capabilities: Some(ActionCacheUpdateCapabilities { update_enabled }),
            max_batch_total_size_bytes: self.max_batch_bytes as i64,
            symlink_absolute_path_strategy: symlink_absolute_path_strategy::Value::Allowed as i32,
            supported_compressors: vec![compressor::Value::Zstd as i32],
            supported_batch_update_compressors: vec![compressor::Value::Zstd as i32],
            ..Default::default()
        };
        Ok(Response::new(ServerCapabilities {
            cache_capabilities: Some(cache),
            execution_capabilities: self.exec_enabled.then(|| ExecutionCapabilities {
                digest_function: DigestFunction::Sha256.to_proto() as i32,
                digest_functions: DigestFunction::ALL.iter().map(|f| f.to_proto() as i32).collect(),
                exec_enabled: true,
                ..Default::default()
            }),
            deprecated_api_version: None,
            low_api_version: version(2, 0),
            high_api_version: version(2, 3),
        }))
    }
}
