//! Keys of encrypted stores: the master key wrapped by passphrases in the store (`repokey`:
//! objects `keys/ID`, argon2id), or kept in a key file on the appliance (`keyfile`:
//! `REPO/keyfile`, mode 0600); passphrases from `HOLDFAST_PASSPHRASE`, `--passphrase-file` or
//! a terminal, never the command line; a process keeps a store's unlocked keys once (argon2 is
//! deliberately slow). docs/encryption.md.

use crate::crypto::{self, Keys, Purpose};
use crate::store::{ObjectStore, StoreError};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use zeroize::Zeroizing;

/// The key file of a `keyfile` store (and of any store whose key was imported).
pub const KEYFILE: &str = "keyfile";

/// How a store's master key is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Repokey,
    Keyfile,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Repokey => "repokey",
            Mode::Keyfile => "keyfile",
        }
    }
}

/// What `init --encryption` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Choice {
    None,
    Repokey,
    Keyfile,
}

impl Choice {
    pub fn parse(s: &str) -> Option<Choice> {
        match s {
            "none" => Some(Choice::None),
            "repokey" => Some(Choice::Repokey),
            "keyfile" => Some(Choice::Keyfile),
            _ => None,
        }
    }
}

/// A new store's keys, its config entry, and the wrapped key to put in it (repokey).
pub type NewKeys = (Arc<Keys>, Encryption, Option<WrappedKey>);

/// Make the keys of a new store `store_id`: a random master key, kept as `choice` says (a
/// wrapped key to put in the store, or the key file written into `dir`); its config entry.
pub fn create(dir: &Path, choice: Choice, store_id: &str) -> Result<Option<NewKeys>> {
    let mode = match choice {
        Choice::None => return Ok(None),
        Choice::Repokey => Mode::Repokey,
        Choice::Keyfile => Mode::Keyfile,
    };
    let keys = Keys::new_random();
    let enc = Encryption {
        mode: mode.name().into(),
        aead: crypto::AEAD.into(),
        key_check: key_check(&keys, store_id),
    };
    let wrapped = match mode {
        Mode::Repokey => {
            let pass = new_passphrase(true)?;
            Some(wrap(&keys, pass.as_bytes(), store_id, tuned_params())?)
        }
        Mode::Keyfile => {
            write_keyfile(dir, &keys, store_id)?;
            None
        }
    };
    let keys = Arc::new(keys);
    crate::sys::lock(unlocked()).insert(store_id.to_string(), keys.clone());
    Ok(Some((keys, enc, wrapped)))
}

/// `encryption` in an encrypted store's config.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Encryption {
    /// `repokey` or `keyfile`.
    pub mode: String,
    pub aead: String,
    /// A sealed constant: a key that opens it is this store's key.
    pub key_check: String,
}

/// `keys/ID`: the master key wrapped by one passphrase.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WrappedKey {
    pub version: u32,
    pub id: String,
    pub kdf: String,
    pub m_cost_kib: u32,
    pub t_cost: u32,
    pub p_cost: u32,
    pub salt: String,
    pub wrapped: String,
    pub created: String,
    pub host: String,
}

/// The key file (`key export` prints it: a paper copy of the master key).
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyFile {
    pub format: String,
    pub version: u32,
    pub store_id: String,
    pub master: String,
}

const KEY_FORMAT: &str = "holdfast-key";

pub fn key_error(msg: impl Into<String>) -> Error {
    Error::Key(msg.into())
}

fn check_ad(store_id: &str) -> Vec<u8> {
    [b"holdfast key check\0".as_slice(), store_id.as_bytes()].concat()
}

fn wrap_ad(store_id: &str, key_id: &str) -> Vec<u8> {
    [
        b"holdfast wrapped key\0".as_slice(),
        store_id.as_bytes(),
        b"\0",
        key_id.as_bytes(),
    ]
    .concat()
}

/// The config's key check for `keys`.
pub fn key_check(keys: &Keys, store_id: &str) -> String {
    hex::encode(keys.seal(Purpose::Meta, &check_ad(store_id), b"holdfast"))
}

fn opens(keys: &Keys, store_id: &str, enc: &Encryption) -> bool {
    hex::decode(&enc.key_check)
        .ok()
        .and_then(|c| keys.open(Purpose::Meta, &check_ad(store_id), &c).ok())
        .is_some_and(|p| p == b"holdfast")
}

