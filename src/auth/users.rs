//! `users.toml`: users, their roles, assigned VMs, password hashes and API tokens.
//!
//! ```toml
//! [user.alice]
//! role = "operator"
//! vms = ["web-01", "db-01"]
//! password = "$argon2id$v=19$m=19456,t=2,p=1$…"
//! [user.alice.tokens.ci]
//! hash = "…"            # blake3 of the secret, hex
//! role = "viewer"       # optional: narrower than the user's
//! vms = ["web-01"]      # optional: fewer VMs
//! expires_ms = 1800000000000
//! ```
//!
//! Invariants: the file is written atomically with mode 0600; every name is checked on
//! load; a secret is shown once and never stored.

use super::{Principal, Role, Scope};
use crate::error::What;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TokenRecord {
    /// blake3 of the secret, hex.
    pub hash: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vms: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_ms: Option<u64>,
    #[serde(default)]
    pub created_ms: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UserRecord {
    pub role: Role,
    /// The VMs a viewer or operator may see (an admin sees all).
    #[serde(default)]
    pub vms: Vec<String>,
    /// argon2id PHC string; none: the user can only use tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tokens: BTreeMap<String, TokenRecord>,
    #[serde(default)]
    pub created_ms: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UsersFile {
    #[serde(default)]
    pub user: BTreeMap<String, UserRecord>,
}

/// Where the users of an appliance live: `users.toml` beside its config (by default
/// `REPO/users.toml`, beside `REPO/vms.toml`).
pub fn users_path(config: &Path) -> std::path::PathBuf {
    match config.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(dir) => dir.join("users.toml"),
        None => std::path::PathBuf::from("users.toml"),
    }
}

/// An argon2id hash of `password` (a PHC string with its own random salt).
pub fn hash_password(password: &str) -> Result<String> {
    use argon2::password_hash::{rand_core::OsRng, PasswordHasher, SaltString};
    if password.len() < 8 {
        return Err(Error::usage("a password needs at least 8 characters"));
    }
    let salt = SaltString::generate(&mut OsRng);
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| Error::internal(format!("hash a password: {e}")))
}

fn verify_password(hash: &str, password: &str) -> bool {
    use argon2::password_hash::{PasswordHash, PasswordVerifier};
    PasswordHash::new(hash).is_ok_and(|h| {
        argon2::Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok()
    })
}

fn hash_secret(secret: &str) -> String {
    blake3::hash(secret.as_bytes()).to_hex().to_string()
}

/// Token names: like VM names.
fn check_token_name(name: &str) -> Result<()> {
    Ok(crate::names::check("token", name)?)
}

