//! Who may do what: users with roles (viewer, operator, admin), the VMs assigned to them, API
//! tokens, and the audit log of what they changed.
//!
//! - Users live in `users.toml` beside the appliance config (mode 0600, rewritten atomically);
//!   passwords are argon2id hashes (PHC strings), never stored or logged in clear.
//! - A token `USER!NAME` has a random secret shown once; only its blake3 hash is kept. A
//!   token's rights are its user's, optionally narrowed to a lower role, to fewer VMs, and to
//!   an expiry.
//! - [`authorize`] is the one gate every API handler goes through: a VM the caller may not
//!   see does not exist for them (not found, so names do not leak); a verb above their role
//!   is forbidden.

mod audit;
mod users;

pub use audit::{AuditEntry, AuditLog};
pub use users::{hash_password, users_path, TokenRecord, UserRecord, UsersFile};

use crate::{Error, Result};
use serde::{Deserialize, Serialize};

#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    Hash,
    utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads the VMs assigned to them: backups, snapshots, tasks, stats.
    Viewer,
    /// A viewer who may also back up, restore and manage snapshots of their VMs.
    Operator,
    /// Everything, on every VM: users, tokens, VM declarations, gc.
    Admin,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Result<Role> {
        match s {
            "viewer" => Ok(Role::Viewer),
            "operator" => Ok(Role::Operator),
            "admin" => Ok(Role::Admin),
            _ => Err(Error::usage(format!(
                "{s:?} is not a role: use viewer, operator or admin"
            ))),
        }
    }
}

/// What a request needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Need {
    Read,
    Operate,
    Admin,
}

impl Need {
    fn role(self) -> Role {
        match self {
            Need::Read => Role::Viewer,
            Need::Operate => Role::Operator,
            Need::Admin => Role::Admin,
        }
    }
}

/// Which VMs a caller may see.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    All,
    Only(Vec<String>),
}

impl Scope {
    pub fn allows(&self, vm: &str) -> bool {
        match self {
            Scope::All => true,
            Scope::Only(v) => v.iter().any(|x| x == vm),
        }
    }
}

/// Who is asking, with the rights they hold for this request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Principal {
    /// `alice`, `alice!ci` (a token), `local:root` (the unix socket).
    pub name: String,
    pub user: String,
    pub role: Role,
    pub scope: Scope,
}

impl Principal {
    /// The principal of a trusted local connection (the service's own unix socket).
    pub fn local(uid_name: &str) -> Principal {
        Principal {
            name: format!("local:{uid_name}"),
            user: format!("local:{uid_name}"),
            role: Role::Admin,
            scope: Scope::All,
        }
    }

    pub fn sees(&self, vm: &str) -> bool {
        self.role == Role::Admin || self.scope.allows(vm)
    }
}

/// The one authorization gate: may `p` do what `need` says, on `vm` (None: the appliance)?
/// A VM they may not see is not found (so names do not leak), a verb above their role is
/// forbidden.
pub fn authorize(p: &Principal, need: Need, vm: Option<&str>) -> Result<()> {
    if let Some(vm) = vm {
        if !p.sees(vm) {
            return Err(Error::not_found(
                crate::error::What::Vm,
                vm,
                format!("no VM {vm:?}"),
            ));
        }
    }
    if p.role < need.role() {
        return Err(Error::Forbidden(format!(
            "{} ({}) may not do this: it needs the {} role",
            p.name,
            p.role.name(),
            need.role().name()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(role: Role, vms: &[&str]) -> Principal {
        Principal {
            name: "u".into(),
            user: "u".into(),
            role,
            scope: Scope::Only(vms.iter().map(|s| s.to_string()).collect()),
        }
    }

    #[test]
    fn the_role_matrix() {
        let viewer = who(Role::Viewer, &["web"]);
        let operator = who(Role::Operator, &["web"]);
        let admin = who(Role::Admin, &[]);
        let code = |p: &Principal, n: Need, vm: Option<&str>| {
            authorize(p, n, vm).err().map(|e| e.code()).unwrap_or("ok")
        };
        assert_eq!(code(&viewer, Need::Read, Some("web")), "ok");
        assert_eq!(code(&viewer, Need::Operate, Some("web")), "forbidden");
        assert_eq!(code(&viewer, Need::Read, Some("db")), "not-found");
        assert_eq!(
            code(&viewer, Need::Operate, Some("db")),
            "not-found",
            "no leak"
        );
        assert_eq!(code(&operator, Need::Operate, Some("web")), "ok");
        assert_eq!(code(&operator, Need::Admin, None), "forbidden");
        assert_eq!(code(&operator, Need::Read, None), "ok");
        assert_eq!(code(&admin, Need::Admin, None), "ok");
        assert_eq!(code(&admin, Need::Operate, Some("db")), "ok");
    }
}
