//! Who is calling: bearer tokens for scripts, a session cookie (with a CSRF token on every
//! state-changing request) for the dashboard, the peer's uid on the local unix socket.
//! Failed logins are rate-limited per user and per address.

use super::{ok, ApiError, ApiResult, Body, Shared};
use crate::auth::{Principal, Role, Scope, UsersFile};
use crate::Error;
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, Method};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

/// The cookie that carries a session.
pub const COOKIE: &str = "holdfast_session";
/// The header that carries a session's CSRF token.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// A session unused this long ends.
const SESSION_IDLE: Duration = Duration::from_secs(12 * 3600);
/// Failed logins allowed per user and per address within [`FAIL_WINDOW`].
const MAX_FAILURES: u32 = 5;
const FAIL_WINDOW: Duration = Duration::from_secs(60);

/// Where a connection comes from (set by the server on every request).
#[derive(Clone, Debug, Default)]
pub struct Peer {
    pub addr: Option<SocketAddr>,
    /// The peer's uid on the unix socket.
    pub uid: Option<u32>,
}

/// `users.toml`, read again whenever it changed on disk (`holdfast user …` edits it while the
/// service runs).
pub struct Users {
    path: PathBuf,
    /// The file as last read, keyed by inode and mtime (every save is a rename: a new inode).
    cache: RwLock<(Option<(u64, SystemTime)>, UsersFile)>,
}

impl Users {
    pub fn new(path: PathBuf) -> Users {
        Users {
            path,
            cache: RwLock::new((None, UsersFile::default())),
        }
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// The users as they are on disk now.
    pub fn get(&self) -> Result<UsersFile, Error> {
        use std::os::unix::fs::MetadataExt;
        let mtime = std::fs::metadata(&self.path)
            .and_then(|m| Ok((m.ino(), m.modified()?)))
            .ok();
        {
            let c = crate::sys::read(&self.cache);
            if c.0 == mtime && mtime.is_some() {
                return Ok(c.1.clone());
            }
        }
        let f = UsersFile::load(&self.path)?;
        *crate::sys::write(&self.cache) = (mtime, f.clone());
        Ok(f)
    }

    /// Change the users file (load, edit, save) under a lock.
    pub fn edit<T>(&self, f: impl FnOnce(&mut UsersFile) -> Result<T, Error>) -> Result<T, Error> {
        let r = UsersFile::edit(&self.path, f)?;
        *crate::sys::write(&self.cache) = (None, UsersFile::default());
        Ok(r)
    }
}

struct Session {
    user: String,
    csrf: String,
    last: Instant,
}

#[derive(Default)]
pub struct Sessions {
    live: Mutex<HashMap<String, Session>>,
    failures: Mutex<HashMap<String, (u32, Instant)>>,
}

fn random_hex() -> Result<String, Error> {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).map_err(|e| Error::internal(format!("no randomness: {e}")))?;
    Ok(hex::encode(b))
}

impl Sessions {
    fn start(&self, user: &str) -> Result<(String, String), Error> {
        let (id, csrf) = (random_hex()?, random_hex()?);
        let mut live = crate::sys::lock(&self.live);
        live.retain(|_, s| s.last.elapsed() < SESSION_IDLE);
        live.insert(
            id.clone(),
            Session {
                user: user.to_string(),
                csrf: csrf.clone(),
                last: Instant::now(),
            },
        );
        Ok((id, csrf))
    }

    /// The user and CSRF token of a live session (and it stays alive).
    fn find(&self, id: &str) -> Option<(String, String)> {
        let mut live = crate::sys::lock(&self.live);
        let s = live
            .get_mut(id)
            .filter(|s| s.last.elapsed() < SESSION_IDLE)?;
        s.last = Instant::now();
        Some((s.user.clone(), s.csrf.clone()))
    }

    fn end(&self, id: &str) {
        crate::sys::lock(&self.live).remove(id);
    }

