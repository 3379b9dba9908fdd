//! `holdfast serve`, `holdfast user …`, `holdfast token …`, `holdfast audit`.

use super::{usage, Cmdline};
use crate::api::server::{self, Options, Ready};
use crate::auth::{AuditEntry, AuditLog, Role, UsersFile};
use crate::{Error, Result};
use clap::{Args, Subcommand};
use std::io::BufRead;
use std::path::{Path, PathBuf};

pub const SERVE_HELP: &str =
    "The appliance as a service: the HTTP API under /api/v1 (its OpenAPI document at\n\
/api/v1/openapi.json), /healthz and /metrics (Prometheus), and a unix socket REPO/holdfast.sock\n\
on which root and the service's own user are admins without a password (local tools).\n\n\
On an address that is not loopback it speaks only HTTPS: the --tls-cert/--tls-key pair, else a\n\
self-signed certificate made at the first start and kept in REPO/tls (its SHA-256 fingerprint is\n\
printed: pin it in clients). Users and tokens: `holdfast user add`, `holdfast token add`.\n\
SIGINT or SIGTERM stop it cleanly: running jobs are cancelled (VM backups tear their read points\n\
down), their task records written, then it exits 0.\n\n\
Defaults come from [service] in the config (listen, jobs, restore_dirs, price_per_gb_month,\n\
tls_cert, tls_key); the flags override them.\n\n\
Examples:\n  holdfast serve\n  holdfast serve --listen 0.0.0.0:8470 --jobs 4\n  \
curl -H \"Authorization: Bearer $(cat ~/.holdfast-token)\" http://127.0.0.1:8470/api/v1/vms";

#[derive(Args)]
pub struct ServeArgs {
    /// Address and port to listen on [default: 127.0.0.1:8470]; 0 as the port picks a free one
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Option<String>,
    /// The TLS certificate chain (PEM); with it, HTTPS even on loopback
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM, mode 0600)
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// HTTPS even on loopback (with a self-signed certificate unless --tls-cert gives one)
    #[arg(long)]
    tls: bool,
    /// Jobs (backups, restores, verifies, ...) running at once; more wait, queued [default: 2]
    #[arg(long, value_name = "N")]
    jobs: Option<usize>,
}

pub fn serve(cx: &Cmdline, a: ServeArgs) -> Result<i32> {
    let opts = Options {
        listen: a.listen,
        tls_cert: a.tls_cert,
        tls_key: a.tls_key,
        tls: a.tls,
        jobs: a.jobs,
    };
    let json = cx.json;
    let ready = |r: &Ready| {
        if json {
            say!("{}", serde_json::to_string(r).unwrap_or_default());
            return;
        }
        say!("holdfast: serving {} (API at {}/api/v1)", r.url, r.url);
        say!(
            "  local socket: {} (root and this user: admin)",
            r.socket.display()
        );
        say!("  jobs at once: {}", r.jobs);
        if let Some(f) = &r.fingerprint {
            let made = if r.made_certificate { ", made now" } else { "" };
            say!("  TLS certificate SHA-256 {f}{made}");
        }
    };
    server::run(
        cx.app.dir().to_path_buf(),
        cx.app.config_path().to_path_buf(),
        opts,
        cx.app.cancel().clone(),
        ready,
    )?;
    note!("holdfast: service stopped");
    Ok(0)
}

fn role(s: &str) -> std::result::Result<Role, String> {
    Role::parse(s).map_err(|e| e.to_string())
}

