//! The OpenAPI 3 document of `/api/v1`, generated from the handlers' annotations (utoipa):
//! every route of [`super::router`] is listed here, and a test checks the two agree.

use crate::error::ErrorBody;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

/// Every error reply.
#[derive(Serialize, ToSchema)]
pub struct ErrorReply {
    pub error: ErrorBody,
}

/// A change that was made.
#[derive(Serialize, ToSchema)]
pub struct Done {
    pub done: bool,
}

/// A task that was started (`202 Accepted`): follow it at `/api/v1/tasks/{task}`.
#[derive(Serialize, ToSchema)]
pub struct TaskRef {
    pub task: String,
}

/// VM, user and token names (`names::check`).
pub const NAME_PATTERN: &str = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}$";
/// Snapshot names.
pub const SNAPSHOT_PATTERN: &str = "^[A-Za-z0-9_-]{1,64}$";

/// The rules the server checks path parameters against, in the document: a client (or a
/// fuzzer) learns them from it.
struct Names;

impl Modify for Names {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
        use utoipa::openapi::RefOr;
        for (path, item) in doc.paths.paths.iter_mut() {
            let snapshot = path.contains("/snapshots/{name}");
            let ops = [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
            ];
            for op in ops.into_iter().flatten() {
                for p in op.parameters.iter_mut().flatten() {
                    let pattern = match p.name.as_str() {
                        "vm" | "user" | "token" => NAME_PATTERN,
                        "name" if snapshot => SNAPSHOT_PATTERN,
                        _ => continue,
                    };
                    let schema = ObjectBuilder::new()
                        .schema_type(Type::String)
                        .pattern(Some(pattern))
                        .build();
                    p.schema = Some(RefOr::T(Schema::Object(schema)));
                }
            }
        }
    }
}

struct Security;

impl Modify for Security {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let c = doc.components.get_or_insert_with(Default::default);
        c.add_security_scheme(
            "token",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("USER!TOKEN:SECRET")
                    .build(),
            ),
        );
        c.add_security_scheme(
            "session",
            SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::new(super::auth::COOKIE))),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "holdfast", description = "The holdfast backup appliance: VMs, backups, \
        snapshots, tasks, stats, users. Errors are `{\"error\": {\"code\", \"message\"}}` with \
        the stable codes of docs/errors.md."),
    modifiers(&Security, &Names),
    components(schemas(super::tasks::TaskEvent)),
    security(("token" = []), ("session" = [])),
    paths(
        super::auth::login, super::auth::logout, super::auth::whoami,
        super::vms::list, super::vms::show, super::vms::declare, super::vms::remove,
        super::backups::list, super::backups::show, super::backups::create,
        super::backups::forget, super::backups::protect, super::backups::restore,
        super::backups::export, super::backups::exports, super::backups::verify,
        super::snapshots::list, super::snapshots::create, super::snapshots::revert,
        super::snapshots::rename, super::snapshots::clone, super::snapshots::delete,
        super::tasks::list, super::tasks::show, super::tasks::cancel, super::tasks::events,
        super::stats::total, super::stats::vm, super::stats::gc,
        super::users::list, super::users::show, super::users::add, super::users::update,
        super::users::remove, super::users::tokens, super::users::add_token,
        super::users::remove_token, super::users::audit,
        super::policy::show, super::policy::set, super::policy::vm_show,
        super::policy::vm_set, super::policy::vm_reset, super::policy::schedule,
        super::policy::prune, super::policy::targets, super::policy::set_target,
        super::policy::remove_target, super::policy::test,
        super::system::healthz, super::system::metrics, document,
    )
)]
pub struct Doc;

/// This document.
#[utoipa::path(get, path = "/api/v1/openapi.json", tag = "system", security(()),
    responses((status = 200, description = "The OpenAPI 3 document", content_type = "application/json")))]
pub async fn document() -> Response {
    axum::Json(Doc::openapi()).into_response()
}
