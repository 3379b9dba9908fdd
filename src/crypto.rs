//! Authenticated encryption of what a store holds (format version 2): one random master key
//! per store, subkeys derived from it with blake3's `derive_key` (each purpose its own
//! context string), AES-256-GCM for blobs under a key of each blob's own (derived from its
//! kind and id, with a random 96-bit nonce), XChaCha20-Poly1305 with random 192-bit nonces
//! for metadata, and
//! a deterministic, reversible encryption of the names in object keys (SIV: the nonce is a
//! keyed hash of the padded name) so that listing by VM still works while the bucket shows no
//! VM or snapshot name. The scheme and its threat model: docs/encryption.md.

use chacha20::cipher::{KeyIvInit, StreamCipher};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use zeroize::Zeroizing;

pub const NONCE_LEN: usize = 24;
pub const TAG_LEN: usize = 16;
/// What sealing metadata adds to a plaintext.
pub const OVERHEAD: usize = NONCE_LEN + TAG_LEN;
/// A blob's nonce (AES-256-GCM).
pub const BLOB_NONCE_LEN: usize = 12;
/// What sealing a blob adds to it.
pub const BLOB_OVERHEAD: usize = BLOB_NONCE_LEN + TAG_LEN;
/// Names in object keys are padded to this many bytes before they are encrypted (so their
/// length does not show); longer names are refused by the callers' name rules.
pub const NAME_PAD: usize = 64;
const SIV_LEN: usize = 16;

/// The AEADs the store is written with, blobs/metadata (recorded in its config).
pub const AEAD: &str = "aes-256-gcm/xchacha20-poly1305";

/// A store's keys. Never printed, zeroed when dropped.
pub struct Keys {
    master: Zeroizing<[u8; 32]>,
    id: Zeroizing<[u8; 32]>,
    /// Each blob's AES-256-GCM key is a keyed blake3 of its associated data under this.
    blob: Zeroizing<[u8; 32]>,
    meta: XChaCha20Poly1305,
    name_mac: Zeroizing<[u8; 32]>,
    name_enc: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys(..)")
    }
}

/// What a ciphertext is bound to: a sealed thing opens only where it was sealed for.
#[derive(Clone, Copy)]
pub enum Purpose {
    /// A blob in a pack; the associated data is its kind and id.
    Blob,
    /// A metadata object, a pack's entry table, a wrapped key check.
    Meta,
}

/// A ciphertext that does not open: tampered with, truncated, or sealed with another key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damaged;

fn derive(context: &str, master: &[u8; 32]) -> Zeroizing<[u8; 32]> {
    Zeroizing::new(blake3::derive_key(context, master))
}

pub fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).expect("the operating system's random source failed");
    b
}

impl Keys {
    pub fn new_random() -> Keys {
        Keys::from_master(random())
    }

    pub fn from_master(master: [u8; 32]) -> Keys {
        let m = Zeroizing::new(master);
        let blob = derive("holdfast 2026-12 blob encryption", &m);
        let meta = derive("holdfast 2026-12 metadata encryption", &m);
        Keys {
            id: derive("holdfast 2026-12 chunk ids", &m),
            blob,
            meta: XChaCha20Poly1305::new((&*meta).into()),
            name_mac: derive("holdfast 2026-12 name siv", &m),
            name_enc: derive("holdfast 2026-12 name encryption", &m),
            master: m,
        }
    }

    pub fn master(&self) -> &[u8; 32] {
        &self.master
    }

    /// The key of blob ids (keyed blake3 of the plaintext).
    pub fn id_key(&self) -> [u8; 32] {
        *self.id
    }

