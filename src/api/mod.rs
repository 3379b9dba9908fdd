//! `holdfast serve`: the appliance as an HTTP service (`/api/v1`, JSON).
//!
//! One file per resource (`vms`, `backups`, `snapshots`, `tasks`, `stats`, `users`, `system`),
//! each handler: parse, authorize through the one gate ([`crate::auth::authorize`]), call one
//! core operation ([`crate::ops::Appliance`]), shape the reply. Operations that do work run
//! as tasks on worker threads ([`jobs`]), never on the async runtime: a request that starts
//! one is answered `202 {"task": ID}` as soon as the task exists (its VM locked), and its
//! progress is read from the task record, live (`/tasks/{id}/events`, server-sent events).
//!
//! Errors have one shape, `{"error": {"code", "message", "details"}}`, with the stable codes
//! of docs/errors.md mapped to statuses by [`crate::error::http_status_of`].

mod audit;
pub mod auth;
mod backups;
mod dashboard;
pub mod jobs;
mod openapi;
mod policy;
pub mod schedule;
pub mod server;
mod snapshots;
mod stats;
mod system;
mod tasks;
pub mod tls;
mod users;
mod vms;

use crate::auth::{AuditLog, Principal};
use crate::jobs::vms::{ServiceSettings, VmsFile};
use crate::ops::Appliance;
use crate::task::{Cancel, Slots};
use crate::Error;
use axum::extract::FromRequest;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::path::PathBuf;
use std::sync::Arc;

/// Request bodies are refused above this.
pub const MAX_BODY: usize = 1 << 20;
/// A request body must arrive within this.
pub const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// What every handler shares: the appliance's paths and settings, users and sessions, the
/// job slots and running jobs, the audit log and the counters behind `/metrics`.
pub struct Service {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub settings: ServiceSettings,
    /// Cookies are `Secure`: the service speaks HTTPS.
    pub tls: bool,
    pub slots: Slots,
    pub users: auth::Users,
    pub sessions: auth::Sessions,
    pub jobs: jobs::Running,
    pub audit: AuditLog,
    pub metrics: system::Metrics,
    /// Fired at shutdown: every running job is asked to stop.
    pub shutdown: Cancel,
}

pub type Shared = Arc<Service>;

impl Service {
    pub fn new(dir: PathBuf, config: PathBuf, settings: ServiceSettings, tls: bool) -> Service {
        let users_path = crate::auth::users_path(&config);
        Service {
            slots: Slots::new(settings.jobs.unwrap_or(2)),
            audit: AuditLog::new(&dir),
            users: auth::Users::new(users_path),
            sessions: auth::Sessions::default(),
            jobs: jobs::Running::default(),
            metrics: system::Metrics::default(),
            shutdown: Cancel::new(),
            dir,
            config,
            settings,
            tls,
        }
    }

    /// The appliance as `p` uses it (a query; jobs get theirs from [`jobs::start`]).
    pub fn appliance(&self, p: &Principal) -> Appliance {
        Appliance::new(
            self.dir.clone(),
            Some(self.config.clone()),
            format!("api:{}", p.name),
        )
    }

    pub fn vms_file(&self) -> Result<VmsFile, ApiError> {
        Ok(VmsFile::load(&self.config)?)
    }

    pub fn price(&self) -> f64 {
        self.settings.price_per_gb_month.unwrap_or(0.05)
    }
}

/// An error as the API answers it.
#[derive(Debug)]
pub struct ApiError(pub Error);

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        ApiError(e)
    }
}

