//! The audit of every state-changing request (`POST`, `PUT`, `PATCH`, `DELETE`), allowed or
//! refused: one middleware around all routes, so no handler can forget it. The caller's name
//! comes from the credentials check ([`super::auth::Caller`] fills [`Who`]), the task a request
//! started from its reply ([`StartedTask`]), the error code from the error reply.

use super::Shared;
use crate::auth::AuditEntry;
use axum::extract::{Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use std::sync::{Arc, Mutex};

/// Who made the request, once their credentials were checked (or, for a login, who tried).
#[derive(Clone, Default)]
pub struct Who(pub Arc<Mutex<Option<String>>>);

impl Who {
    pub fn set(&self, name: &str) {
        *crate::sys::lock(&self.0) = Some(name.to_string());
    }
}

/// The task a request started (a reply extension).
#[derive(Clone)]
pub struct StartedTask(pub String);

/// The error code of an error reply (a reply extension).
#[derive(Clone)]
pub struct ErrorCode(pub &'static str);

/// The VM a request names in its body rather than its path (a reply extension).
#[derive(Clone)]
pub struct NamedVm(pub String);

/// The VM in a path `/api/v1/vms/{vm}/…`.
fn vm_of(path: &str) -> Option<String> {
    let rest = path.strip_prefix("/api/v1/vms/")?;
    let vm = rest.split('/').next().filter(|v| !v.is_empty())?;
    Some(vm.to_string())
}

pub async fn record(State(s): State<Shared>, mut req: Request, next: Next) -> Response {
    let changes = !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if !changes {
        return next.run(req).await;
    }
    let who = Who::default();
    req.extensions_mut().insert(who.clone());
    let what = format!("{} {}", req.method(), req.uri().path());
    let addr = req
        .extensions()
        .get::<super::auth::Peer>()
        .map(|p| match (p.addr, p.uid) {
            (Some(a), _) => a.ip().to_string(),
            (None, Some(uid)) => format!("unix uid {uid}"),
            (None, None) => "unix".into(),
        });
    let path_vm = vm_of(req.uri().path());
    let resp = next.run(req).await;
    let name = crate::sys::lock(&who.0).clone();
    let e = AuditEntry {
        ms: crate::timefmt::now_millis(),
        who: name.unwrap_or_else(|| "-".into()),
        what,
        vm: resp
            .extensions()
            .get::<NamedVm>()
            .map(|v| v.0.clone())
            .or(path_vm),
        status: resp.status().as_u16(),
        code: resp
            .extensions()
            .get::<ErrorCode>()
            .map(|c| c.0.to_string()),
        task: resp.extensions().get::<StartedTask>().map(|t| t.0.clone()),
        addr,
    };
    let log = s.clone();
    // Durable (fsync) and off the async threads; a failure to write it is logged, not
    // turned into an error reply for a change that was made.
    let _ = tokio::task::spawn_blocking(move || {
        if let Err(err) = log.audit.append(&e) {
            tracing::warn!("audit log: {err}");
        }
    })
    .await;
    resp
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_vm_of_a_path() {
        assert_eq!(
            super::vm_of("/api/v1/vms/web/backups").as_deref(),
            Some("web")
        );
        assert_eq!(super::vm_of("/api/v1/vms/web").as_deref(), Some("web"));
        assert_eq!(super::vm_of("/api/v1/vms"), None);
        assert_eq!(super::vm_of("/api/v1/gc"), None);
    }
}
