//! `holdfast key`: the keys of an encrypted store. Passphrases (repokey) are wrapped copies of
//! one master key: adding, changing or removing one rewrites no data.

use super::Cmdline;
use crate::repo::keys::{self, KEYFILE};
use crate::repo::Repo;
use crate::{Error, Result};
use clap::Subcommand;
use std::path::PathBuf;

pub const KEY_HELP: &str = "\
An encrypted store has one random master key. `repokey` stores keep it in the store, wrapped by
each passphrase (argon2id); `keyfile` stores keep it in REPO/keyfile (mode 0600) only.
Passphrases come from HOLDFAST_PASSPHRASE, --passphrase-file FILE or the terminal; new ones from
HOLDFAST_NEW_PASSPHRASE, --new-passphrase-file FILE or the terminal (asked twice).

Examples:
  holdfast key list
  holdfast key add                      # a second passphrase (another admin)
  holdfast key passwd                   # change the passphrase you give
  holdfast key export > /root/store.key # a paper copy of the master key: keep it offline
  holdfast key import /root/store.key   # on a new machine, or when every passphrase is lost";

#[derive(Subcommand)]
pub enum KeyCmd {
    /// The store's encryption, its wrapped keys (repokey) and whether a key file is here
    List,
    /// Add a passphrase (the current one, or the key file, opens the store first)
    Add,
    /// Change the passphrase given (HOLDFAST_PASSPHRASE / --passphrase-file / terminal) to a
    /// new one; the old one stops working
    Passwd,
    /// Remove a wrapped key by its id (never the last one)
    Remove { id: String },
    /// Print the master key as a key file (JSON) on stdout: a copy to keep offline
    Export,
    /// Use a key file (from `key export`) for this repository: written to REPO/keyfile, 0600
    Import { file: PathBuf },
}

fn encrypted(repo: &Repo) -> Result<(&str, &keys::Encryption)> {
    match (&repo.config.store_id, &repo.config.encryption) {
        (Some(id), Some(e)) => Ok((id, e)),
        _ => Err(Error::usage(
            "this store is not encrypted (format version 1): it has no keys",
        )),
    }
}

fn repokey(repo: &Repo) -> Result<(&str, &keys::Encryption)> {
    let (id, e) = encrypted(repo)?;
    if keys::mode_of(e)? != keys::Mode::Repokey {
        return Err(Error::usage(
            "this store keeps its key in a key file (keyfile mode): it has no passphrases; \
             `holdfast key export` prints the key",
        ));
    }
    Ok((id, e))
}

pub fn run(cx: &Cmdline, cmd: KeyCmd) -> Result<i32> {
    let dir = cx.app.dir().to_path_buf();
    if let KeyCmd::Import { file } = &cmd {
        return import(cx, &dir, file);
    }
    let repo = Repo::open(&dir)?;
    let store = repo.uncached.as_ref();
    match cmd {
        KeyCmd::List => {
            let (sid, e) = encrypted(&repo)?;
            let wrapped = keys::list(store)?;
            let local = dir.join(KEYFILE).exists();
            if cx.json {
                let v = serde_json::json!({
                    "store_id": sid,
                    "mode": e.mode,
                    "aead": e.aead,
                    "keyfile": local,
                    "keys": wrapped.iter().map(|w| serde_json::json!({
                        "id": w.id, "created": w.created, "host": w.host, "kdf": w.kdf,
                        "m_cost_kib": w.m_cost_kib, "t_cost": w.t_cost, "p_cost": w.p_cost,
                    })).collect::<Vec<_>>(),
                });
                say!("{v}");
                return Ok(0);
            }
            say!(
                "store {sid}: {} ({}), key file here: {}",
                e.mode,
                e.aead,
                if local { "yes" } else { "no" }
            );
            for w in &wrapped {
                say!(
                    "  {}  created {} on {}  argon2id m={} MiB t={} p={}",
                    w.id,
                    w.created,
                    w.host,
                    w.m_cost_kib >> 10,
                    w.t_cost,
                    w.p_cost
                );
            }
            Ok(0)
        }
        KeyCmd::Add => {
            let (sid, _) = repokey(&repo)?;
            let k = repo.keys.as_ref().expect("an encrypted store has keys");
            let pass = keys::new_passphrase(false)?;
            let w = keys::wrap(k, pass.as_bytes(), sid, keys::tuned_params())?;
            keys::put(store, &w)?;
            say!("added key {}", w.id);
            Ok(0)
        }
        KeyCmd::Passwd => {
            let (sid, _) = repokey(&repo)?;
            let k = repo.keys.as_ref().expect("an encrypted store has keys");
            let old = keys::passphrase()?;
            let Some(was) = keys::find(store, old.as_bytes(), sid)? else {
                return Err(Error::Key(
                    "wrong passphrase: it opens none of the store's keys; nothing was changed"
                        .into(),
                ));
            };
            let pass = keys::new_passphrase(false)?;
            let w = keys::wrap(k, pass.as_bytes(), sid, keys::tuned_params())?;
            // The new one first: a crash in between leaves both working, never none.
            keys::put(store, &w)?;
            store.delete(&format!("keys/{}", was.id))?;
            keys::forget(sid);
            say!("changed the passphrase: key {} replaces {}", w.id, was.id);
            Ok(0)
        }
        KeyCmd::Remove { id } => {
            let (_, _) = repokey(&repo)?;
            let wrapped = keys::list(store)?;
            if !wrapped.iter().any(|w| w.id == id) {
                return Err(Error::not_found(
                    crate::error::What::File,
                    id.clone(),
                    format!("no key {id} in the store (`holdfast key list` shows them)"),
                ));
            }
            if wrapped.len() == 1 {
                return Err(Error::Conflict(format!(
                    "key {id} is the store's last key: add another first (`holdfast key add`), \
                     or the store could never be opened again"
                )));
            }
            store.delete(&format!("keys/{id}"))?;
            say!("removed key {id}");
            Ok(0)
        }
        KeyCmd::Export => {
            let (sid, _) = encrypted(&repo)?;
            let k = repo.keys.as_ref().expect("an encrypted store has keys");
            use std::io::Write as _;
            let r = std::io::stdout().write_all(keys::keyfile_text(k, sid).as_bytes());
            super::stdout_result(r);
            Ok(0)
        }
        KeyCmd::Import { .. } => unreachable!("handled above"),
    }
}

/// Check a key file against the store (without needing a key to open it) and keep it here.
fn import(cx: &Cmdline, dir: &std::path::Path, file: &std::path::Path) -> Result<i32> {
    // The config is clear: its store id and key check tell whether this key is the store's.
    let config = Repo::open_config(dir)?;
    let (Some(sid), Some(enc)) = (&config.store_id, &config.encryption) else {
        return Err(Error::usage(
            "this store is not encrypted: it takes no key file",
        ));
    };
    let text = std::fs::read_to_string(file)
        .map_err(|e| Error::io(format!("read {}", file.display()), e))?;
    let keys = keys::parse_keyfile(&text, file, sid, enc)?;
    keys::write_keyfile(dir, &keys, sid)?;
    keys::forget(sid);
    if !cx.json {
        say!(
            "imported the key of store {sid} into {}",
            dir.join(KEYFILE).display()
        );
    }
    Ok(0)
}
