//! The flags every client role shares for reaching a server: TLS material
//! for `grpcs://` and an API key.

use std::path::PathBuf;

use casbuild_cas::store::ConnectOptions;

use crate::config::secret;

/// How a client authenticates to the server and checks who the server is.
#[derive(clap::Args, Clone, Default)]
pub struct ClientAuth {
    /// PEM bundle of the CAs that sign a grpcs:// server's certificate [default: the system's roots].
    #[arg(long, env = "CASBUILD_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate, for servers that identify clients by certificate (mTLS).
    #[arg(long, env = "CASBUILD_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "CASBUILD_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// API key sent as `authorization: Bearer KEY` on every call.
    #[arg(long, env = "CASBUILD_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// A file whose first line is the API key (keeps it out of `ps`).
    #[arg(long, env = "CASBUILD_API_KEY_FILE")]
    pub api_key_file: Option<PathBuf>,
}

impl ClientAuth {
    /// The connect options these flags describe; files are read now, so a
    /// missing one is reported before anything connects.
    pub fn options(&self) -> anyhow::Result<ConnectOptions> {
        let api_key = secret(self.api_key.clone(), self.api_key_file.as_deref())?;
        self.options_with_key(api_key)
    }

    /// Like [`ClientAuth::options`], with the key from elsewhere (a worker's token).
    pub fn options_with_key(&self, api_key: Option<String>) -> anyhow::Result<ConnectOptions> {
        Ok(ConnectOptions::from_files(
            self.tls_ca.as_deref(),
            self.tls_cert.as_deref(),
            self.tls_key.as_deref(),
            api_key,
        )?)
    }
}