#[derive(Subcommand)]
pub enum UserCmd {
    /// Add a user; the password is read from standard input (asked twice on a terminal)
    #[command(
        after_help = "Examples:\n  holdfast user add alice --role operator --vm web-01 --vm db-01\n  \
printf '%s\\n' \"$PASSWORD\" | holdfast user add panel --role viewer --vm web-01\n  \
holdfast user add ci --role operator --vm web-01 --no-password   # tokens only"
    )]
    Add {
        name: String,
        /// viewer (reads), operator (backs up, restores, snapshots) or admin (everything)
        #[arg(long, value_parser = role)]
        role: Role,
        /// A VM this user may see (repeat); admins see all
        #[arg(long = "vm", value_name = "VM")]
        vms: Vec<String>,
        /// Read the password from the first line of FILE instead of standard input
        #[arg(long, value_name = "FILE", conflicts_with = "no_password")]
        password_file: Option<PathBuf>,
        /// No password: the user can only use API tokens
        #[arg(long)]
        no_password: bool,
    },
    /// List users, their roles, VMs and tokens
    List,
    /// Set a user's password (read like `user add` reads it)
    Passwd {
        name: String,
        #[arg(long, value_name = "FILE")]
        password_file: Option<PathBuf>,
    },
    /// Remove a user and their tokens
    Remove { name: String },
    /// Change a user's role or VMs (the change applies to live sessions at once)
    Assign {
        name: String,
        #[arg(long, value_parser = role)]
        role: Option<Role>,
        /// The VMs this user may see, replacing the list (repeat)
        #[arg(long = "vm", value_name = "VM")]
        vms: Vec<String>,
        /// Assign no VMs at all
        #[arg(long, conflicts_with = "vms")]
        no_vms: bool,
    },
}

#[derive(Subcommand)]
pub enum TokenCmd {
    /// Create an API token USER!NAME; its secret is printed once (as the whole bearer)
    #[command(
        after_help = "Example:\n  holdfast token add alice ci --role viewer --vm web-01 --expires 30d > ci.token\n  \
curl -H \"Authorization: Bearer $(cat ci.token)\" http://127.0.0.1:8470/api/v1/vms"
    )]
    Add {
        user: String,
        name: String,
        /// Narrow it to this role (never above the user's)
        #[arg(long, value_parser = role)]
        role: Option<Role>,
        /// Narrow it to these VMs (repeat)
        #[arg(long = "vm", value_name = "VM")]
        vms: Vec<String>,
        /// It stops working after this long (30m, 12h, 30d, 2w)
        #[arg(long, value_name = "DURATION")]
        expires: Option<String>,
    },
    /// List tokens (of one user)
    List { user: Option<String> },
    /// Revoke a token USER!NAME: it gets 401 from then on
    Remove { id: String },
}

fn users_path(cx: &Cmdline) -> PathBuf {
    crate::auth::users_path(cx.app.config_path())
}

/// Record a CLI change in the audit log beside the service's (best effort).
fn audit(cx: &Cmdline, what: String) {
    let e = AuditEntry {
        ms: crate::timefmt::now_millis(),
        who: format!("cli:{}", crate::sys::user_name()),
        what,
        vm: None,
        status: 0,
        code: None,
        task: None,
        addr: None,
    };
    if let Err(err) = AuditLog::new(cx.app.dir()).append(&e) {
        note!("holdfast: warning: audit log: {err}");
    }
}

fn prompt_hidden(prompt: &str) -> Result<String> {
    crate::sys::prompt_hidden(prompt).map_err(|e| Error::io("read the terminal", e))
}

/// A password: from FILE's first line, from a terminal (twice), or from standard input's first
/// line. Never from the command line, where other users see it.
fn read_password(name: &str, file: Option<&Path>) -> Result<String> {
    let p = if let Some(f) = file {
        let text = std::fs::read_to_string(f)
            .map_err(|e| Error::io(format!("read {}", f.display()), e))?;
        text.lines().next().unwrap_or("").to_string()
    } else if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        let a = prompt_hidden(&format!("password for {name}: "))?;
        let b = prompt_hidden("again: ")?;
        if a != b {
            return Err(usage("the passwords differ"));
        }
        a
    } else {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .map_err(|e| Error::io("read the password from standard input", e))?;
        line.trim_end_matches(['\r', '\n']).to_string()
    };
    if p.is_empty() {
        return Err(usage(
            "no password given: pipe it on standard input, use --password-file, or --no-password",
        ));
    }
    Ok(p)
}

