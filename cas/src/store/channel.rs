//! How a client reaches a casbuild (or any REAPI) server: `grpc://` or
//! `grpcs://` (TLS, optionally with a client certificate), and a credential
//! sent on every call.

use std::path::Path;
use std::task::{Context, Poll};
use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::store::StoreError;

/// TLS material and the credential a client presents.
#[derive(Clone, Default)]
pub struct ConnectOptions {
    /// PEM bundle of the CAs that may sign the server's certificate; the
    /// system's roots when unset.
    pub ca_pem: Option<Vec<u8>>,
    /// PEM certificate chain and private key presented to the server (mTLS).
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// Sent as `authorization: Bearer KEY` on every call (what Bazel sends
    /// with `--remote_header=authorization=Bearer KEY`).
    pub api_key: Option<String>,
}

impl std::fmt::Debug for ConnectOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectOptions")
            .field("ca_pem", &self.ca_pem.as_ref().map(|_| "<pem>"))
            .field("identity", &self.identity.as_ref().map(|_| "<pem>"))
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl ConnectOptions {
    /// Reads the PEM files a command line names; each error names its file.
    pub fn from_files(
        ca: Option<&Path>,
        cert: Option<&Path>,
        key: Option<&Path>,
        api_key: Option<String>,
    ) -> Result<Self, StoreError> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|e| StoreError::InvalidArgument(format!("reading {}: {e}", path.display())))
        };
        let identity =
            match (cert, key) {
                (Some(cert), Some(key)) => Some((read(cert)?, read(key)?)),
                (None, None) => None,
                _ => return Err(StoreError::InvalidArgument(
                    "a client certificate needs its key and a key its certificate (give both --tls-cert and --tls-key)"
                        .into(),
                )),
            };
        Ok(ConnectOptions { ca_pem: ca.map(read).transpose()?, identity, api_key })
    }
}

/// A channel that adds the client's credential to every request. Every
/// generated client takes it in place of a bare [`Channel`].
#[derive(Clone)]
pub struct RemoteChannel {
    channel: Channel,
    authorization: Option<http::HeaderValue>,
}

impl RemoteChannel {
    /// A channel without a credential (tests, and channels made elsewhere).
    pub fn plain(channel: Channel) -> Self {
        RemoteChannel { channel, authorization: None }
    }
}

impl tower_service::Service<http::Request<tonic::body::Body>> for RemoteChannel {
    type Response = http::Response<tonic::body::Body>;
    type Error = tonic::transport::Error;
    type Future = tonic::transport::channel::ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        tower_service::Service::poll_ready(&mut self.channel, cx)
    }

    fn call(&mut self, mut request: http::Request<tonic::body::Body>) -> Self::Future {
        if let Some(value) = &self.authorization {
            request.headers_mut().insert(http::header::AUTHORIZATION, value.clone());
        }
        tower_service::Service::call(&mut self.channel, request)
    }
}

/// Opens a channel to `url` (`grpc://HOST:PORT`, or `grpcs://HOST:PORT` for
/// TLS), tuned for bulk transfers.
pub async fn connect_channel(
    url: &str,
    timeout: Duration,
    options: &ConnectOptions,
) -> Result<RemoteChannel, StoreError> {
    let invalid = |why: String| StoreError::InvalidArgument(format!("remote {url:?}: {why}"));
    let (http_url, tls) = if let Some(rest) = url.strip_prefix("grpc://") {
        (format!("http://{rest}"), false)
    } else if let Some(rest) = url.strip_prefix("grpcs://") {
        (format!("https://{rest}"), true)
    } else if url.starts_with("http://") {
        (url.to_owned(), false)
    } else if url.starts_with("https://") {
        (url.to_owned(), true)
    } else {
        return Err(invalid("must look like grpc://HOST:PORT or grpcs://HOST:PORT".into()));
    };
    if !tls && (options.ca_pem.is_some() || options.identity.is_some()) {
        return Err(invalid("TLS settings were given for a plaintext grpc:// address; use grpcs://".into()));
    }
    let mut endpoint = Endpoint::from_shared(http_url)
        .map_err(|e| invalid(e.to_string()))?
        .connect_timeout(timeout)
        .tcp_nodelay(true)
        .initial_stream_window_size(16 << 20)
        .initial_connection_window_size(32 << 20);
    if tls {
        let mut config = ClientTlsConfig::new();
        config = match &options.ca_pem {
            Some(pem) => config.ca_certificate(Certificate::from_pem(pem)),
            None => config.with_native_roots(),
        };
        if let Some((cert, key)) = &options.identity {
            config = config.identity(Identity::from_pem(cert, key));
        }
        endpoint = endpoint.tls_config(config).map_err(|e| invalid(format!("TLS settings: {e}")))?;
    }
    let authorization = match &options.api_key {
        Some(key) => {
            let mut value = http::HeaderValue::try_from(format!("Bearer {key}"))
                .map_err(|_| invalid("the API key holds characters a header cannot carry".into()))?;
            value.set_sensitive(true);
            Some(value)
        }
        None => None,
    };
    let channel = endpoint.connect().await.map_err(|e| StoreError::Unavailable(connect_failure(url, &chain(&e))))?;
    Ok(RemoteChannel { channel, authorization })
}

/// What a failed connection to `url` says: what was tried, what went
/// wrong, and what to check.
fn connect_failure(url: &str, why: &str) -> String {
    // tonic repeats layers ("tcp connect error: tcp connect error: ..."); keep each once.
    let mut parts: Vec<&str> = Vec::new();
    for part in why.split(": ") {
        if parts.last() != Some(&part) {
            parts.push(part);
        }
    }
    let why = parts.join(": ");
    let hint = if why.contains("Connection refused") {
        "nothing listens there: is `casbuild up` (or `casbuild coordinator`) running at that address? \
         Point --remote or CASBUILD_REMOTE at the one that is"
    } else if why.contains("failed to lookup address") || why.contains("Name or service not known") {
        "the host name does not resolve: check the address in --remote or CASBUILD_REMOTE"
    } else if why.contains("timed out") {
        "no answer: check that the host is up and that no firewall drops the port"
    } else if why.contains("certificate") || why.contains("tls") || why.contains("TLS") {
        "the TLS handshake failed: check --tls-ca (the CA that signed the server's certificate) and grpcs:// vs grpc://"
    } else {
        "check the address in --remote or CASBUILD_REMOTE"
    };
    format!("cannot connect to {url} ({why}); {hint}")
}

/// An error with its sources, which is where TLS says what went wrong.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::connect_failure;

    #[test]
    fn a_refused_connection_says_what_to_check() {
        let message = connect_failure(
            "grpc://127.0.0.1:1",
            "transport error: tcp connect error: tcp connect error: Connection refused (os error 111)",
        );
        assert_eq!(
            message,
            "cannot connect to grpc://127.0.0.1:1 (transport error: tcp connect error: Connection refused (os error \
             111)); nothing listens there: is `casbuild up` (or `casbuild coordinator`) running at that address? \
             Point --remote or CASBUILD_REMOTE at the one that is"
        );
        assert!(connect_failure("grpc://nowhere.invalid:1", "dns error: failed to lookup address information")
            .contains("does not resolve"));
    }
}
