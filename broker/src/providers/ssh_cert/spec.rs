//! `ssh_cert:` parameters of a credential definition (from a policy file), checked at load.

use crate::providers::template::Template;
use serde::{Deserialize, Deserializer, Serialize};

/// A certificate extension the broker may grant (OpenSSH PROTOCOL.certkeys). None is granted
/// unless the policy names it: no pty, no forwarding, no `~/.ssh/rc`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Extension {
    #[serde(rename = "permit-pty")]
    PermitPty,
    #[serde(rename = "permit-agent-forwarding")]
    PermitAgentForwarding,
    #[serde(rename = "permit-port-forwarding")]
    PermitPortForwarding,
    #[serde(rename = "permit-X11-forwarding")]
    PermitX11Forwarding,
    #[serde(rename = "permit-user-rc")]
    PermitUserRc,
    #[serde(rename = "no-touch-required")]
    NoTouchRequired,
}

impl Extension {
    /// The name written into the certificate.
    pub fn as_str(self) -> &'static str {
        match self {
            Extension::PermitPty => "permit-pty",
            Extension::PermitAgentForwarding => "permit-agent-forwarding",
            Extension::PermitPortForwarding => "permit-port-forwarding",
            Extension::PermitX11Forwarding => "permit-X11-forwarding",
            Extension::PermitUserRc => "permit-user-rc",
            Extension::NoTouchRequired => "no-touch-required",
        }
    }
}

/// `ssh_cert:` parameters of a credential definition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SshCertSpec {
    /// A CA under `targets.ssh_ca` in the broker config.
    pub ca: String,
    /// Principals (the user names or `AuthorizedPrincipalsFile` entries the certificate is
    /// valid for), templated over claims (`deploy-${repository_owner}`). At least one.
    #[serde(deserialize_with = "principals")]
    pub principals: Vec<Template>,
    /// Extensions granted; none by default (`permit-pty` off).
    #[serde(default)]
    pub extensions: Vec<Extension>,
    /// `force-command` critical option: the only command the certificate may run.
    #[serde(default, deserialize_with = "force_command")]
    pub force_command: Option<String>,
    /// `source-address` critical option: client addresses (CIDR) the certificate is valid from.
    #[serde(default, deserialize_with = "source_address")]
    pub source_address: Vec<String>,
    /// Whether a job may ask the broker to generate the key pair (the private key then travels
    /// in the response, once). `false`: the job must send its own public key.
    #[serde(default = "yes")]
    pub allow_generated_key: bool,
}

fn yes() -> bool {
    true
}

const MAX_PRINCIPALS: usize = 32;

fn principals<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Template>, D::Error> {
    let v = Vec::<Template>::deserialize(d)?;
    if v.is_empty() || v.len() > MAX_PRINCIPALS {
        return Err(serde::de::Error::custom(format!(
            "principals: name 1 to {MAX_PRINCIPALS} principals"
        )));
    }
    Ok(v)
}

/// A principal as sshd compares it: no whitespace, no comma (the separator of
/// `AuthorizedPrincipalsFile` options and `principals=`), printable ASCII, at most 256 bytes.
pub(super) fn valid_principal(p: &str) -> bool {
    !p.is_empty() && p.len() <= 256 && p.bytes().all(|b| b.is_ascii_graphic() && b != b',')
}

fn force_command<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let s = String::deserialize(d)?;
    if s.is_empty() || s.len() > 1024 || s.chars().any(char::is_control) {
        return Err(serde::de::Error::custom(
            "force_command: one line of at most 1,024 bytes",
        ));
    }
    Ok(Some(s))
}

/// `a.b.c.d[/n]` or an IPv6 address with an optional prefix, as sshd's `addr_match_cidr_list`
/// accepts them.
pub(super) fn valid_cidr(s: &str) -> bool {
    let (addr, prefix) = match s.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (s, None),
    };
    let Ok(ip) = addr.parse::<std::net::IpAddr>() else {
        return false;
    };
    let max = if ip.is_ipv4() { 32 } else { 128 };
    prefix.is_none_or(|p| p.parse::<u8>().is_ok_and(|n| n <= max) && !p.starts_with('+'))
}

fn source_address<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let v = Vec::<String>::deserialize(d)?;
    if v.len() > 64 {
        return Err(serde::de::Error::custom(
            "source_address: at most 64 entries",
        ));
    }
    if let Some(bad) = v.iter().find(|s| !valid_cidr(s)) {
        return Err(serde::de::Error::custom(format!(
            "source_address: {bad:?} is not an address or CIDR block"
        )));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(y: &str) -> Result<SshCertSpec, String> {
        serde_saphyr::from_str(y).map_err(|e| e.to_string())
    }

    #[test]
    fn spec_parses_and_refuses_bad_values() {
        let s = parse("ca: main\nprincipals: [deploy]\n").unwrap();
        assert!(s.extensions.is_empty(), "no extension unless named");
        assert!(s.allow_generated_key);
        let s = parse(
            "ca: main\nprincipals: ['deploy-${repository_owner}']\nextensions: [permit-pty]\nforce_command: /usr/bin/deploy\nsource_address: [10.0.0.0/8, '::1']\n",
        )
        .unwrap();
        assert_eq!(s.extensions, vec![Extension::PermitPty]);
        assert_eq!(s.source_address.len(), 2);
        for bad in [
            "ca: main\nprincipals: []\n",
            "ca: main\nprincipals: [a]\nextensions: [permit-everything]\n",
            "ca: main\nprincipals: [a]\nsource_address: [10.0.0.0/33]\n",
            "ca: main\nprincipals: [a]\nsource_address: [example.com]\n",
            "ca: main\nprincipals: [a]\nforce_command: ''\n",
            "ca: main\nprincipals: [a]\nkey_type: rsa\n",
            "principals: [a]\n",
        ] {
            assert!(parse(bad).is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn principals_and_cidrs() {
        assert!(valid_principal("deploy"));
        assert!(valid_principal("deploy-acme/api"));
        for bad in ["", "a b", "a,b", "a\nb"] {
            assert!(!valid_principal(bad));
        }
        assert!(valid_cidr("127.0.0.1") && valid_cidr("10.0.0.0/8") && valid_cidr("::1/128"));
        assert!(!valid_cidr("10.0.0.0/") && !valid_cidr("host") && !valid_cidr("::1/129"));
    }
}
