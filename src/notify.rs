//! Notifications: events ("Backup Completed", "Restore Failed", "Snapshot Expired", …) sent
//! to webhooks (JSON, signed with HMAC-SHA256) and by email (SMTP), at least once.
//!
//! Delivery survives restarts: an event is written to a durable outbox, one file per target
//! (`REPO/outbox/TARGET/TIME-ID.json`, fsynced), before any attempt, and the file goes only
//! once the target accepted it (a 2xx answer, an SMTP 250). Any process may emit (the CLI's
//! tasks too); `holdfast serve` delivers, oldest first per target, retrying a target that is
//! down with backoff. The event id lets a receiver drop the duplicates a crash between
//! "accepted" and "removed" can cause.
//!
//! ```toml
//! [notify.target.ops]
//! webhook = "https://hooks.example.com/holdfast"
//! secret_file = "/etc/holdfast/ops.secret"   # HMAC key (mode 0600)
//! events = ["backup", "restore"]             # default: every kind
//! outcomes = ["failed"]                      # ok, failed, cancelled, damage, expired, skipped
//! severity = "warning"                       # at least: info, warning, error
//! vms = ["web-01"]                           # default: every VM
//!
//! [notify.target.admins.email]
//! smtp = "mail.example.com:587"
//! starttls = true
//! from = "holdfast@example.com"
//! to = ["ops@example.com"]
//! user = "holdfast"
//! password_file = "/etc/holdfast/smtp.password"
//! ```

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EmailTarget {
    /// `HOST:PORT` of the SMTP server.
    pub smtp: String,
    #[serde(default)]
    pub starttls: bool,
    pub from: String,
    pub to: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The SMTP password, in a file of mode 0600.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub password_file: Option<PathBuf>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Target {
    /// POST each event here as JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<String>,
    /// The HMAC-SHA256 key of the `X-Holdfast-Signature` header, in a file of mode 0600.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub secret_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<EmailTarget>,
    /// Event kinds: backup, restore, snapshot, prune, verify, gc, schedule, test [default: all].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<String>,
    /// ok, failed, cancelled, damage, expired, skipped [default: all].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outcomes: Vec<String>,
    /// The least severity sent: info, warning, error [default: info].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub severity: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vms: Vec<String>,
    /// One attempt's time limit [default: 10s].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// The longest wait between attempts at a target that is down [default: 5m].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_max: Option<String>,
}

/// `[notify]`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NotifyConfig {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub target: BTreeMap<String, Target>,
}

const SEVERITIES: [&str; 3] = ["info", "warning", "error"];
const KINDS: [&str; 8] = [
    "backup", "restore", "snapshot", "prune", "verify", "gc", "schedule", "test",
];
const OUTCOMES: [&str; 6] = ["ok", "failed", "cancelled", "damage", "expired", "skipped"];

fn rank(severity: &str) -> usize {
    SEVERITIES.iter().position(|s| *s == severity).unwrap_or(0)
}

