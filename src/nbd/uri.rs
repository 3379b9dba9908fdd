//! NBD URIs in libnbd's form: `nbd+unix:///EXPORT?socket=PATH` and
//! `nbd://HOST[:PORT]/EXPORT` (default port 10809).
//!
//! Invariants: parsing is pure and total (errors, never panics); the export
//! name and socket path are percent-decoded; TLS schemes are rejected.

use std::path::PathBuf;

/// Where and what to connect to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdUri {
    Unix {
        socket: PathBuf,
        export: String,
    },
    Tcp {
        host: String,
        port: u16,
        export: String,
    },
}

impl NbdUri {
    pub fn export(&self) -> &str {
        match self {
            NbdUri::Unix { export, .. } | NbdUri::Tcp { export, .. } => export,
        }
    }
}

pub const DEFAULT_PORT: u16 = 10809;

/// Parse an `nbd://` or `nbd+unix://` URI.
pub fn parse_uri(uri: &str) -> Result<NbdUri, String> {
    let (scheme, rest) = uri.split_once("://").ok_or("missing scheme")?;
    let (before_query, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (authority, path) = match before_query.find('/') {
        Some(i) => before_query.split_at(i),
        None => (before_query, ""),
    };
    let export = percent_decode(path.strip_prefix('/').unwrap_or(path))?;
    match scheme {
        "nbd+unix" => {
            if !authority.is_empty() {
                return Err("nbd+unix URI must not have a host".into());
            }
            let socket = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("socket="))
                .ok_or("nbd+unix URI needs ?socket=PATH")?;
            Ok(NbdUri::Unix {
                socket: PathBuf::from(percent_decode(socket)?),
                export,
            })
        }
        "nbd" => {
            let (host, port) = split_host_port(authority)?;
            Ok(NbdUri::Tcp { host, port, export })
        }
        other => Err(format!("unsupported scheme {other:?}")),
    }
}

fn split_host_port(authority: &str) -> Result<(String, u16), String> {
    if authority.is_empty() {
        return Ok(("localhost".into(), DEFAULT_PORT));
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, tail) = v6.split_once(']').ok_or("unterminated IPv6 literal")?;
        (h, tail.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    let port = match port {
        Some(p) => p.parse::<u16>().map_err(|_| format!("bad port {p:?}"))?,
        None => DEFAULT_PORT,
    };
    Ok((host.to_string(), port))
}

fn percent_decode(s: &str) -> Result<String, String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        if b != b'%' {
            out.push(b);
            continue;
        }
        let hex: Option<u8> = (|| {
            let hi = (bytes.next()? as char).to_digit(16)?;
            let lo = (bytes.next()? as char).to_digit(16)?;
            u8::try_from(hi * 16 + lo).ok()
        })();
        out.push(hex.ok_or("bad percent escape")?);
    }
    String::from_utf8(out).map_err(|_| "URI is not UTF-8".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_and_tcp() {
        assert_eq!(
            parse_uri("nbd+unix:///disk%201?socket=/tmp/s.sock").unwrap(),
            NbdUri::Unix {
                socket: "/tmp/s.sock".into(),
                export: "disk 1".into()
            }
        );
        assert_eq!(
            parse_uri("nbd+unix:///?socket=/s").unwrap(),
            NbdUri::Unix {
                socket: "/s".into(),
                export: String::new()
            }
        );
        assert_eq!(
            parse_uri("nbd://127.0.0.1:1234/x").unwrap(),
            NbdUri::Tcp {
                host: "127.0.0.1".into(),
                port: 1234,
                export: "x".into()
            }
        );
        assert_eq!(
            parse_uri("nbd://[::1]/").unwrap(),
            NbdUri::Tcp {
                host: "::1".into(),
                port: DEFAULT_PORT,
                export: String::new()
            }
        );
        for bad in [
            "nbds://h/",
            "nbd+unix://h/?socket=/s",
            "nbd+unix:///x",
            "nbd://h:99999/",
            "x",
            "nbd://h/%zz",
        ] {
            assert!(parse_uri(bad).is_err(), "{bad}");
        }
    }
}
