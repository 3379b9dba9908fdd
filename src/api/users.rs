//! `/users`, `/users/{user}/tokens` (admins; a user may also manage their own tokens) and
//! `/audit` (admins).

use super::auth::Caller;
use super::openapi::{Done, ErrorReply};
use super::{ok, ApiResult, Body, Shared};
use crate::auth::{authorize, AuditEntry, Need, Principal, Role, UserRecord};
use crate::Error;
use axum::extract::{Path, Query, State};
use axum::response::Response;
use serde::{Deserialize, Serialize};

#[derive(Serialize, utoipa::ToSchema)]
pub struct TokenItem {
    /// `USER!NAME`
    pub id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vms: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_ms: Option<u64>,
    pub created_ms: u64,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct UserItem {
    pub name: String,
    pub role: Role,
    pub vms: Vec<String>,
    pub has_password: bool,
    pub tokens: Vec<TokenItem>,
}

fn item(name: &str, u: &UserRecord) -> UserItem {
    UserItem {
        name: name.to_string(),
        role: u.role,
        vms: u.vms.clone(),
        has_password: u.password.is_some(),
        tokens: u
            .tokens
            .iter()
            .map(|(t, r)| TokenItem {
                id: format!("{name}!{t}"),
                role: r.role,
                vms: r.vms.clone(),
                expires_ms: r.expires_ms,
                created_ms: r.created_ms,
            })
            .collect(),
    }
}

/// Admins, or the user themselves.
fn self_or_admin(p: &Principal, user: &str) -> ApiResult<()> {
    crate::names::check("user", user)?;
    if p.role == Role::Admin || (p.user == user && p.name == p.user) {
        return Ok(());
    }
    Err(Error::Forbidden(format!("{} may not manage user {user}", p.name)).into())
}

fn get_user(s: &Shared, name: &str) -> ApiResult<UserItem> {
    let f = s.users.get()?;
    let u = f.user.get(name).ok_or_else(|| {
        Error::not_found(crate::error::What::User, name, format!("no user {name:?}"))
    })?;
    Ok(item(name, u))
}

/// Every user (admins).
#[utoipa::path(get, path = "/api/v1/users", tag = "users",
    responses((status = 200, body = [UserItem]), (status = 401, body = ErrorReply),
        (status = 403, body = ErrorReply)))]
pub async fn list(State(s): State<Shared>, Caller(p): Caller) -> ApiResult<Response> {
    authorize(&p, Need::Admin, None)?;
    let f = s.users.get()?;
    ok(f.user.iter().map(|(n, u)| item(n, u)).collect::<Vec<_>>())
}

/// One user (admins, or the user).
#[utoipa::path(get, path = "/api/v1/users/{user}", tag = "users", params(("user" = String, Path)),
    responses((status = 200, body = UserItem), (status = 400, body = ErrorReply),
        (status = 401, body = ErrorReply), (status = 403, body = ErrorReply),
        (status = 404, body = ErrorReply)))]
pub async fn show(
    State(s): State<Shared>,
    Caller(p): Caller,
    Path(user): Path<String>,
) -> ApiResult<Response> {
    self_or_admin(&p, &user)?;
    ok(get_user(&s, &user)?)
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UserCreate {
    #[schema(pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}$")]
    pub name: String,
    pub role: Role,
    /// At least 8 characters; none: the user signs in with tokens only.
    #[serde(default)]
    #[schema(min_length = 8)]
    pub password: Option<String>,
    #[serde(default)]
    pub vms: Vec<String>,
}

/// Add a user (admins).
#[utoipa::path(post, path = "/api/v1/users", tag = "users", request_body = UserCreate,
    responses((status = 200, body = UserItem), (status = 400, body = ErrorReply),
        (status = 401, body = ErrorReply), (status = 403, body = ErrorReply),
        (status = 409, body = ErrorReply), (status = 413, body = ErrorReply),
        (status = 422, body = ErrorReply)))]
pub async fn add(
    State(s): State<Shared>,
    Caller(p): Caller,
    Body(b): Body<UserCreate>,
) -> ApiResult<Response> {
    authorize(&p, Need::Admin, None)?;
    let name = b.name.clone();
    let s2 = s.clone();
    let r = tokio::task::spawn_blocking(move || {
        s2.users
            .edit(|f| f.add(&b.name, b.role, b.password.as_deref(), &b.vms))
    })
    .await
    .map_err(Error::internal)?;
    r?;
    ok(get_user(&s, &name)?)
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UserUpdate {
    #[serde(default)]
    pub role: Option<Role>,
    #[serde(default)]
    pub vms: Option<Vec<String>>,
    #[serde(default)]
    pub password: Option<String>,
}

/// Change a user's role, VMs or password (admins; a user may change their own password).
#[utoipa::path(patch, path = "/api/v1/users/{user}", tag = "users", params(("user" = String, Path)),
    request_body = UserUpdate,
    responses((status = 200, body = UserItem), (status = 400, body = ErrorReply),
        (status = 401, body = ErrorReply), (status = 403, body = ErrorReply),
        (status = 404, body = ErrorReply), (status = 409, body = ErrorReply), (status = 413, body = ErrorReply),
        (status = 422, body = ErrorReply)))]
pub async fn update(
    State(s): State<Shared>,
    Caller(p): Caller,
    Path(user): Path<String>,
    Body(b): Body<UserUpdate>,
) -> ApiResult<Response> {
    self_or_admin(&p, &user)?;
    if (b.role.is_some() || b.vms.is_some()) && p.role != Role::Admin {
        return Err(Error::Forbidden("only admins change roles and assignments".into()).into());
    }
    let (s2, u2) = (s.clone(), user.clone());
    let r = tokio::task::spawn_blocking(move || {
        s2.users.edit(|f| {
            if let Some(pw) = &b.password {
                f.set_password(&u2, pw)?;
            }
            f.assign(&u2, b.role, b.vms)
        })
    })
    .await
    .map_err(Error::internal)?;
    r?;
    ok(get_user(&s, &user)?)
}