pub fn user(cx: &Cmdline, cmd: UserCmd) -> Result<i32> {
    let path = users_path(cx);
    match cmd {
        UserCmd::Add {
            name,
            role,
            vms,
            password_file,
            no_password,
        } => {
            crate::names::check("user", &name)?;
            let pw = if no_password {
                None
            } else {
                Some(read_password(&name, password_file.as_deref())?)
            };
            UsersFile::edit(&path, |f| f.add(&name, role, pw.as_deref(), &vms))?;
            audit(cx, format!("user add {name} --role {}", role.name()));
            say!("added user {name} ({}){}", role.name(), vm_list(role, &vms));
        }
        UserCmd::List => {
            let f = UsersFile::load(&path)?;
            if cx.json {
                let v: Vec<_> = f
                    .user
                    .iter()
                    .map(|(n, u)| serde_json::json!({
                        "name": n, "role": u.role, "vms": u.vms, "has_password": u.password.is_some(),
                        "tokens": u.tokens.keys().map(|t| format!("{n}!{t}")).collect::<Vec<_>>(),
                    }))
                    .collect();
                say!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                return Ok(0);
            }
            if f.user.is_empty() {
                say!("no users yet: holdfast user add NAME --role admin");
            }
            for (n, u) in &f.user {
                let login = if u.password.is_some() {
                    ""
                } else {
                    " · tokens only"
                };
                say!(
                    "{n:<16} {:<8} {}{login} · {} tokens",
                    u.role.name(),
                    vms_of(u.role, &u.vms),
                    u.tokens.len()
                );
            }
        }
        UserCmd::Passwd {
            name,
            password_file,
        } => {
            UsersFile::load(&path)?
                .principal_of(&name)
                .ok_or_else(|| no_user(&name))?;
            let pw = read_password(&name, password_file.as_deref())?;
            UsersFile::edit(&path, |f| f.set_password(&name, &pw))?;
            audit(cx, format!("user passwd {name}"));
            say!("password of {name} changed");
        }
        UserCmd::Remove { name } => {
            UsersFile::edit(&path, |f| f.remove(&name))?;
            audit(cx, format!("user remove {name}"));
            say!("removed user {name} and their tokens");
        }
        UserCmd::Assign {
            name,
            role,
            vms,
            no_vms,
        } => {
            let new_vms = if no_vms {
                Some(Vec::new())
            } else if vms.is_empty() {
                None
            } else {
                Some(vms)
            };
            if role.is_none() && new_vms.is_none() {
                return Err(usage("say what changes: --role, --vm (repeat) or --no-vms"));
            }
            let u = UsersFile::edit(&path, |f| {
                f.assign(&name, role, new_vms)?;
                Ok(f.user.get(&name).cloned())
            })?;
            audit(cx, format!("user assign {name}"));
            if let Some(u) = u {
                say!("{name}: {} {}", u.role.name(), vms_of(u.role, &u.vms));
            }
        }
    }
    Ok(0)
}

fn no_user(name: &str) -> Error {
    Error::not_found(crate::error::What::User, name, format!("no user {name:?}"))
}

fn vms_of(role: Role, vms: &[String]) -> String {
    if role == Role::Admin {
        "all VMs".into()
    } else if vms.is_empty() {
        "no VMs".into()
    } else {
        vms.join(",")
    }
}

fn vm_list(role: Role, vms: &[String]) -> String {
    format!(" on {}", vms_of(role, vms))
}

