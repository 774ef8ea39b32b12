//! `aws_sts:` parameters of a credential definition (from a policy file).

use super::session_policy::{MAX_MANAGED_POLICIES, SessionPolicy};
use serde::{Deserialize, Deserializer, Serialize};

/// An IAM role ARN: `arn:<partition>:iam::<12 digits>:role/<path/>name`. Checked at load so a
/// typo fails the policy, and so revoke can derive the role name without guessing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct RoleArn(String);

fn iam_name_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"+=,.@_-".contains(&b)
}

/// A string that is not an ARN of the kind asked for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArnError {
    #[error("{0:?} is not an IAM role ARN (arn:aws:iam::123456789012:role/name)")]
    Role(String),
    #[error("{0:?} is not an IAM managed policy ARN")]
    Policy(String),
}

impl RoleArn {
    pub fn parse(s: &str) -> Result<Self, ArnError> {
        let bad = || ArnError::Role(s.to_owned());
        let parts: Vec<&str> = s.splitn(6, ':').collect();
        let [arn, partition, service, region, account, resource] = parts.as_slice() else {
            return Err(bad());
        };
        let ok = *arn == "arn"
            && matches!(
                *partition,
                "aws" | "aws-cn" | "aws-us-gov" | "aws-iso" | "aws-iso-b"
            )
            && *service == "iam"
            && region.is_empty()
            && account.len() == 12
            && account.bytes().all(|b| b.is_ascii_digit());
        let Some(path_name) = resource.strip_prefix("role/") else {
            return Err(bad());
        };
        let name = path_name.rsplit('/').next().unwrap_or_default();
        if !ok
            || name.is_empty()
            || name.len() > 64
            || !name.bytes().all(iam_name_char)
            || path_name.len() > 512 + 64
            || !path_name.bytes().all(|b| iam_name_char(b) || b == b'/')
            || path_name.contains("//")
        {
            return Err(bad());
        }
        Ok(Self(s.to_owned()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// The role's name (the last path segment), what IAM's role-policy calls take.
    pub fn role_name(&self) -> &str {
        self.0.rsplit('/').next().unwrap_or_default()
    }
    /// The 12-digit account the role (and so every session of it) belongs to.
    pub fn account_id(&self) -> &str {
        self.0.split(':').nth(4).unwrap_or_default()
    }
}

impl<'de> Deserialize<'de> for RoleArn {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        RoleArn::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A managed policy ARN (`arn:<partition>:iam::<account or aws>:policy/…`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct PolicyArn(String);

impl PolicyArn {
    pub fn parse(s: &str) -> Result<Self, ArnError> {
        let parts: Vec<&str> = s.splitn(6, ':').collect();
        let ok = matches!(parts.as_slice(), ["arn", p, "iam", "", acct, res]
            if p.starts_with("aws")
                && (*acct == "aws" || (acct.len() == 12 && acct.bytes().all(|b| b.is_ascii_digit())))
                && res.len() > "policy/".len()
                && res.len() <= 2048
                && res.starts_with("policy/")
                && res.bytes().all(|b| iam_name_char(b) || b == b'/'));
        if !ok {
            return Err(ArnError::Policy(s.to_owned()));
        }
        Ok(Self(s.to_owned()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for PolicyArn {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        PolicyArn::parse(&s).map_err(serde::de::Error::custom)
    }
}

fn managed<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<PolicyArn>, D::Error> {
    let v = Vec::<PolicyArn>::deserialize(d)?;
    if v.len() > MAX_MANAGED_POLICIES {
        return Err(serde::de::Error::custom(format!(
            "at most {MAX_MANAGED_POLICIES} managed_policy_arns (an AWS limit)"
        )));
    }
    Ok(v)
}

fn region<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let v = Option::<String>::deserialize(d)?;
    if let Some(r) = &v
        && !super::config::valid_aws_region(r)
    {
        return Err(serde::de::Error::custom(format!(
            "{r:?} is not an AWS region name"
        )));
    }
    Ok(v)
}

/// A job-scoped AWS session (STS `AssumeRole`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AwsStsSpec {
    /// An account/endpoint named under `targets.aws` in the broker config.
    pub target: String,
    /// The role the job's session assumes.
    pub role_arn: RoleArn,
    /// Region handed to the job (`region` field, `AWS_REGION`); default: the target's.
    #[serde(default, deserialize_with = "region")]
    pub region: Option<String>,
    /// Inline session policy (a JSON object, or a string of JSON), templated over claims. The
    /// session gets the intersection of the role's policies and this.
    #[serde(default)]
    pub session_policy: Option<SessionPolicy>,
    /// Managed session policies (at most 10); also intersected with the role's policies.
    #[serde(default, deserialize_with = "managed")]
    pub managed_policy_arns: Vec<PolicyArn>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_checks() {
        let s: AwsStsSpec = serde_saphyr::from_str(
            "target: main\nrole_arn: arn:aws:iam::123456789012:role/ci/deploy\nregion: eu-west-1\n\
             managed_policy_arns: [arn:aws:iam::aws:policy/ReadOnlyAccess]\n\
             session_policy:\n  Version: '2012-10-17'\n  Statement:\n    - Effect: Allow\n      Action: s3:GetObject\n      Resource: 'arn:aws:s3:::b/${repository}/*'\n",
        )
        .unwrap();
        assert_eq!(s.role_arn.role_name(), "deploy");
        assert_eq!(s.role_arn.account_id(), "123456789012");
        assert_eq!(s.region.as_deref(), Some("eu-west-1"));
        assert!(s.session_policy.is_some());
        let role = "arn:aws:iam::123456789012:role/x";
        for bad in [
            format!("target: m\nrole_arn: {role}\nbogus: 1\n"),
            "target: m\nrole_arn: arn:aws:iam::123:role/x\n".to_owned(),
            "target: m\nrole_arn: arn:aws:s3:::bucket\n".to_owned(),
            "target: m\nrole_arn: arn:aws:iam::123456789012:user/x\n".to_owned(),
            "target: m\nrole_arn: arn:aws:iam::123456789012:role/a b\n".to_owned(),
            format!("target: m\nrole_arn: {role}\nregion: 'eu west'\n"),
            format!("target: m\nrole_arn: {role}\nmanaged_policy_arns: [nope]\n"),
            format!("target: m\nrole_arn: {role}\nsession_policy: '{{broken'\n"),
            format!(
                "target: m\nrole_arn: {role}\nmanaged_policy_arns: [{}]\n",
                ["arn:aws:iam::aws:policy/P"; 11].join(", ")
            ),
        ] {
            assert!(serde_saphyr::from_str::<AwsStsSpec>(&bad).is_err(), "{bad}");
        }
    }
}