impl UsersFile {
    /// The users file at `path`; a missing file is an empty one.
    pub fn load(path: &Path) -> Result<UsersFile> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(UsersFile::default()),
            Err(e) => return Err(Error::io(format!("read {}", path.display()), e)),
        };
        let f: UsersFile = toml::from_str(&text).map_err(|e| {
            let msg = e.to_string().trim().replace('\n', " ");
            Error::config(path, format!("{} is not valid: {msg}", path.display()))
        })?;
        for (name, u) in &f.user {
            crate::names::check("user", name)?;
            for vm in &u.vms {
                crate::names::check("VM", vm)?;
            }
            for t in u.tokens.keys() {
                check_token_name(t)?;
            }
        }
        Ok(f)
    }

    /// Write atomically, private to the service's user.
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = format!(
            "# holdfast users: `holdfast user add|passwd|assign|remove` edits this file\n{}",
            toml::to_string_pretty(self).map_err(Error::internal)?
        );
        crate::sys::write_atomic(path, text.as_bytes(), true)
            .map_err(|e| Error::io(format!("write {}", path.display()), e))
    }

    /// Change the users file at `path` (load, `f`, save) under its lock: the CLI and the
    /// service edit it with no lost update.
    pub fn edit<T>(path: &Path, f: impl FnOnce(&mut UsersFile) -> Result<T>) -> Result<T> {
        let lock_path = path.with_extension("lock");
        let _lock = crate::sys::FileLock::acquire(&lock_path)
            .map_err(|e| Error::io(format!("lock {}", lock_path.display()), e))?;
        let mut file = UsersFile::load(path)?;
        let r = f(&mut file)?;
        file.save(path)?;
        Ok(r)
    }

    fn get(&self, name: &str) -> Result<&UserRecord> {
        self.user
            .get(name)
            .ok_or_else(|| Error::not_found(What::User, name, format!("no user {name:?}")))
    }

    fn get_mut(&mut self, name: &str) -> Result<&mut UserRecord> {
        self.user
            .get_mut(name)
            .ok_or_else(|| Error::not_found(What::User, name, format!("no user {name:?}")))
    }

    pub fn add(
        &mut self,
        name: &str,
        role: Role,
        password: Option<&str>,
        vms: &[String],
    ) -> Result<()> {
        crate::names::check("user", name)?;
        if self.user.contains_key(name) {
            return Err(Error::exists(
                What::User,
                name,
                format!("user {name} exists already"),
            ));
        }
        for vm in vms {
            crate::names::check("VM", vm)?;
        }
        let password = password.map(hash_password).transpose()?;
        self.user.insert(
            name.to_string(),
            UserRecord {
                role,
                vms: vms.to_vec(),
                password,
                tokens: BTreeMap::new(),
                created_ms: crate::timefmt::now_millis(),
            },
        );
        Ok(())
    }

    /// Refuse a change that would leave no admin (the service would have no one to manage
    /// it but root on the local socket).
    fn keep_an_admin(&self, name: &str, what: &str) -> Result<()> {
        let admins = self.user.iter().filter(|(_, u)| u.role == Role::Admin);
        if self.get(name)?.role == Role::Admin && admins.count() == 1 {
            return Err(Error::Conflict(format!(
                "{name} is the last admin: add another admin before you {what} them"
            )));
        }
        Ok(())
    }

    pub fn remove(&mut self, name: &str) -> Result<UserRecord> {
        self.keep_an_admin(name, "remove")?;
        Ok(self.user.remove(name).expect("checked"))
    }

    pub fn set_password(&mut self, name: &str, password: &str) -> Result<()> {
        let hash = hash_password(password)?;
        self.get_mut(name)?.password = Some(hash);
        Ok(())
    }

    /// Change a user's role and assigned VMs.
    pub fn assign(
        &mut self,
        name: &str,
        role: Option<Role>,
        vms: Option<Vec<String>>,
    ) -> Result<()> {
        for vm in vms.iter().flatten() {
            crate::names::check("VM", vm)?;
        }
        if role.is_some_and(|r| r != Role::Admin) {
            self.keep_an_admin(name, "demote")?;
        }
        let u = self.get_mut(name)?;
        if let Some(r) = role {
            u.role = r;
        }
        if let Some(v) = vms {
            u.vms = v;
        }
        Ok(())
    }

    fn principal(name: &str, u: &UserRecord) -> Principal {
        Principal {
            name: name.to_string(),
            user: name.to_string(),
            role: u.role,
            scope: if u.role == Role::Admin {
                Scope::All
            } else {
                Scope::Only(u.vms.clone())
            },
        }
    }

    /// The principal of `user` when `password` is theirs.
    pub fn login(&self, user: &str, password: &str) -> Option<Principal> {
        let u = self.user.get(user)?;
        let ok = u
            .password
            .as_deref()
            .is_some_and(|h| verify_password(h, password));
        ok.then(|| Self::principal(user, u))
    }

    /// A user as they stand now (their role or VMs may have changed since a session began).
    pub fn principal_of(&self, user: &str) -> Option<Principal> {
        self.user.get(user).map(|u| Self::principal(user, u))
    }

    /// Create token `USER!NAME`; returns its secret (shown once).
    pub fn add_token(
        &mut self,
        user: &str,
        name: &str,
        role: Option<Role>,
        vms: Option<Vec<String>>,
        expires_ms: Option<u64>,
    ) -> Result<String> {
        check_token_name(name)?;
        for vm in vms.iter().flatten() {
            crate::names::check("VM", vm)?;
        }
        let u = self.get_mut(user)?;
        if u.tokens.contains_key(name) {
            return Err(Error::exists(
                What::Token,
                format!("{user}!{name}"),
                format!("token {user}!{name} exists already; remove it first"),
            ));
        }
        let mut raw = [0u8; 32];
        getrandom::fill(&mut raw).map_err(|e| Error::internal(format!("no randomness: {e}")))?;
        let secret = hex::encode(raw);
        u.tokens.insert(
            name.to_string(),
            TokenRecord {
                hash: hash_secret(&secret),
                role,
                vms,
                expires_ms,
                created_ms: crate::timefmt::now_millis(),
            },
        );
        Ok(secret)
    }

    pub fn remove_token(&mut self, user: &str, name: &str) -> Result<()> {
        let u = self.get_mut(user)?;
        u.tokens.remove(name).map(|_| ()).ok_or_else(|| {
            Error::not_found(
                What::Token,
                format!("{user}!{name}"),
                format!("no token {user}!{name}"),
            )
        })
    }

    /// The principal of a bearer `USER!NAME:SECRET` when it is valid now: the user's rights,
    /// narrowed by the token.
    pub fn token(&self, bearer: &str, now_ms: u64) -> Option<Principal> {
        let (id, secret) = bearer.split_once(':')?;
        let (user, name) = id.split_once('!')?;
        let u = self.user.get(user)?;
        let t = u.tokens.get(name)?;
        let want = blake3::Hash::from_hex(&t.hash).ok()?;
        if blake3::hash(secret.as_bytes()) != want {
            return None; // constant-time comparison (blake3::Hash's Eq)
        }
        if t.expires_ms.is_some_and(|e| e <= now_ms) {
            return None;
        }
        let mut p = Self::principal(user, u);
        p.name = format!("{user}!{name}");
        if let Some(r) = t.role {
            p.role = p.role.min(r);
        }
        if let Some(vms) = &t.vms {
            p.scope = match p.scope {
                Scope::All => Scope::Only(vms.clone()),
                Scope::Only(mine) => {
                    Scope::Only(mine.into_iter().filter(|v| vms.contains(v)).collect())
                }
            };
            if p.role == Role::Admin {
                // A narrowed admin token sees only its VMs: it acts as an operator there.
                p.role = Role::Operator;
            }
        }
        Some(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_and_tokens_narrow_and_expire() {
        let mut f = UsersFile::default();
        f.add(
            "alice",
            Role::Operator,
            Some("correct horse"),
            &["web".into(), "db".into()],
        )
        .unwrap();
        assert_eq!(
            f.add("alice", Role::Viewer, None, &[]).unwrap_err().code(),
            "exists"
        );
        assert!(f.login("alice", "wrong horse").is_none());
        let p = f.login("alice", "correct horse").unwrap();
        assert_eq!(
            (p.role, p.sees("web"), p.sees("mail")),
            (Role::Operator, true, false)
        );
        assert!(
            f.add("bob", Role::Viewer, Some("short"), &[]).is_err(),
            "8 characters"
        );
        let secret = f
            .add_token(
                "alice",
                "ci",
                Some(Role::Viewer),
                Some(vec!["web".into()]),
                Some(1000),
            )
            .unwrap();
        let t = f.token(&format!("alice!ci:{secret}"), 999).unwrap();
        assert_eq!((t.name.as_str(), t.role), ("alice!ci", Role::Viewer));
        assert!(t.sees("web") && !t.sees("db"));
        assert!(
            f.token(&format!("alice!ci:{secret}"), 1000).is_none(),
            "expired"
        );
        assert!(f.token("alice!ci:nope", 0).is_none());
        f.remove_token("alice", "ci").unwrap();
        f.add("root", Role::Admin, None, &[]).unwrap();
        assert_eq!(
            f.remove("root").unwrap_err().code(),
            "conflict",
            "the last admin"
        );
        assert_eq!(
            f.assign("root", Some(Role::Viewer), None)
                .unwrap_err()
                .code(),
            "conflict"
        );
        f.assign("alice", Some(Role::Admin), None).unwrap();
        f.assign("root", Some(Role::Viewer), None).unwrap();
        f.assign("alice", Some(Role::Operator), None).unwrap_err();
        f.assign("root", Some(Role::Admin), None).unwrap();
        f.assign("alice", Some(Role::Operator), None).unwrap();
        assert!(
            f.token(&format!("alice!ci:{secret}"), 0).is_none(),
            "revoked"
        );
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("users.toml");
        f.save(&path).unwrap();
        assert_eq!(UsersFile::load(&path).unwrap(), f);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains("correct horse") && !text.contains(&secret));
    }
}
