//! Checked little-endian field access on untrusted byte slices.
//!
//! Every accessor returns `Corrupt` instead of panicking when the field does not fit.

use super::error::{corrupt, Result};

/// `b[off..off + len]`, or `Corrupt` naming `what`.
pub(crate) fn sub<'a>(b: &'a [u8], off: usize, len: usize, what: &str) -> Result<&'a [u8]> {
    off.checked_add(len)
        .and_then(|end| b.get(off..end))
        .ok_or_else(|| {
            corrupt(format!(
                "{what}: {len} bytes at {off} overrun a {}-byte structure",
                b.len()
            ))
        })
}

fn arr<const N: usize>(b: &[u8], off: usize) -> Result<[u8; N]> {
    let s = sub(b, off, N, "field")?;
    let mut a = [0u8; N];
    a.copy_from_slice(s);
    Ok(a)
}

pub(crate) fn u8_at(b: &[u8], off: usize) -> Result<u8> {
    b.get(off)
        .copied()
        .ok_or_else(|| corrupt(format!("byte {off} overruns a {}-byte structure", b.len())))
}
pub(crate) fn le16(b: &[u8], off: usize) -> Result<u16> {
    Ok(u16::from_le_bytes(arr(b, off)?))
}
pub(crate) fn le32(b: &[u8], off: usize) -> Result<u32> {
    Ok(u32::from_le_bytes(arr(b, off)?))
}
pub(crate) fn le64(b: &[u8], off: usize) -> Result<u64> {
    Ok(u64::from_le_bytes(arr(b, off)?))
}

/// UTF-16LE to UTF-8; unpaired surrogates become U+FFFD.
pub(crate) fn utf16le(b: &[u8]) -> Vec<u8> {
    let units = b.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]));
    char::decode_utf16(units)
        .map(|r| r.unwrap_or(char::REPLACEMENT_CHARACTER))
        .collect::<String>()
        .into_bytes()
}

/// Simple case folding for case-insensitive lookups (FAT, NTFS).
pub(crate) fn fold(name: &[u8]) -> Vec<u8> {
    String::from_utf8_lossy(name).to_lowercase().into_bytes()
}

/// `a * b` or `Corrupt`.
pub(crate) fn mul(a: u64, b: u64, what: &str) -> Result<u64> {
    a.checked_mul(b)
        .ok_or_else(|| corrupt(format!("{what} overflows")))
}
/// `a + b` or `Corrupt`.
pub(crate) fn add(a: u64, b: u64, what: &str) -> Result<u64> {
    a.checked_add(b)
        .ok_or_else(|| corrupt(format!("{what} overflows")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accessors_never_panic() {
        let b = [1u8, 2, 3];
        assert_eq!(le16(&b, 1).unwrap(), 0x0302);
        assert!(le32(&b, 0).is_err());
        assert!(le16(&b, usize::MAX).is_err());
        assert!(sub(&b, 2, usize::MAX, "x").is_err());
        assert_eq!(utf16le(&[0x41, 0, 0x00, 0xd8]), "A\u{fffd}".as_bytes());
    }
}