    /// Refuse while `key` has failed too often lately.
    fn check(&self, key: &str) -> Result<(), Error> {
        let f = crate::sys::lock(&self.failures);
        match f.get(key) {
            Some((n, since)) if *n >= MAX_FAILURES && since.elapsed() < FAIL_WINDOW => {
                Err(Error::RateLimited(format!(
                    "too many failed logins; wait {} s and retry",
                    (FAIL_WINDOW - since.elapsed()).as_secs() + 1
                )))
            }
            _ => Ok(()),
        }
    }

    fn failed(&self, key: &str) {
        let mut f = crate::sys::lock(&self.failures);
        let e = f.entry(key.to_string()).or_insert((0, Instant::now()));
        if e.1.elapsed() >= FAIL_WINDOW {
            *e = (0, Instant::now());
        }
        e.0 += 1;
    }

    fn succeeded(&self, key: &str) {
        crate::sys::lock(&self.failures).remove(key);
    }
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| {
            let (k, v) = kv.trim().split_once('=')?;
            (k == name).then(|| v.to_string())
        })
}

fn unauthenticated() -> ApiError {
    ApiError(Error::Unauthenticated(
        "authenticate: `Authorization: Bearer USER!TOKEN:SECRET`, or log in at /api/v1/login"
            .into(),
    ))
}

/// The authenticated caller of a request.
pub struct Caller(pub Principal);

impl FromRequestParts<Shared> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, s: &Shared) -> Result<Self, Self::Rejection> {
        let who = parts.extensions.get::<super::audit::Who>().cloned();
        let r = Self::check(parts, s).await;
        if let (Some(w), Ok(c)) = (who, &r) {
            w.set(&c.0.name);
        }
        r
    }
}

impl Caller {
    async fn check(parts: &mut Parts, s: &Shared) -> Result<Caller, ApiError> {
        let peer = parts.extensions.get::<Peer>().cloned().unwrap_or_default();
        // The service's own unix socket: root, or the user the service runs as.
        if let Some(uid) = peer.uid {
            // SAFETY: geteuid has no preconditions and cannot fail.
            let me = unsafe { libc::geteuid() };
            if uid == 0 || uid == me {
                let name = if uid == me {
                    crate::sys::user_name()
                } else {
                    "root".into()
                };
                return Ok(Caller(Principal::local(&name)));
            }
        }
        let users = s.users.get()?;
        if let Some(v) = parts.headers.get(header::AUTHORIZATION) {
            let bearer = v
                .to_str()
                .ok()
                .and_then(|v| v.strip_prefix("Bearer "))
                .unwrap_or("");
            return users
                .token(bearer.trim(), crate::timefmt::now_millis())
                .map(Caller)
                .ok_or_else(|| {
                    ApiError(Error::Unauthenticated(
                        "the token is unknown, revoked or expired".into(),
                    ))
                });
        }
        let Some(id) = cookie(&parts.headers, COOKIE) else {
            return Err(unauthenticated());
        };
        let Some((user, csrf)) = s.sessions.find(&id) else {
            return Err(unauthenticated());
        };
        let safe = matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS);
        let sent = parts.headers.get(CSRF_HEADER).and_then(|v| v.to_str().ok());
        if !safe && sent != Some(csrf.as_str()) {
            return Err(ApiError(Error::Forbidden(format!(
                "a state-changing request with a session cookie needs the {CSRF_HEADER} header \
                 that login returned"
            ))));
        }
        // Rights as they are now: a role or assignment changed since login applies at once.
        users
            .principal_of(&user)
            .map(Caller)
            .ok_or_else(unauthenticated)
    }
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    pub user: String,
    pub password: String,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct LoginReply {
    pub user: String,
    pub role: Role,
    /// Send it back as the `X-CSRF-Token` header on every state-changing request.
    pub csrf: String,
}

