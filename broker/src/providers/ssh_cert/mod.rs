//! SSH user certificates (`kind: ssh_cert`): the broker is an SSH user CA. A job sends its
//! public key (or asks the broker to generate a pair) and gets a certificate for the job's TTL,
//! with the policy's principals, extensions and critical options, a key id naming the job and a
//! serial derived from the grant. Certificates cannot be recalled, so revocation is a KRL
//! (OpenSSH key revocation list) of the revoked grants' serials, built from the store and served
//! beside the CA's public key; hosts refresh it into `RevokedKeys`. See
//! docs/providers/ssh_cert.md.

pub mod config;
mod krl;
mod provider;
mod spec;

pub use config::{SshCaConfig, SshCaConfigError};
pub use krl::{KRL_MAGIC, encode_krl};
pub use provider::{SshCertProvider, serial_of};
pub use spec::{Extension, SshCertSpec};
