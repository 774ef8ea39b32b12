//! The OpenSSH key revocation list (KRL) format, written from OpenSSH's PROTOCOL.krl: only the
//! part the broker needs, a certificate section revoking serials of one CA. (No Rust crate
//! writes KRLs.) sshd reads the file named by `RevokedKeys`; `ssh-keygen -Q -f <krl> <cert>`
//! checks a certificate against it.
//!
//! ```text
//! uint64 KRL_MAGIC ("SSHKRL\n\0")   uint32 KRL_FORMAT_VERSION (1)
//! uint64 krl_version                uint64 generated_date
//! uint64 flags                      string reserved   string comment
//! byte KRL_SECTION_CERTIFICATES (1) string section_data:
//!     string ca_key (wire encoding of the CA public key)   string reserved
//!     byte KRL_SECTION_CERT_SERIAL_LIST (0x20)  string: uint64 serial ...
//! ```
//! The KRL's own signature section is left out: sshd does not check it, and the file's
//! integrity comes from the channel it is fetched over (HTTPS to the broker).

use ssh_key::PublicKey;

/// `"SSHKRL\n\0"` as a big-endian u64.
pub const KRL_MAGIC: u64 = 0x5353_484b_524c_0a00;
const KRL_FORMAT_VERSION: u32 = 1;
const KRL_SECTION_CERTIFICATES: u8 = 1;
const KRL_SECTION_CERT_SERIAL_LIST: u8 = 0x20;

fn put_string(out: &mut Vec<u8>, data: &[u8]) {
    // Lengths here are bounded by the caller (a few MiB at most); u32 is the wire type.
    out.extend_from_slice(&u32::try_from(data.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(data);
}

/// A KRL revoking `serials` (any order; zero and duplicates are dropped, since serial 0 cannot
/// be revoked by serial) of certificates signed by `ca`. With no serial the file still names
/// nothing revoked and is valid for `RevokedKeys`.
pub fn encode_krl(
    ca: &PublicKey,
    serials: &[u64],
    krl_version: u64,
    generated_date: u64,
    comment: &str,
) -> Result<Vec<u8>, ssh_key::Error> {
    let mut serials: Vec<u64> = serials.iter().copied().filter(|s| *s != 0).collect();
    serials.sort_unstable();
    serials.dedup();
    let mut out = Vec::with_capacity(64 + serials.len() * 8);
    out.extend_from_slice(&KRL_MAGIC.to_be_bytes());
    out.extend_from_slice(&KRL_FORMAT_VERSION.to_be_bytes());
    out.extend_from_slice(&krl_version.to_be_bytes());
    out.extend_from_slice(&generated_date.to_be_bytes());
    out.extend_from_slice(&0u64.to_be_bytes()); // flags
    put_string(&mut out, b""); // reserved
    put_string(&mut out, comment.as_bytes());
    if serials.is_empty() {
        return Ok(out);
    }
    let mut list = Vec::with_capacity(serials.len() * 8);
    for s in &serials {
        list.extend_from_slice(&s.to_be_bytes());
    }
    let mut section = Vec::new();
    put_string(&mut section, &ca.to_bytes()?);
    put_string(&mut section, b""); // reserved
    section.push(KRL_SECTION_CERT_SERIAL_LIST);
    put_string(&mut section, &list);
    out.push(KRL_SECTION_CERTIFICATES);
    put_string(&mut out, &section);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ssh_key::{Algorithm, PrivateKey, rand_core::OsRng};

    #[test]
    fn layout_follows_protocol_krl() {
        let ca = PrivateKey::random(&mut OsRng, Algorithm::Ed25519).unwrap();
        let blob = ca.public_key().to_bytes().unwrap();
        let krl = encode_krl(ca.public_key(), &[7, 0, 3, 7], 9, 1_800_000_000, "c").unwrap();
        assert_eq!(&krl[..8], b"SSHKRL\n\0");
        assert_eq!(&krl[8..12], &1u32.to_be_bytes());
        assert_eq!(&krl[12..20], &9u64.to_be_bytes());
        assert_eq!(&krl[20..28], &1_800_000_000u64.to_be_bytes());
        // flags, empty reserved, comment "c"
        assert_eq!(&krl[28..36], &[0; 8]);
        assert_eq!(&krl[36..40], &[0; 4]);
        assert_eq!(&krl[40..45], &[0, 0, 0, 1, b'c']);
        assert_eq!(krl[45], KRL_SECTION_CERTIFICATES);
        let section_len = u32::from_be_bytes(krl[46..50].try_into().unwrap()) as usize;
        assert_eq!(krl.len(), 50 + section_len);
        let s = &krl[50..];
        let ca_len = u32::from_be_bytes(s[..4].try_into().unwrap()) as usize;
        assert_eq!(&s[4..4 + ca_len], blob.as_slice());
        let rest = &s[4 + ca_len..];
        assert_eq!(&rest[..4], &[0; 4]);
        assert_eq!(rest[4], KRL_SECTION_CERT_SERIAL_LIST);
        assert_eq!(&rest[5..9], &16u32.to_be_bytes());
        // Sorted, deduplicated, serial 0 dropped.
        assert_eq!(&rest[9..17], &3u64.to_be_bytes());
        assert_eq!(&rest[17..25], &7u64.to_be_bytes());
        assert_eq!(rest.len(), 25);
        // Nothing revoked: the header alone.
        assert_eq!(
            encode_krl(ca.public_key(), &[], 1, 1, "").unwrap().len(),
            44
        );
    }
}