/// Log in with a password: a session cookie and its CSRF token.
#[utoipa::path(post, path = "/api/v1/login", request_body = LoginRequest, tag = "auth",
    responses((status = 200, body = LoginReply), (status = 400, body = super::openapi::ErrorReply),
        (status = 401, body = super::openapi::ErrorReply), (status = 413, body = super::openapi::ErrorReply),
        (status = 422, body = super::openapi::ErrorReply), (status = 429, body = super::openapi::ErrorReply)))]
pub async fn login(
    State(s): State<Shared>,
    peer: Option<axum::Extension<Peer>>,
    who: Option<axum::Extension<super::audit::Who>>,
    Body(req): Body<LoginRequest>,
) -> ApiResult<Response> {
    if let Some(w) = who {
        w.0.set(&req.user);
    }
    let addr = peer
        .and_then(|p| p.0.addr)
        .map(|a| format!("a:{}", a.ip()))
        .unwrap_or_else(|| "a:local".into());
    let user_key = format!("u:{}", req.user);
    s.sessions.check(&user_key)?;
    s.sessions.check(&addr)?;
    let users = s.users.get()?;
    let password = req.password.clone();
    let name = req.user.clone();
    // argon2 is deliberate CPU work: off the async threads.
    let who = tokio::task::spawn_blocking(move || users.login(&name, &password))
        .await
        .map_err(Error::internal)?;
    let Some(p) = who else {
        s.sessions.failed(&user_key);
        s.sessions.failed(&addr);
        return Err(ApiError(Error::Unauthenticated(
            "wrong user name or password".into(),
        )));
    };
    s.sessions.succeeded(&user_key);
    let (id, csrf) = s.sessions.start(&p.user)?;
    let secure = if s.tls { "; Secure" } else { "" };
    let set = format!("{COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/{secure}");
    let reply = LoginReply {
        user: p.user,
        role: p.role,
        csrf,
    };
    Ok(([(header::SET_COOKIE, set)], axum::Json(reply)).into_response())
}

/// End the session of the cookie.
#[utoipa::path(post, path = "/api/v1/logout", tag = "auth",
    responses((status = 200, body = super::openapi::Done), (status = 401, body = super::openapi::ErrorReply),
        (status = 403, body = super::openapi::ErrorReply)))]
pub async fn logout(
    State(s): State<Shared>,
    Caller(_p): Caller,
    headers: HeaderMap,
) -> ApiResult<Response> {
    if let Some(id) = cookie(&headers, COOKIE) {
        s.sessions.end(&id);
    }
    let clear = format!("{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0");
    Ok((
        [(header::SET_COOKIE, clear)],
        axum::Json(super::openapi::Done { done: true }),
    )
        .into_response())
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct WhoAmI {
    pub name: String,
    pub user: String,
    pub role: Role,
    /// The VMs the caller may see; absent: all.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vms: Option<Vec<String>>,
    /// With a session cookie: the session's CSRF token (a reloaded page gets it back here).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub csrf: Option<String>,
    /// Where API restores may write (operators and admins; `[service] restore_dirs`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub restore_dirs: Vec<String>,
}

/// Who the credentials name, with their rights.
#[utoipa::path(get, path = "/api/v1/whoami", tag = "auth",
    responses((status = 200, body = WhoAmI), (status = 401, body = super::openapi::ErrorReply)))]
pub async fn whoami(
    State(s): State<Shared>,
    Caller(p): Caller,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let vms = match (&p.scope, p.role) {
        (_, Role::Admin) | (Scope::All, _) => None,
        (Scope::Only(v), _) => Some(v.clone()),
    };
    // Only a session's own cookie gets its token back (a bearer token has none).
    let csrf = match headers.get(header::AUTHORIZATION) {
        Some(_) => None,
        None => cookie(&headers, COOKIE)
            .and_then(|id| s.sessions.find(&id))
            .map(|(_, csrf)| csrf),
    };
    let restore_dirs = if p.role == Role::Viewer {
        Vec::new()
    } else {
        s.settings
            .restore_dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect()
    };
    ok(WhoAmI {
        name: p.name,
        user: p.user,
        role: p.role,
        vms,
        csrf,
        restore_dirs,
    })
}