impl Target {
    /// Checked, for a one-line error naming the field.
    pub fn check(&self, name: &str) -> Result<(), String> {
        let at = format!("notify.target.{name}");
        match (&self.webhook, &self.email) {
            (None, None) => return Err(format!("{at}: give webhook = URL or an [email] table")),
            (Some(_), Some(_)) => {
                return Err(format!("{at}: a target is a webhook or an email, not both"))
            }
            (Some(u), None) if !(u.starts_with("http://") || u.starts_with("https://")) => {
                return Err(format!("{at}.webhook: {u:?} is not an http(s) URL"))
            }
            (_, Some(e)) => {
                if e.to.is_empty() {
                    return Err(format!("{at}.email.to: at least one address"));
                }
                if !e.smtp.contains(':') {
                    return Err(format!(
                        "{at}.email.smtp: HOST:PORT, e.g. mail.example.com:587"
                    ));
                }
                for a in e.to.iter().chain([&e.from]) {
                    a.parse::<lettre::Address>()
                        .map_err(|_| format!("{at}.email: {a:?} is not an email address"))?;
                }
            }
            _ => {}
        }
        for k in &self.events {
            if !KINDS.contains(&k.as_str()) {
                return Err(format!(
                    "{at}.events: {k:?} is not one of {}",
                    KINDS.join(", ")
                ));
            }
        }
        for o in &self.outcomes {
            if !OUTCOMES.contains(&o.as_str()) {
                return Err(format!(
                    "{at}.outcomes: {o:?} is not one of {}",
                    OUTCOMES.join(", ")
                ));
            }
        }
        if let Some(s) = &self.severity {
            if !SEVERITIES.contains(&s.as_str()) {
                return Err(format!(
                    "{at}.severity: {s:?} is not info, warning or error"
                ));
            }
        }
        for d in [&self.timeout, &self.retry_max].into_iter().flatten() {
            crate::timefmt::parse_duration(d).map_err(|e| format!("{at}: {e}"))?;
        }
        Ok(())
    }

    /// Does this target want `e`?
    pub fn wants(&self, e: &Event) -> bool {
        let kind = e.event.split('.').next().unwrap_or("");
        (self.events.is_empty() || self.events.iter().any(|k| k == kind))
            && (self.outcomes.is_empty() || self.outcomes.contains(&e.outcome))
            && rank(&e.severity) >= rank(self.severity.as_deref().unwrap_or("info"))
            && (self.vms.is_empty() || e.vms.iter().any(|v| self.vms.contains(v)))
    }

    fn timeout(&self) -> Duration {
        self.timeout
            .as_deref()
            .and_then(|t| crate::timefmt::parse_duration(t).ok())
            .unwrap_or(Duration::from_secs(10))
    }

    /// The wait before attempt `n + 1` after `n` failed ones: 1 s, 2 s, 4 s, … up to
    /// `retry_max`.
    pub fn backoff(&self, failures: u32) -> Duration {
        let max = self
            .retry_max
            .as_deref()
            .and_then(|t| crate::timefmt::parse_duration(t).ok())
            .unwrap_or(Duration::from_secs(300));
        Duration::from_secs(1u64 << failures.min(20)).min(max)
    }
}

impl NotifyConfig {
    pub fn check(&self) -> Result<(), String> {
        for (name, t) in &self.target {
            check_name(name)?;
            t.check(name)?;
        }
        Ok(())
    }
}

fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    match ok {
        true => Ok(()),
        false => Err(format!(
            "notify target {name:?}: letters, digits, - and _ only (at most 64)"
        )),
    }
}

/// Sizes of what a backup read and stored.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Sizes {
    pub read_bytes: u64,
    pub new_bytes: u64,
    pub stored_bytes: u64,
}

/// One event, as webhooks receive it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Event {
    /// Unique: receivers drop duplicates by it.
    pub id: String,
    /// `backup.completed`, `backup.failed`, `restore.completed`, `verify.damage`,
    /// `snapshot.expired`, `schedule.skipped`, `test`, …
    pub event: String,
    /// For people: `Backup Completed`.
    pub title: String,
    /// info, warning, error.
    pub severity: String,
    /// ok, failed, cancelled, damage, expired, skipped.
    pub outcome: String,
    /// The first of `vms` (None: a repository-wide job).
    pub vm: Option<String>,
    #[serde(default)]
    pub vms: Vec<String>,
    pub task: Option<String>,
    /// RFC 3339, UTC.
    pub time: String,
    /// The backup it made (`VM@ID`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sizes: Option<Sizes>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
}