impl From<crate::names::NameError> for ApiError {
    fn from(e: crate::names::NameError) -> Self {
        ApiError(e.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status.is_server_error() {
            tracing::warn!("{}", self.0);
        }
        let body = serde_json::json!({ "error": self.0.to_body() });
        let mut r = (status, axum::Json(body)).into_response();
        r.extensions_mut().insert(audit::ErrorCode(self.0.code()));
        r
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

/// `202 Accepted` with the task a request started.
pub fn accepted(task: String) -> ApiResult<Response> {
    let mut r = (
        StatusCode::ACCEPTED,
        axum::Json(openapi::TaskRef { task: task.clone() }),
    )
        .into_response();
    r.extensions_mut().insert(audit::StartedTask(task));
    Ok(r)
}

/// A JSON reply.
pub fn ok<T: Serialize>(v: T) -> ApiResult<Response> {
    Ok(axum::Json(v).into_response())
}

/// A JSON request body: at most [`MAX_BODY`] bytes (413 `too-large`), well-formed (400
/// `usage`), fitting the type with no unknown fields (422 `invalid-body`).
pub struct Body<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Self::Rejection> {
        // A body trickled in to hold the connection open gets no more time than this.
        let read = axum::body::Bytes::from_request(req, state);
        let Ok(read) = tokio::time::timeout(BODY_TIMEOUT, read).await else {
            return Err(ApiError(Error::usage(format!(
                "the request body did not arrive within {} s",
                BODY_TIMEOUT.as_secs()
            ))));
        };
        let bytes = match read {
            Ok(b) => b,
            Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                return Err(ApiError(Error::TooLarge(format!(
                    "the request body is over {MAX_BODY} bytes"
                ))))
            }
            Err(e) => return Err(ApiError(Error::usage(format!("cannot read the body: {e}")))),
        };
        parse_body(&bytes).map(Body)
    }
}

/// Parse a JSON body (an empty one reads as `{}`).
pub fn parse_body<T: DeserializeOwned>(bytes: &[u8]) -> ApiResult<T> {
    let text = if bytes.iter().all(u8::is_ascii_whitespace) {
        &b"{}"[..]
    } else {
        bytes
    };
    // Well-formed first (400), then fitting the type (422): a body that is both broken and
    // ill-typed is broken.
    let value: serde_json::Value = serde_json::from_slice(text)
        .map_err(|e| ApiError(Error::usage(format!("the request body is not JSON: {e}"))))?;
    serde_json::from_value(value)
        .map_err(|e| ApiError(Error::InvalidBody(format!("the request body: {e}"))))
}

/// The routes of `/api/v1`, plus `/healthz`, `/metrics` and the dashboard (`/`, `/ui/…`).
pub fn router(s: Shared) -> axum::Router {
    use axum::routing::{delete, get, post, put};
    let api = axum::Router::new()
        .route("/login", post(auth::login))
        .route("/logout", post(auth::logout))
        .route("/whoami", get(auth::whoami))
        .route("/vms", get(vms::list).post(vms::declare))
        .route("/vms/{vm}", get(vms::show).delete(vms::remove))
        .route(
            "/vms/{vm}/backups",
            get(backups::list).post(backups::create),
        )
        .route(
            "/vms/{vm}/backups/{id}",
            get(backups::show).delete(backups::forget),
        )
        .route("/vms/{vm}/backups/{id}/protected", put(backups::protect))
        .route("/vms/{vm}/backups/{id}/restore", post(backups::restore))
        .route("/vms/{vm}/backups/{id}/export", post(backups::export))
        .route("/vms/{vm}/verify", post(backups::verify))
        .route("/vms/{vm}/stats", get(stats::vm))
        .route(
            "/vms/{vm}/snapshots",
            get(snapshots::list).post(snapshots::create),
        )
        .route("/vms/{vm}/snapshots/{name}", delete(snapshots::delete))
        .route("/vms/{vm}/snapshots/{name}/revert", post(snapshots::revert))
        .route("/vms/{vm}/snapshots/{name}/rename", post(snapshots::rename))
        .route("/vms/{vm}/snapshots/{name}/clone", post(snapshots::clone))
        .route("/exports", get(backups::exports))
        .route("/tasks", get(tasks::list))
        .route("/tasks/{id}", get(tasks::show))
        .route("/tasks/{id}/cancel", post(tasks::cancel))
        .route("/tasks/{id}/events", get(tasks::events))
        .route("/stats", get(stats::total))
        .route("/gc", post(stats::gc))
        .route("/users", get(users::list).post(users::add))
        .route(
            "/users/{user}",
            get(users::show).patch(users::update).delete(users::remove),
        )
        .route(
            "/users/{user}/tokens",
            get(users::tokens).post(users::add_token),
        )
        .route("/users/{user}/tokens/{token}", delete(users::remove_token))
        .route("/audit", get(users::audit))
        .route("/policy", get(policy::show).put(policy::set))
        .route(
            "/vms/{vm}/policy",
            get(policy::vm_show)
                .put(policy::vm_set)
                .delete(policy::vm_reset),
        )
        .route("/schedule", get(policy::schedule))
        .route("/prune", post(policy::prune))
        .route("/notifications", get(policy::targets))
        .route(
            "/notifications/targets/{target}",
            put(policy::set_target).delete(policy::remove_target),
        )
        .route("/notifications/targets/{target}/test", post(policy::test))
        .route("/openapi.json", get(openapi::document));
    axum::Router::new()
        .nest("/api/v1", api)
        .route("/", get(dashboard::index))
        .route("/ui/app.js", get(dashboard::script))
        .route("/ui/app.css", get(dashboard::style))
        .route("/ui/icon.svg", get(dashboard::icon))
        .route("/healthz", get(system::healthz))
        .route("/metrics", get(system::metrics))
        .fallback(system::not_found)
        .method_not_allowed_fallback(system::method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn_with_state(
            s.clone(),
            audit::record,
        ))
        .layer(axum::middleware::from_fn_with_state(
            s.clone(),
            system::count,
        ))
        .with_state(s)
}