/// argon2id parameters: 64 MiB, one lane, passes tuned so one derivation takes ~0.5 s here.
pub fn tuned_params() -> (u32, u32, u32) {
    const M: u32 = 64 << 10;
    let _ = kek(b"warm-up", &[0; 16], M, 1, 1);
    let start = std::time::Instant::now();
    let _ = kek(b"tuning", &[0; 16], M, 2, 1);
    let one = (start.elapsed().as_secs_f64() / 2.0).max(0.001);
    let t = (0.5 / one).round().clamp(1.0, 32.0) as u32;
    (M, t, 1)
}

fn kek(pass: &[u8], salt: &[u8], m: u32, t: u32, p: u32) -> Result<Zeroizing<[u8; 32]>> {
    let params = argon2::Params::new(m, t, p, Some(32))
        .map_err(|e| key_error(format!("bad argon2 parameters: {e}")))?;
    let a = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut out = Zeroizing::new([0u8; 32]);
    a.hash_password_into(pass, salt, &mut *out)
        .map_err(|e| key_error(format!("argon2: {e}")))?;
    Ok(out)
}

/// Wrap `keys`' master key with a passphrase.
pub fn wrap(
    keys: &Keys,
    pass: &[u8],
    store_id: &str,
    params: (u32, u32, u32),
) -> Result<WrappedKey> {
    let salt: [u8; 16] = crypto::random();
    let id = hex::encode(crypto::random::<8>());
    let k = kek(pass, &salt, params.0, params.1, params.2)?;
    let wrapper = Keys::from_master(*k);
    let sealed = wrapper.seal(Purpose::Meta, &wrap_ad(store_id, &id), keys.master());
    Ok(WrappedKey {
        version: 1,
        id,
        kdf: "argon2id".into(),
        m_cost_kib: params.0,
        t_cost: params.1,
        p_cost: params.2,
        salt: hex::encode(salt),
        wrapped: hex::encode(sealed),
        created: crate::timefmt::rfc3339(crate::timefmt::now_secs()),
        host: crate::sys::host_name(),
    })
}

fn unwrap_key(w: &WrappedKey, pass: &[u8], store_id: &str) -> Result<Option<Keys>> {
    if w.kdf != "argon2id" || w.m_cost_kib > 4 << 20 || w.t_cost > 64 || w.p_cost > 16 {
        return Err(Error::damaged(
            "key",
            format!("key {} in the store has unusable parameters", w.id),
        ));
    }
    let salt = hex::decode(&w.salt).unwrap_or_default();
    let k = kek(pass, &salt, w.m_cost_kib, w.t_cost, w.p_cost)?;
    let wrapper = Keys::from_master(*k);
    let sealed = hex::decode(&w.wrapped).unwrap_or_default();
    Ok(wrapper
        .open(Purpose::Meta, &wrap_ad(store_id, &w.id), &sealed)
        .ok()
        .and_then(|m| <[u8; 32]>::try_from(m.as_slice()).ok())
        .map(Keys::from_master))
}

/// The wrapped keys in a store, by id.
pub fn list(store: &dyn ObjectStore) -> Result<Vec<WrappedKey>> {
    let mut out = Vec::new();
    for k in store.list("keys/")? {
        let raw = store.get(&k)?;
        let w: WrappedKey = serde_json::from_slice(&raw)
            .map_err(|e| Error::damaged("key", format!("{k} in the store is damaged ({e})")))?;
        out.push(w);
    }
    out.sort_by(|a, b| a.created.cmp(&b.created).then(a.id.cmp(&b.id)));
    Ok(out)
}

pub fn put(store: &dyn ObjectStore, w: &WrappedKey) -> Result<()> {
    let json = serde_json::to_vec_pretty(w).map_err(Error::internal)?;
    Ok(store.put(&format!("keys/{}", w.id), &json)?)
}

// ---- passphrases --------------------------------------------------------------------------

static PASSPHRASE_FILE: OnceLock<PathBuf> = OnceLock::new();
static NEW_PASSPHRASE_FILE: OnceLock<PathBuf> = OnceLock::new();