impl Event {
    /// A new event with a fresh id, now.
    pub fn new(kind: &str, outcome: &str, vms: Vec<String>) -> Event {
        let mut r = [0u8; 12];
        let _ = getrandom::fill(&mut r);
        let title_kind = match kind {
            "gc" => "GC".to_string(),
            k => {
                let mut c = k.chars();
                c.next()
                    .map(|f| f.to_uppercase().collect::<String>() + c.as_str())
                    .unwrap_or_default()
            }
        };
        let (verb, severity) = match outcome {
            "ok" => ("Completed", "info"),
            "cancelled" => ("Cancelled", "warning"),
            "damage" => ("Found Damage", "error"),
            "expired" => ("Expired", "info"),
            "skipped" => ("Skipped", "warning"),
            _ => ("Failed", "error"),
        };
        let event = match outcome {
            "ok" => format!("{kind}.completed"),
            "cancelled" | "failed" => format!("{kind}.failed"),
            o => format!("{kind}.{o}"),
        };
        let now = crate::timefmt::now_millis();
        Event {
            id: format!("{}-{}", crate::timefmt::compact(now / 1000), hex::encode(r)),
            event: if kind == "test" { "test".into() } else { event },
            title: if kind == "test" {
                "Test Notification".into()
            } else {
                format!("{title_kind} {verb}")
            },
            severity: severity.into(),
            outcome: outcome.into(),
            vm: vms.first().cloned(),
            vms,
            task: None,
            time: crate::timefmt::rfc3339(now / 1000),
            backup: None,
            summary: None,
            error_code: None,
            error_message: None,
            sizes: None,
            duration_ms: None,
        }
    }

    /// The mail subject: `Backup Completed: web-01`.
    pub fn subject(&self) -> String {
        match &self.vm {
            Some(v) => format!("{}: {v}", self.title),
            None => self.title.clone(),
        }
    }

    /// The mail body, for a person.
    pub fn text(&self) -> String {
        let mut t = format!("{}\n\n", self.subject());
        let mut line = |k: &str, v: &str| {
            for (i, l) in wrap(v, 64).iter().enumerate() {
                let k = if i == 0 { k } else { "" };
                t.push_str(&format!("{k:<10} {l}\n"));
            }
        };
        if !self.vms.is_empty() {
            line("VM:", &self.vms.join(", "));
        }
        line("When:", &self.time);
        line("Outcome:", &self.outcome);
        if let Some(b) = &self.backup {
            line("Backup:", b);
        }
        if let Some(s) = &self.summary {
            line("Summary:", s);
        }
        if let (Some(c), Some(m)) = (&self.error_code, &self.error_message) {
            line("Error:", &format!("{m} ({c})"));
        }
        if let Some(s) = &self.sizes {
            line(
                "Sizes:",
                &format!(
                    "{} read, {} new, {} stored",
                    indicatif::HumanBytes(s.read_bytes),
                    indicatif::HumanBytes(s.new_bytes),
                    indicatif::HumanBytes(s.stored_bytes)
                ),
            );
        }
        if let Some(d) = self.duration_ms {
            line("Took:", &format!("{:.1} s", d as f64 / 1000.0));
        }
        if let Some(task) = &self.task {
            line("Task:", &format!("{task} (`holdfast task {task}`)"));
        }
        line("Event id:", &self.id);
        t
    }
}

/// `text` in lines of at most `width` characters, broken at spaces (a longer word alone on
/// its line is cut).
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = vec![String::new()];
    for word in text.split(' ') {
        let mut word = word.to_string();
        loop {
            let cur = lines.last_mut().expect("never empty");
            let need = if cur.is_empty() { 0 } else { 1 } + word.chars().count();
            if cur.chars().count() + need <= width {
                if !cur.is_empty() {
                    cur.push(' ');
                }
                cur.push_str(&word);
                break;
            }
            if cur.is_empty() {
                let cut: String = word.chars().take(width).collect();
                word = word.chars().skip(width).collect();
                cur.push_str(&cut);
                lines.push(String::new());
                if word.is_empty() {
                    break;
                }
                continue;
            }
            lines.push(String::new());
        }
    }
    lines.retain(|l| !l.is_empty());
    if lines.is_empty() {
        lines.push(String::new());
    }
    lines
}

/// The outbox directory of a repository.
pub fn outbox(repo_dir: &Path) -> PathBuf {
    repo_dir.join("outbox")
}