/// Remove a user and their tokens (admins; never the last admin).
#[utoipa::path(delete, path = "/api/v1/users/{user}", tag = "users", params(("user" = String, Path)),
    responses((status = 200, body = Done), (status = 400, body = ErrorReply),
        (status = 401, body = ErrorReply), (status = 403, body = ErrorReply),
        (status = 404, body = ErrorReply), (status = 409, body = ErrorReply)))]
pub async fn remove(
    State(s): State<Shared>,
    Caller(p): Caller,
    Path(user): Path<String>,
) -> ApiResult<Response> {
    authorize(&p, Need::Admin, None)?;
    crate::names::check("user", &user)?;
    let (s2, u2) = (s.clone(), user.clone());
    let r = tokio::task::spawn_blocking(move || s2.users.edit(|f| f.remove(&u2).map(|_| ())))
        .await
        .map_err(Error::internal)?;
    r?;
    ok(Done { done: true })
}

/// A user's tokens (admins, or the user).
#[utoipa::path(get, path = "/api/v1/users/{user}/tokens", tag = "users", params(("user" = String, Path)),
    responses((status = 200, body = [TokenItem]), (status = 400, body = ErrorReply),
        (status = 401, body = ErrorReply), (status = 403, body = ErrorReply),
        (status = 404, body = ErrorReply)))]
pub async fn tokens(
    State(s): State<Shared>,
    Caller(p): Caller,
    Path(user): Path<String>,
) -> ApiResult<Response> {
    self_or_admin(&p, &user)?;
    ok(get_user(&s, &user)?.tokens)
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenCreate {
    #[schema(pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}$")]
    pub name: String,
    /// At most the user's role.
    #[serde(default)]
    pub role: Option<Role>,
    /// Only these of the user's VMs.
    #[serde(default)]
    pub vms: Option<Vec<String>>,
    /// Valid for this many seconds.
    #[serde(default)]
    pub expires_in: Option<u64>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct TokenCreated {
    /// `USER!NAME`
    pub id: String,
    /// Shown once: it is kept only hashed.
    pub secret: String,
    /// What to send: `Authorization: Bearer USER!NAME:SECRET`.
    pub bearer: String,
}

/// Create a token (admins, or the user for themselves); its secret is shown once.
#[utoipa::path(post, path = "/api/v1/users/{user}/tokens", tag = "users", params(("user" = String, Path)),
    request_body = TokenCreate,
    responses((status = 200, body = TokenCreated), (status = 400, body = ErrorReply),
        (status = 401, body = ErrorReply), (status = 403, body = ErrorReply),
        (status = 404, body = ErrorReply), (status = 409, body = ErrorReply),
        (status = 413, body = ErrorReply), (status = 422, body = ErrorReply)))]
pub async fn add_token(
    State(s): State<Shared>,
    Caller(p): Caller,
    Path(user): Path<String>,
    Body(b): Body<TokenCreate>,
) -> ApiResult<Response> {
    self_or_admin(&p, &user)?;
    let expires = b
        .expires_in
        .map(|secs| crate::timefmt::now_millis().saturating_add(secs.saturating_mul(1000)));
    let (s2, u2, name) = (s.clone(), user.clone(), b.name.clone());
    let r = tokio::task::spawn_blocking(move || {
        s2.users
            .edit(|f| f.add_token(&u2, &b.name, b.role, b.vms, expires))
    })
    .await
    .map_err(Error::internal)?;
    let secret = r?;
    let id = format!("{user}!{name}");
    ok(TokenCreated {
        bearer: format!("{id}:{secret}"),
        id,
        secret,
    })
}

/// Revoke a token (admins, or the user).
#[utoipa::path(delete, path = "/api/v1/users/{user}/tokens/{token}", tag = "users",
    params(("user" = String, Path), ("token" = String, Path)),
    responses((status = 200, body = Done), (status = 400, body = ErrorReply),
        (status = 401, body = ErrorReply), (status = 403, body = ErrorReply),
        (status = 404, body = ErrorReply)))]
pub async fn remove_token(
    State(s): State<Shared>,
    Caller(p): Caller,
    Path((user, token)): Path<(String, String)>,
) -> ApiResult<Response> {
    self_or_admin(&p, &user)?;
    let (s2, u2, t2) = (s.clone(), user.clone(), token.clone());
    let r = tokio::task::spawn_blocking(move || s2.users.edit(|f| f.remove_token(&u2, &t2)))
        .await
        .map_err(Error::internal)?;
    r?;
    ok(Done { done: true })
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    pub vm: Option<String>,
    /// The newest this many entries [default: 100].
    pub limit: Option<usize>,
}

/// The audit log of state-changing requests, newest last (admins).
#[utoipa::path(get, path = "/api/v1/audit", tag = "users", params(AuditQuery),
    responses((status = 200, body = [AuditEntry]), (status = 400, body = ErrorReply),
        (status = 401, body = ErrorReply), (status = 403, body = ErrorReply)))]
pub async fn audit(
    State(s): State<Shared>,
    Caller(p): Caller,
    q: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    authorize(&p, Need::Admin, None)?;
    let Query(q) = q.map_err(|e| Error::usage(format!("the query: {e}")))?;
    let v = s
        .audit
        .read(q.vm.as_deref(), q.limit.unwrap_or(100).min(10_000))?;
    ok(v)
}