/// `--passphrase-file` / `--new-passphrase-file` of the command line.
pub fn set_passphrase_files(current: Option<PathBuf>, new: Option<PathBuf>) {
    if let Some(p) = current {
        let _ = PASSPHRASE_FILE.set(p);
    }
    if let Some(p) = new {
        let _ = NEW_PASSPHRASE_FILE.set(p);
    }
}

/// Refuse a secret file others than its owner may read.
pub fn check_secret_file(path: &Path) -> Result<()> {
    match crate::sys::secret_file_problem(path) {
        Some(p) => Err(key_error(p)),
        None => Ok(()),
    }
}

fn read_secret_file(path: &Path) -> Result<Zeroizing<String>> {
    check_secret_file(path)?;
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::io(format!("read {}", path.display()), e))?;
    Ok(Zeroizing::new(
        text.trim_end_matches(['\n', '\r']).to_string(),
    ))
}

/// A passphrase: `env` (the variable), else `file`, else asked on the terminal (twice when
/// `confirm`).
fn passphrase_from(
    env: &str,
    file: Option<&PathBuf>,
    what: &str,
    confirm: bool,
) -> Result<Zeroizing<String>> {
    if let Ok(v) = std::env::var(env) {
        return Ok(Zeroizing::new(v));
    }
    if let Some(f) = file {
        return read_secret_file(f);
    }
    if !crate::sys::stdin_is_terminal() {
        return Err(key_error(format!(
            "{what}: set {env}, give a file with {}, or run on a terminal",
            if env == "HOLDFAST_PASSPHRASE" {
                "--passphrase-file"
            } else {
                "--new-passphrase-file"
            }
        )));
    }
    let ask = |p: &str| {
        crate::sys::prompt_hidden(p)
            .map(Zeroizing::new)
            .map_err(|e| Error::io("read the terminal", e))
    };
    let first = ask(&format!("{what}: "))?;
    if confirm {
        let again = ask("again: ")?;
        if *again != *first {
            return Err(key_error("the two passphrases differ; nothing was changed"));
        }
    }
    Ok(first)
}

/// The passphrase that opens the store.
pub fn passphrase() -> Result<Zeroizing<String>> {
    passphrase_from(
        "HOLDFAST_PASSPHRASE",
        PASSPHRASE_FILE.get(),
        "the store's passphrase",
        false,
    )
}

/// A new passphrase (init, key add, key passwd): `HOLDFAST_NEW_PASSPHRASE`,
/// `--new-passphrase-file`, or asked twice; at init the current one's sources serve too.
pub fn new_passphrase(at_init: bool) -> Result<Zeroizing<String>> {
    let p = if at_init && std::env::var("HOLDFAST_NEW_PASSPHRASE").is_err() {
        match (std::env::var("HOLDFAST_PASSPHRASE"), PASSPHRASE_FILE.get()) {
            (Ok(v), _) => Zeroizing::new(v),
            (_, Some(f)) => read_secret_file(f)?,
            _ => passphrase_from(
                "HOLDFAST_NEW_PASSPHRASE",
                NEW_PASSPHRASE_FILE.get(),
                "a passphrase for the new store",
                true,
            )?,
        }
    } else {
        passphrase_from(
            "HOLDFAST_NEW_PASSPHRASE",
            NEW_PASSPHRASE_FILE.get(),
            "the new passphrase",
            true,
        )?
    };
    if p.chars().count() < 8 {
        return Err(key_error(
            "a passphrase needs at least 8 characters; nothing was changed",
        ));
    }
    Ok(p)
}

// ---- unlocking ------------------------------------------------------------------------------

fn unlocked() -> &'static Mutex<HashMap<String, Arc<Keys>>> {
    static U: OnceLock<Mutex<HashMap<String, Arc<Keys>>>> = OnceLock::new();
    U.get_or_init(Default::default)
}

/// Forget a store's unlocked keys in this process (after its keys changed).
pub fn forget(store_id: &str) {
    crate::sys::lock(unlocked()).remove(store_id);
}

pub fn mode_of(enc: &Encryption) -> Result<Mode> {
    match enc.mode.as_str() {
        "repokey" => Ok(Mode::Repokey),
        "keyfile" => Ok(Mode::Keyfile),
        m => Err(Error::damaged("config", format!("unknown key mode {m:?}"))),
    }
}

/// Read and check a key file against the store.
pub fn read_keyfile(path: &Path, store_id: &str, enc: &Encryption) -> Result<Keys> {
    let raw = read_secret_file(path)?;
    parse_keyfile(&raw, path, store_id, enc)
}