    /// The AES-256-GCM key of the blob whose associated data is `ad` (its kind and id): a
    /// key per blob keeps every key's count of random 96-bit nonces tiny however many blobs
    /// a fleet writes (a blob is sealed again only by gc or a codec change).
    fn blob_key(&self, ad: &[u8]) -> ring::aead::LessSafeKey {
        let k = Zeroizing::new(*blake3::keyed_hash(&self.blob, ad).as_bytes());
        let unbound = ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, &*k)
            .expect("AES-256-GCM takes a 32-byte key");
        ring::aead::LessSafeKey::new(unbound)
    }

    /// A blob: `nonce || ciphertext || tag` (AES-256-GCM), bound to `ad`.
    fn seal_blob(&self, ad: &[u8], plain: &[u8]) -> Vec<u8> {
        let nonce: [u8; BLOB_NONCE_LEN] = random();
        let mut out = Vec::with_capacity(plain.len() + BLOB_OVERHEAD);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plain);
        let tag = self
            .blob_key(ad)
            .seal_in_place_separate_tag(
                ring::aead::Nonce::assume_unique_for_key(nonce),
                ring::aead::Aad::from(ad),
                &mut out[BLOB_NONCE_LEN..],
            )
            .expect("AES-256-GCM seals any length this store writes");
        out.extend_from_slice(tag.as_ref());
        out
    }

    fn open_blob(&self, ad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, Damaged> {
        if sealed.len() < BLOB_OVERHEAD {
            return Err(Damaged);
        }
        let (nonce, ct) = sealed.split_at(BLOB_NONCE_LEN);
        let nonce: [u8; BLOB_NONCE_LEN] = nonce.try_into().map_err(|_| Damaged)?;
        let mut buf = ct.to_vec();
        let n = self
            .blob_key(ad)
            .open_in_place(
                ring::aead::Nonce::assume_unique_for_key(nonce),
                ring::aead::Aad::from(ad),
                &mut buf,
            )
            .map_err(|_| Damaged)?
            .len();
        buf.truncate(n);
        Ok(buf)
    }

    /// `nonce || ciphertext || tag`, bound to `ad`.
    pub fn seal(&self, p: Purpose, ad: &[u8], plain: &[u8]) -> Vec<u8> {
        if let Purpose::Blob = p {
            return self.seal_blob(ad, plain);
        }
        let nonce: [u8; NONCE_LEN] = random();
        let mut out = Vec::with_capacity(plain.len() + OVERHEAD);
        out.extend_from_slice(&nonce);
        let ct = self
            .meta
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plain,
                    aad: ad,
                },
            )
            .expect("XChaCha20-Poly1305 encrypts any length this store writes");
        out.extend_from_slice(&ct);
        out
    }

    pub fn open(&self, p: Purpose, ad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, Damaged> {
        if let Purpose::Blob = p {
            return self.open_blob(ad, sealed);
        }
        if sealed.len() < OVERHEAD {
            return Err(Damaged);
        }
        let (nonce, ct) = sealed.split_at(NONCE_LEN);
        self.meta
            .decrypt(XNonce::from_slice(nonce), Payload { msg: ct, aad: ad })
            .map_err(|_| Damaged)
    }

    /// A name (VM, snapshot) as it appears in object keys: deterministic, so the same name
    /// is the same key component, and reversible with the key (`name_of`). 160 hex digits.
    pub fn seal_name(&self, name: &str) -> String {
        let mut padded = [0u8; NAME_PAD];
        let b = name.as_bytes();
        assert!(
            b.len() <= NAME_PAD && !b.contains(&0),
            "a name the rules allow"
        );
        padded[..b.len()].copy_from_slice(b);
        let siv: [u8; SIV_LEN] = blake3::keyed_hash(&self.name_mac, &padded).as_bytes()[..SIV_LEN]
            .try_into()
            .expect("16 of 32 bytes");
        self.name_stream(&siv, &mut padded);
        let mut out = Vec::with_capacity(SIV_LEN + NAME_PAD);
        out.extend_from_slice(&siv);
        out.extend_from_slice(&padded);
        hex::encode(out)
    }

    /// The name a component of `seal_name` hides; None when it is not one (or was altered).
    pub fn name_of(&self, component: &str) -> Option<String> {
        let raw = hex::decode(component).ok()?;
        if raw.len() != SIV_LEN + NAME_PAD {
            return None;
        }
        let siv: [u8; SIV_LEN] = raw[..SIV_LEN].try_into().ok()?;
        let mut padded: [u8; NAME_PAD] = raw[SIV_LEN..].try_into().ok()?;
        self.name_stream(&siv, &mut padded);
        let check = blake3::keyed_hash(&self.name_mac, &padded);
        if check.as_bytes()[..SIV_LEN] != siv {
            return None;
        }
        let end = padded.iter().position(|&b| b == 0).unwrap_or(NAME_PAD);
        if padded[end..].iter().any(|&b| b != 0) {
            return None;
        }
        String::from_utf8(padded[..end].to_vec()).ok()
    }

    fn name_stream(&self, siv: &[u8; SIV_LEN], buf: &mut [u8]) {
        let mut nonce = [0u8; NONCE_LEN];
        nonce[..SIV_LEN].copy_from_slice(siv);
        let mut c = chacha20::XChaCha20::new((&*self.name_enc).into(), (&nonce).into());
        c.apply_keystream(buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_bytes_open_only_with_their_key_purpose_and_associated_data() {
        let k = Keys::new_random();
        for (p, other, overhead) in [
            (Purpose::Blob, Purpose::Meta, BLOB_OVERHEAD),
            (Purpose::Meta, Purpose::Blob, OVERHEAD),
        ] {
            let s = k.seal(p, b"id-1", b"hello");
            assert_eq!(s.len(), 5 + overhead);
            assert_eq!(k.open(p, b"id-1", &s).unwrap(), b"hello");
            assert_eq!(k.open(p, b"id-2", &s), Err(Damaged));
            assert_eq!(k.open(other, b"id-1", &s), Err(Damaged));
            assert_eq!(Keys::new_random().open(p, b"id-1", &s), Err(Damaged));
            for i in 0..s.len() {
                let mut t = s.clone();
                t[i] ^= 1;
                assert_eq!(k.open(p, b"id-1", &t), Err(Damaged), "byte {i}");
            }
            assert_eq!(k.open(p, b"id-1", &s[..s.len() - 1]), Err(Damaged));
            assert_eq!(k.open(p, b"id-1", &s[..3]), Err(Damaged));
            // Random nonces: the same plaintext seals differently.
            assert_ne!(k.seal(p, b"id-1", b"hello"), s);
        }
        // A large blob round-trips (AES-GCM over many blocks).
        let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let s = k.seal(Purpose::Blob, b"id-big", &big);
        assert_eq!(k.open(Purpose::Blob, b"id-big", &s).unwrap(), big);
    }

    #[test]
    fn names_seal_deterministically_hide_their_length_and_come_back() {
        let k = Keys::from_master([5; 32]);
        let a = k.seal_name("secret-vm-name");
        assert_eq!(a, k.seal_name("secret-vm-name"));
        assert_eq!(a.len(), 2 * (SIV_LEN + NAME_PAD));
        assert_eq!(k.seal_name("x").len(), a.len());
        assert!(!a.contains("secret"));
        assert_eq!(k.name_of(&a).as_deref(), Some("secret-vm-name"));
        assert_ne!(Keys::from_master([6; 32]).seal_name("secret-vm-name"), a);
        assert_eq!(Keys::from_master([6; 32]).name_of(&a), None);
        let mut t = a.into_bytes();
        t[40] = if t[40] == b'0' { b'1' } else { b'0' };
        assert_eq!(k.name_of(std::str::from_utf8(&t).unwrap()), None);
        assert_eq!(k.name_of("web-01"), None);
    }
}