/// Put `e` in the outbox of every target that wants it (durably, before any attempt).
/// Returns the targets it is queued for.
pub fn emit(repo_dir: &Path, config: &NotifyConfig, e: &Event) -> std::io::Result<Vec<String>> {
    let mut queued = Vec::new();
    for (name, t) in &config.target {
        if e.event == "test" || t.wants(e) {
            enqueue(repo_dir, name, e)?;
            queued.push(name.clone());
        }
    }
    Ok(queued)
}

/// Queue `e` for one target.
pub fn enqueue(repo_dir: &Path, target: &str, e: &Event) -> std::io::Result<()> {
    let dir = outbox(repo_dir).join(target);
    std::fs::create_dir_all(&dir)?;
    let body = serde_json::to_vec(e).map_err(std::io::Error::other)?;
    crate::sys::write_atomic(&dir.join(format!("{}.json", e.id)), &body, true)?;
    crate::sys::fsync_dir(&dir)
}

/// The events waiting for `target`, oldest first (ids begin with their time).
pub fn pending(repo_dir: &Path, target: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(outbox(repo_dir).join(target))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    v.sort();
    v
}

/// A secret from a file that only its owner may read.
fn secret(path: &Path) -> Result<Vec<u8>, String> {
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if md.mode() & 0o077 != 0 {
        return Err(format!(
            "{} is readable by others (mode {:o}); chmod 600 it",
            path.display(),
            md.mode() & 0o777
        ));
    }
    let mut s = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    while s.last().is_some_and(|b| b.is_ascii_whitespace()) {
        s.pop();
    }
    Ok(s)
}

/// `sha256=HEX`: the HMAC-SHA256 of `body` under `key`.
pub fn signature(key: &[u8], body: &[u8]) -> String {
    use hmac::Mac;
    let mut m = <hmac::Hmac<sha2::Sha256> as hmac::Mac>::new_from_slice(key)
        .expect("HMAC takes keys of any length");
    m.update(body);
    format!("sha256={}", hex::encode(m.finalize().into_bytes()))
}

/// Send `e` to target `name` once; Ok when the target accepted it.
pub fn deliver(name: &str, t: &Target, e: &Event) -> Result<(), String> {
    if let Some(url) = &t.webhook {
        let body = serde_json::to_vec(e).map_err(|x| x.to_string())?;
        let agent = ureq::AgentBuilder::new().timeout(t.timeout()).build();
        let mut req = agent
            .post(url)
            .set("Content-Type", "application/json")
            .set("X-Holdfast-Event", &e.event)
            .set("X-Holdfast-Id", &e.id)
            .set("X-Holdfast-Target", name)
            .set(
                "User-Agent",
                concat!("holdfast/", env!("CARGO_PKG_VERSION")),
            );
        if let Some(f) = &t.secret_file {
            req = req.set("X-Holdfast-Signature", &signature(&secret(f)?, &body));
        }
        return match req.send_bytes(&body) {
            Ok(_) => Ok(()),
            Err(ureq::Error::Status(code, _)) => Err(format!("{url} answered {code}")),
            Err(x) => Err(format!("{url}: {x}")),
        };
    }
    if let Some(m) = &t.email {
        return mail(m, e, t.timeout());
    }
    Err("the target has neither a webhook nor an email".into())
}