/// Parse and check the text of a key file (`path` for messages).
pub fn parse_keyfile(raw: &str, path: &Path, store_id: &str, enc: &Encryption) -> Result<Keys> {
    let f: KeyFile = serde_json::from_str(raw).map_err(|e| {
        key_error(format!(
            "{} is not a holdfast key file ({e})",
            path.display()
        ))
    })?;
    if f.format != KEY_FORMAT {
        return Err(key_error(format!(
            "{} is not a holdfast key file",
            path.display()
        )));
    }
    if f.store_id != store_id {
        return Err(key_error(format!(
            "{} is the key of another store (store {}, this one is {store_id}); nothing was read",
            path.display(),
            f.store_id
        )));
    }
    let mut m = Zeroizing::new([0u8; 32]);
    hex::decode_to_slice(&f.master, &mut *m)
        .map_err(|_| key_error(format!("{}: the key is not 64 hex digits", path.display())))?;
    let keys = Keys::from_master(*m);
    if !opens(&keys, store_id, enc) {
        return Err(key_error(format!(
            "{}: this key does not open the store (its check does not authenticate)",
            path.display()
        )));
    }
    Ok(keys)
}

pub fn keyfile_text(keys: &Keys, store_id: &str) -> String {
    let f = KeyFile {
        format: KEY_FORMAT.into(),
        version: 1,
        store_id: store_id.into(),
        master: hex::encode(keys.master()),
    };
    serde_json::to_string_pretty(&f).expect("a key file serializes") + "\n"
}

/// Write the key file of `dir` (0600, atomically).
pub fn write_keyfile(dir: &Path, keys: &Keys, store_id: &str) -> Result<()> {
    let path = dir.join(KEYFILE);
    crate::sys::write_atomic(&path, keyfile_text(keys, store_id).as_bytes(), true)
        .map_err(|e| Error::io(format!("write {}", path.display()), e))
}

/// The keys of an encrypted store: from this process's memory, the directory's key file, or
/// (repokey) a passphrase that unwraps one of the store's keys.
pub fn unlock(
    dir: &Path,
    store: &dyn ObjectStore,
    store_id: &str,
    enc: &Encryption,
) -> Result<Arc<Keys>> {
    if let Some(k) = crate::sys::lock(unlocked()).get(store_id) {
        return Ok(k.clone());
    }
    let mode = mode_of(enc)?;
    let path = dir.join(KEYFILE);
    let keys = if path.exists() {
        read_keyfile(&path, store_id, enc)?
    } else if mode == Mode::Keyfile {
        return Err(key_error(format!(
            "the store is encrypted with a key file and {} is missing: put it back with \
             `holdfast key import FILE` (the copy `holdfast key export` printed)",
            path.display()
        )));
    } else {
        let wrapped = match list(store) {
            Ok(w) => w,
            Err(Error::Store(StoreError::NotFound(_))) => Vec::new(),
            Err(e) => return Err(e),
        };
        if wrapped.is_empty() {
            return Err(key_error(
                "the store is encrypted (repokey) but holds no key under keys/: restore one, \
                 or import the key file with `holdfast key import FILE`",
            ));
        }
        let pass = passphrase()?;
        let mut found = None;
        for w in &wrapped {
            if let Some(k) = unwrap_key(w, pass.as_bytes(), store_id)? {
                found = Some(k);
                break;
            }
        }
        let Some(k) = found else {
            return Err(key_error(format!(
                "wrong passphrase: it opens none of the store's {} key(s)",
                wrapped.len()
            )));
        };
        if !opens(&k, store_id, enc) {
            return Err(Error::damaged(
                "key",
                "a key in the store unwraps but does not open the store's check",
            ));
        }
        k
    };
    let keys = Arc::new(keys);
    crate::sys::lock(unlocked()).insert(store_id.to_string(), keys.clone());
    Ok(keys)
}

/// Which of the store's wrapped keys `pass` opens (for `key passwd` / `key remove`).
pub fn find(store: &dyn ObjectStore, pass: &[u8], store_id: &str) -> Result<Option<WrappedKey>> {
    for w in list(store)? {
        if unwrap_key(&w, pass, store_id)?.is_some() {
            return Ok(Some(w));
        }
    }
    Ok(None)
}