pub fn token(cx: &Cmdline, cmd: TokenCmd) -> Result<i32> {
    let path = users_path(cx);
    match cmd {
        TokenCmd::Add {
            user,
            name,
            role,
            vms,
            expires,
        } => {
            let expires_ms = match expires {
                None => None,
                Some(d) => {
                    let d = crate::jobs::vms::parse_duration(&d).map_err(usage)?;
                    Some(crate::timefmt::now_millis() + d.as_millis() as u64)
                }
            };
            let vms = (!vms.is_empty()).then_some(vms);
            let secret =
                UsersFile::edit(&path, |f| f.add_token(&user, &name, role, vms, expires_ms))?;
            audit(cx, format!("token add {user}!{name}"));
            note!("holdfast: token {user}!{name} created; the bearer below is shown only now");
            say!("{user}!{name}:{secret}");
        }
        TokenCmd::List { user } => {
            let f = UsersFile::load(&path)?;
            if let Some(u) = &user {
                f.principal_of(u).ok_or_else(|| no_user(u))?;
            }
            let now = crate::timefmt::now_millis();
            let mut rows = Vec::new();
            for (n, u) in f
                .user
                .iter()
                .filter(|(n, _)| user.as_ref().is_none_or(|x| x == *n))
            {
                for (t, r) in &u.tokens {
                    rows.push((
                        format!("{n}!{t}"),
                        r.clone(),
                        r.expires_ms.is_some_and(|e| e <= now),
                    ));
                }
            }
            if cx.json {
                let v: Vec<_> = rows
                    .iter()
                    .map(|(id, r, expired)| {
                        serde_json::json!({
                            "id": id, "role": r.role, "vms": r.vms, "expires_ms": r.expires_ms,
                            "created_ms": r.created_ms, "expired": expired,
                        })
                    })
                    .collect();
                say!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                return Ok(0);
            }
            for (id, r, expired) in rows {
                let role = r
                    .role
                    .map(|x| format!(" as {}", x.name()))
                    .unwrap_or_default();
                let vms = r
                    .vms
                    .map(|v| format!(" on {}", v.join(",")))
                    .unwrap_or_default();
                let exp = match r.expires_ms {
                    Some(_) if expired => " · expired".to_string(),
                    Some(e) => format!(" · expires {}", crate::timefmt::rfc3339(e / 1000)),
                    None => String::new(),
                };
                say!("{id}{role}{vms}{exp}");
            }
        }
        TokenCmd::Remove { id } => {
            let Some((user, name)) = id.split_once('!') else {
                return Err(usage(format!("{id:?}: name a token as USER!NAME")));
            };
            UsersFile::edit(&path, |f| f.remove_token(user, name))?;
            audit(cx, format!("token remove {id}"));
            say!("revoked token {id}");
        }
    }
    Ok(0)
}

#[derive(Args)]
pub struct AuditArgs {
    /// Only changes to this VM
    #[arg(long)]
    vm: Option<String>,
    /// The newest N entries
    #[arg(long, default_value_t = 50)]
    last: usize,
}

pub fn audit_log(cx: &Cmdline, a: AuditArgs) -> Result<i32> {
    if let Some(vm) = &a.vm {
        crate::names::check("VM", vm)?;
    }
    let entries = AuditLog::new(cx.app.dir()).read(a.vm.as_deref(), a.last)?;
    if cx.json {
        say!(
            "{}",
            serde_json::to_string_pretty(&entries).unwrap_or_default()
        );
        return Ok(0);
    }
    for e in entries {
        let when = crate::timefmt::rfc3339(e.ms / 1000);
        let result = match (&e.code, e.status) {
            (Some(c), s) if s > 0 => format!("{s} {c}"),
            (Some(c), _) => c.clone(),
            (None, 0) => "ok".into(),
            (None, s) => s.to_string(),
        };
        let vm = e.vm.map(|v| format!(" [{v}]")).unwrap_or_default();
        let task = e.task.map(|t| format!(" task {t}")).unwrap_or_default();
        say!("{when} {:<14} {}{vm} → {result}{task}", e.who, e.what);
    }
    Ok(0)
}
