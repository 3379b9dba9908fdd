//! HTTPS for the service: the operator's certificate (`--tls-cert`/`--tls-key`, PEM), or a
//! self-signed one made at the first start and kept under the repository (`tls/`, 0600), so
//! that clients which pinned its fingerprint keep trusting the same one.

use crate::{Error, Result};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A server's TLS setup and what to tell the operator about it.
pub struct Tls {
    pub config: Arc<rustls::ServerConfig>,
    /// SHA-256 of the certificate (DER), colon-separated hex, as browsers show it.
    pub fingerprint: String,
    pub cert: PathBuf,
    /// Made here, now.
    pub made: bool,
}

fn read_pem(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::io(format!("read {}", path.display()), e))
}

fn bad(path: &Path, what: &str) -> Error {
    Error::usage(format!("{}: {what}", path.display()))
}

/// Load the certificate chain and key at `cert`/`key`, or with neither, the self-signed pair
/// under `dir/tls` (made now if absent, for `names`: host names and addresses).
pub fn load(dir: &Path, cert: Option<&Path>, key: Option<&Path>, names: &[String]) -> Result<Tls> {
    let (cert, key, made) = match (cert, key) {
        (Some(c), Some(k)) => (c.to_path_buf(), k.to_path_buf(), false),
        (None, None) => {
            let tls = dir.join("tls");
            let (c, k) = (tls.join("cert.pem"), tls.join("key.pem"));
            let made = !c.exists() || !k.exists();
            if made {
                make_self_signed(&tls, &c, &k, names)?;
            }
            (c, k, made)
        }
        _ => return Err(Error::usage("--tls-cert and --tls-key go together")),
    };
    let chain: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut &read_pem(&cert)?[..])
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| bad(&cert, &format!("not a PEM certificate: {e}")))?;
    let Some(first) = chain.first() else {
        return Err(bad(&cert, "no certificate in it"));
    };
    let fingerprint = Sha256::digest(first.as_ref())
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":");
    let private: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut &read_pem(&key)?[..])
        .map_err(|e| bad(&key, &format!("not a PEM key: {e}")))?
        .ok_or_else(|| bad(&key, "no private key in it"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::internal(format!("TLS: {e}")))?
        .with_no_client_auth()
        .with_single_cert(chain, private)
        .map_err(|e| bad(&cert, &format!("the certificate and key do not fit: {e}")))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Tls {
        config: Arc::new(config),
        fingerprint,
        cert,
        made,
    })
}

fn make_self_signed(dir: &Path, cert: &Path, key: &Path, names: &[String]) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
    let mut names = names.to_vec();
    for n in ["localhost", "127.0.0.1", "::1"] {
        if !names.iter().any(|x| x == n) {
            names.push(n.to_string());
        }
    }
    let made = rcgen::generate_simple_self_signed(names)
        .map_err(|e| Error::internal(format!("make a TLS certificate: {e}")))?;
    // The key first: a certificate without its key would be taken as a pair next start.
    crate::sys::write_atomic(key, made.key_pair.serialize_pem().as_bytes(), true)
        .map_err(|e| Error::io(format!("write {}", key.display()), e))?;
    crate::sys::write_atomic(cert, made.cert.pem().as_bytes(), true)
        .map_err(|e| Error::io(format!("write {}", cert.display()), e))
}