fn mail(m: &EmailTarget, e: &Event, timeout: Duration) -> Result<(), String> {
    use lettre::Transport;
    let mut b = lettre::Message::builder()
        .from(
            m.from
                .parse()
                .map_err(|x| format!("from {:?}: {x}", m.from))?,
        )
        .subject(e.subject())
        .message_id(Some(format!("<{}@holdfast>", e.id)));
    for to in &m.to {
        b = b.to(to.parse().map_err(|x| format!("to {to:?}: {x}"))?);
    }
    // Lines of at most 76 characters ([`Event::text`] wraps them): sent as 7bit, readable
    // as sent, with no quoted-printable soft breaks in paths and messages.
    let msg = b.body(e.text()).map_err(|x| x.to_string())?;
    let (host, port) = m
        .smtp
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
        .ok_or_else(|| format!("smtp {:?}: HOST:PORT", m.smtp))?;
    let mut tr = match m.starttls {
        true => lettre::SmtpTransport::starttls_relay(host).map_err(|x| x.to_string())?,
        false => lettre::SmtpTransport::builder_dangerous(host),
    }
    .port(port)
    .timeout(Some(timeout));
    if let Some(user) = &m.user {
        let pw = match &m.password_file {
            Some(f) => String::from_utf8_lossy(&secret(f)?).into_owned(),
            None => String::new(),
        };
        tr = tr.credentials(lettre::transport::smtp::authentication::Credentials::new(
            user.clone(),
            pw,
        ));
    }
    tr.build()
        .send(&msg)
        .map(|_| ())
        .map_err(|x| format!("SMTP {}: {x}", m.smtp))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matchers_choose_by_kind_outcome_severity_and_vm() {
        let mut e = Event::new("backup", "failed", vec!["web".into()]);
        assert_eq!(
            (e.event.as_str(), e.title.as_str()),
            ("backup.failed", "Backup Failed")
        );
        assert_eq!(e.subject(), "Backup Failed: web");
        let all = Target::default();
        assert!(all.wants(&e));
        let t = Target {
            events: vec!["restore".into()],
            ..Target::default()
        };
        assert!(!t.wants(&e));
        let t = Target {
            severity: Some("error".into()),
            vms: vec!["web".into()],
            ..Target::default()
        };
        assert!(t.wants(&e));
        e.severity = "info".into();
        assert!(!t.wants(&e));
        let ok = Event::new("restore", "ok", vec![]);
        assert_eq!(ok.title, "Restore Completed");
        assert!(!Target {
            vms: vec!["web".into()],
            ..Target::default()
        }
        .wants(&ok));
        assert_eq!(Event::new("gc", "ok", vec![]).title, "GC Completed");
        assert_eq!(
            Event::new("verify", "damage", vec![]).event,
            "verify.damage"
        );
    }

    #[test]
    fn mail_lines_are_wrapped_at_spaces() {
        let w = wrap(
            "cannot open disk image /nonexistent/disk.img: No such file",
            24,
        );
        assert_eq!(
            w,
            [
                "cannot open disk image",
                "/nonexistent/disk.img:",
                "No such file"
            ]
        );
        assert_eq!(wrap(&"x".repeat(10), 4), ["xxxx", "xxxx", "xx"]);
        let mut e = Event::new("backup", "failed", vec!["web".into()]);
        e.error_code = Some("source".into());
        e.error_message = Some("a ".repeat(100));
        assert!(e.text().lines().all(|l| l.len() <= 76), "{}", e.text());
    }

    #[test]
    fn signatures_and_backoff() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        let t = Target {
            retry_max: Some("5s".into()),
            ..Target::default()
        };
        let waits: Vec<u64> = (0..5).map(|n| t.backoff(n).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 5, 5]);
    }

    #[test]
    fn targets_are_checked() {
        for (t, says) in [
            (Target::default(), "give webhook"),
            (
                Target {
                    webhook: Some("ftp://x".into()),
                    ..Target::default()
                },
                "http(s)",
            ),
            (
                Target {
                    webhook: Some("http://x".into()),
                    events: vec!["bakup".into()],
                    ..Target::default()
                },
                "not one of",
            ),
            (
                Target {
                    email: Some(EmailTarget {
                        smtp: "mail:25".into(),
                        from: "not an address".into(),
                        to: vec!["a@b.c".into()],
                        ..EmailTarget::default()
                    }),
                    ..Target::default()
                },
                "not an email address",
            ),
        ] {
            let e = t.check("x").unwrap_err();
            assert!(e.contains(says), "{e}");
        }
    }
}
