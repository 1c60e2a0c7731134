//! Configuration from environment variables, read once per cold start. A missing or invalid
//! setting fails fast with a message naming the variable.

use std::str::FromStr;
use std::time::Duration;

/// A setting that is missing or does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("configuration: {variable} {problem}")]
pub struct ConfigError {
    /// The environment variable.
    pub variable: String,
    /// What is wrong with it.
    pub problem: String,
}

/// Reads settings from a source of variables (the process environment, or a map in tests).
pub struct Env<F: Fn(&str) -> Option<String>> {
    lookup: F,
}

impl Env<fn(&str) -> Option<String>> {
    /// The process environment.
    pub fn process() -> Self {
        Env { lookup: |name| std::env::var(name).ok() }
    }
}

impl<F: Fn(&str) -> Option<String>> Env<F> {
    /// Variables from `lookup`.
    pub fn from_fn(lookup: F) -> Self {
        Env { lookup }
    }

    /// The value, trimmed; an empty value counts as unset.
    pub fn optional(&self, name: &str) -> Option<String> {
        (self.lookup)(name).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty())
    }

    /// A value that must be set.
    pub fn required(&self, name: &str) -> Result<String, ConfigError> {
        self.optional(name)
            .ok_or_else(|| ConfigError { variable: name.to_owned(), problem: "must be set".to_owned() })
    }

    /// A parsed value, or `default` when unset.
    pub fn parse_or<T: FromStr>(&self, name: &str, default: T) -> Result<T, ConfigError> {
        match self.optional(name) {
            None => Ok(default),
            Some(raw) => raw.parse().map_err(|_| ConfigError {
                variable: name.to_owned(),
                problem: format!("has an invalid value {raw:?}"),
            }),
        }
    }

    /// A duration in milliseconds (`NAME` holds a whole number), or `default`.
    pub fn millis_or(&self, name: &str, default: Duration) -> Result<Duration, ConfigError> {
        self.parse_or(name, default.as_millis() as u64).map(Duration::from_millis)
    }
}

/// Settings every function shares.
#[derive(Debug, Clone)]
pub struct CommonConfig {
    /// The DynamoDB table (`TABLE_NAME`).
    pub table_name: String,
    /// Store timing (`WRITING_TIMEOUT_MS`, `PICKUP_TIMEOUT_MS`).
    pub store: crate::StoreOptions,
    /// Lease a generator holds on a turn (`LEASE_MS`, default 30 s).
    pub lease: Duration,
    /// Generation attempts per turn before it ends in timeout (`MAX_ATTEMPTS`, default 3).
    pub max_generation_attempts: u32,
    /// Per-user limits (`TURNS_PER_MINUTE`, `MAX_OPEN_STREAMS`, `MAX_SESSIONS_PER_USER`).
    pub limits: crate::UserLimits,
}

impl CommonConfig {
    /// Reads the shared settings.
    pub fn from_env<F: Fn(&str) -> Option<String>>(env: &Env<F>) -> Result<Self, ConfigError> {
        let defaults = crate::StoreOptions::default();
        let limits = crate::UserLimits::from_env(env)?;
        let store = crate::StoreOptions {
            writing_timeout: env.millis_or("WRITING_TIMEOUT_MS", defaults.writing_timeout)?,
            pickup_timeout: env.millis_or("PICKUP_TIMEOUT_MS", defaults.pickup_timeout)?,
            max_sessions_per_user: limits.sessions,
            ..defaults
        };
        Ok(CommonConfig {
            table_name: env.required("TABLE_NAME")?,
            store,
            lease: env.millis_or("LEASE_MS", Duration::from_secs(30))?,
            max_generation_attempts: env.parse_or("MAX_ATTEMPTS", 3)?,
            limits,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Env<impl Fn(&str) -> Option<String>> {
        let map: HashMap<String, String> =
            pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        Env::from_fn(move |name| map.get(name).cloned())
    }

    #[test]
    fn missing_and_invalid_settings_name_the_variable() {
        let err = CommonConfig::from_env(&env(&[])).unwrap_err();
        assert_eq!(err.to_string(), "configuration: TABLE_NAME must be set");
        let err = CommonConfig::from_env(&env(&[("TABLE_NAME", "t"), ("LEASE_MS", "soon")])).unwrap_err();
        assert_eq!(err.variable, "LEASE_MS");
        let ok = CommonConfig::from_env(&env(&[("TABLE_NAME", "t"), ("MAX_ATTEMPTS", " 5 ")])).unwrap();
        assert_eq!(ok.max_generation_attempts, 5);
    }
}
