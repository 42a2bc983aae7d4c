//! A throwaway PKI made with the `openssl` command line in a directory: a CA,
//! a server certificate for 127.0.0.1, and client certificates. Shared by
//! `casbuild bench cas` and the TLS tests (which include this file by path;
//! it needs only std). `scripts/setup-debian.sh` installs openssl.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The files live in `dir`: `ca.pem`, `server.pem`/`server.key`, and
/// `NAME.pem`/`NAME.key` per client.
pub struct Pki {
    dir: PathBuf,
}

impl Pki {
    /// A new CA and a server certificate for 127.0.0.1 and localhost.
    pub fn new(dir: &Path) -> Result<Pki, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let pki = Pki { dir: dir.to_path_buf() };
        pki.new_key("ca.key", &["-x509", "-out", "ca.pem", "-days", "2", "-subj", "/CN=casbuild test CA"])?;
        pki.issue("server", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")?;
        Ok(pki)
    }

    fn openssl(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(&self.dir)
            .output()
            .map_err(|e| format!("running openssl (apt-get install openssl): {e}"))?;
        if !out.status.success() {
            return Err(format!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr)));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `openssl req` making a new P-256 key in `keyout`, plus `rest`.
    fn new_key(&self, keyout: &str, rest: &[&str]) -> Result<(), String> {
        let mut args = vec!["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", keyout];
        args.extend_from_slice(rest);
        self.openssl(&args).map(drop)
    }

    /// `NAME.pem` and `NAME.key`, signed by the CA, with `extensions`.
    fn issue(&self, name: &str, extensions: &str) -> Result<(), String> {
        let (key, csr, pem, ext) =
            (format!("{name}.key"), format!("{name}.csr"), format!("{name}.pem"), format!("{name}.ext"));
        std::fs::write(self.dir.join(&ext), extensions).map_err(|e| format!("writing {ext}: {e}"))?;
        self.new_key(&key, &["-out", &csr, "-subj", &format!("/CN={name}")])?;
        let signed = ["x509", "-req", "-in", &csr, "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial"];
        self.openssl(&[&signed[..], &["-out", &pem, "-days", "2", "-extfile", &ext]].concat()).map(drop)
    }

    /// A client certificate and the SHA-256 fingerprint `[auth]` names it by.
    #[allow(dead_code)] // the bench uses none
    pub fn client(&self, name: &str) -> Result<String, String> {
        self.issue(name, "extendedKeyUsage=clientAuth\n")?;
        let text = self.openssl(&["x509", "-noout", "-fingerprint", "-sha256", "-in", &format!("{name}.pem")])?;
        Ok(text.trim().rsplit('=').next().unwrap_or_default().to_owned())
    }

    /// The directory holding the files.
    #[allow(dead_code)] // the bench uses none
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The path of one of the files.
    pub fn path(&self, file: &str) -> String {
        self.dir.join(file).to_string_lossy().into_owned()
    }
}
