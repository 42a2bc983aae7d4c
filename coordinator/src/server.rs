//! The gRPC server: every service wired onto one listener, with explicit
//! shutdown.

use std::future::Future;
use std::sync::Arc;

use casbuild_cas::storage::Storage;
use casbuild_proto::asset::fetch_server::FetchServer;
use casbuild_proto::asset::push_server::PushServer;
use casbuild_proto::bytestream::byte_stream_server::ByteStreamServer;
use casbuild_proto::cc::existence_filter_server::ExistenceFilterServer;
use casbuild_proto::graph::graphs_server::GraphsServer;
use casbuild_proto::longrunning::operations_server::OperationsServer;
use casbuild_proto::reapi::action_cache_server::ActionCacheServer;
use casbuild_proto::reapi::capabilities_server::CapabilitiesServer;
use casbuild_proto::reapi::content_addressable_storage_server::ContentAddressableStorageServer;
use casbuild_proto::reapi::execution_server::ExecutionServer;
use casbuild_proto::worker::workers_server::WorkersServer;
use futures::StreamExt;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::service::InterceptorLayer;
use tonic::transport::{Server, ServerTlsConfig};

use crate::action_cache::ActionCacheService;
use crate::asset::AssetService;
use crate::auth::Authenticator;
use crate::bytestream::ByteStreamService;
use crate::capabilities::CapabilitiesService;
use crate::cas::CasService;
use crate::execution::ExecutionService;
use crate::existence::ExistenceService;
use crate::graph::GraphsService;
use crate::metrics::{GrpcMetricsLayer, Health};
use crate::scheduler::Scheduler;
use crate::workers::{WorkerPool, WorkersService};

/// Settings of the REAPI server.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Largest total of blob bytes in one batch call, announced in capabilities.
    pub max_batch_bytes: u64,
    /// Who may do what; by default the open server (everything but admin,
    /// for everyone), which only suits loopback.
    pub auth: Arc<Authenticator>,
    /// TLS on the listener (server certificate, and the CA of client
    /// certificates when clients may present them).
    pub tls: Option<ServerTlsConfig>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_batch_bytes: 4 << 20,
            auth: Arc::new(Authenticator::new(None, None).expect("the open table always builds")),
            tls: None,
        }
    }
}

/// How often the health service probes the storage.
const HEALTH_PROBE_PERIOD: std::time::Duration = std::time::Duration::from_secs(5);

/// Largest gRPC message accepted: a full batch plus its framing, or a
/// ByteStream chunk of any reasonable size.
const MAX_MESSAGE: usize = 16 << 20;

/// Serves the REAPI storage services on `listener` until `shutdown` resolves;
/// calls in flight are then allowed to finish.
pub async fn serve(
    listener: TcpListener,
    storage: Arc<Storage>,
    config: ServerConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    serve_with_execution(listener, storage, config, None, shutdown).await
}

/// What serves Execute: the scheduler, and the remote worker pool it places
/// actions on (whose `Workers` service is then served too).
pub struct ExecutionConfig {
    /// The scheduler behind Execution and Operations.
    pub scheduler: Arc<Scheduler>,
    /// Remote workers, when the scheduler's executor is a pool.
    pub workers: Option<Arc<WorkerPool>>,
}

/// Like [`serve`], plus the Execution and Operations services (and the
/// workers' service) when execution is configured.
pub async fn serve_with_execution(
    listener: TcpListener,
    storage: Arc<Storage>,
    config: ServerConfig,
    execution: Option<ExecutionConfig>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let (scheduler, workers) = match execution {
        Some(e) => (Some(e.scheduler), e.workers),
        None => (None, None),
    };
    let max_message = MAX_MESSAGE.max(config.max_batch_bytes as usize * 2);
    let cas = ContentAddressableStorageServer::new(CasService::new(storage.clone(), config.max_batch_bytes))
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(max_message);
    let bytestream = ByteStreamServer::new(ByteStreamService::new(storage.clone()))
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(max_message);
    let action_cache = ActionCacheServer::new(ActionCacheService::new(storage.clone()))
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(max_message);
    let capabilities = CapabilitiesServer::new(CapabilitiesService::new(config.max_batch_bytes, scheduler.is_some()));
    let graphs = scheduler.clone().map(|scheduler| GraphsServer::new(GraphsService::new(storage.clone(), scheduler)));
    let execution = scheduler.map(|scheduler| ExecutionService::new(storage.clone(), scheduler));
    let operations = execution.clone().map(OperationsServer::new);
    let execution = execution.map(ExecutionServer::new);
    let workers = workers.map(|pool| WorkersServer::new(WorkersService::new(pool)));
    let existence = ExistenceFilterServer::new(ExistenceService::new(storage.clone()))
        .max_encoding_message_size(max_message.max(2 * crate::existence::BITS / 8));
    let assets = AssetService::new(storage.clone());
    let fetch = FetchServer::new(assets.clone());
    let push = PushServer::new(assets);
    // The builder's own tcp_nodelay only applies to listeners it binds, so
    // set it on each accepted connection: with Nagle on, small responses wait
    // for the client's delayed ACK (~40 ms per call).
    let incoming = TcpListenerStream::new(listener).map(|conn| {
        if let Ok(stream) = &conn {
            if let Err(e) = stream.set_nodelay(true) {
                tracing::warn!("TCP_NODELAY on a connection: {e}");
            }
        }
        conn
    });
    // grpc.health.v1: SERVING while the storage takes writes.
    let (reporter, health) = tonic_health::server::health_reporter();
    let _watching = Health::new(storage.clone(), reporter).watch(HEALTH_PROBE_PERIOD);
    let (reflection, reflection_alpha) = reflection(workers.is_some(), graphs.is_some());
    let mut builder = Server::builder();
    if let Some(tls) = config.tls.clone() {
        builder = builder.tls_config(tls)?;
    }
    let auth = config.auth.clone();
    builder
        .initial_stream_window_size(16 << 20)
        .initial_connection_window_size(32 << 20)
        // Outermost, so that calls refused by authentication are counted too.
        .layer(GrpcMetricsLayer)
        .layer(InterceptorLayer::new(move |request| auth.intercept(request)))
        .add_service(health)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(capabilities)
        .add_service(cas)
        .add_service(bytestream)
        .add_service(action_cache)
        .add_service(fetch)
        .add_service(push)
        .add_service(existence)
        .add_optional_service(execution)
        .add_optional_service(operations)
        .add_optional_service(workers)
        .add_optional_service(graphs)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}

/// gRPC server reflection (v1, and the v1alpha that older clients ask for)
/// over the services this server runs whose descriptors casbuild has: the
/// health service, the existence filter and, when served, the Workers and
/// Graphs protocols. REAPI's own services are not described: the
/// `bazel-remote-apis` crate ships no descriptors of them (docs/DEPLOY.md).
fn reflection(
    workers: bool,
    graphs: bool,
) -> (
    tonic_reflection::server::v1::ServerReflectionServer<impl tonic_reflection::server::v1::ServerReflection>,
    tonic_reflection::server::v1alpha::ServerReflectionServer<impl tonic_reflection::server::v1alpha::ServerReflection>,
) {
    let mut names =
        vec!["grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection", "casbuild.cc.v1.ExistenceFilter"];
    if workers {
        names.push("casbuild.worker.v1.Workers");
    }
    if graphs {
        names.push("casbuild.graph.v1.Graphs");
    }
    let builder = || {
        let builder = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(casbuild_proto::FILE_DESCRIPTOR_SET);
        names.iter().fold(builder, |builder, name| builder.with_service_name(*name))
    };
    // Both sets are built into the binary: one that does not decode is a build defect.
    let v1 = builder().build_v1().expect("the built-in descriptor sets decode");
    let v1alpha = builder().build_v1alpha().expect("the built-in descriptor sets decode");
    (v1, v1alpha)
}
