//! Configuration from environment variables, read once per cold start. A missing or invalid
//! setting fails fast with a message naming the variable.

use crate::{GlobalLimits, UserLimits};
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

    /// A duration written with its unit (`90s`, `30m`, `2h`, `1d`; a bare number is seconds),
    /// or `default`; `0` turns the setting off (`None`).
    pub fn duration_or(
        &self,
        name: &str,
        default: Option<Duration>,
    ) -> Result<Option<Duration>, ConfigError> {
        let Some(raw) = self.optional(name) else { return Ok(default) };
        let invalid = || ConfigError {
            variable: name.to_owned(),
            problem: format!(
                "has an invalid value {raw:?}; write a number with a unit: 90s, 30m, 2h, 1d (0: off)"
            ),
        };
        let split = raw.find(|c: char| !c.is_ascii_digit()).unwrap_or(raw.len());
        let (digits, unit) = raw.split_at(split);
        let n: u64 = digits.parse().map_err(|_| invalid())?;
        let seconds = match unit.trim() {
            "" | "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86_400,
            _ => return Err(invalid()),
        };
        Ok((n > 0).then(|| Duration::from_secs(n.saturating_mul(seconds))))
    }
}

impl UserLimits {
    /// Reads `TURNS_PER_MINUTE`, `MAX_OPEN_STREAMS`, `MAX_STREAMS_PER_TURN`,
    /// `MAX_SESSIONS_PER_USER`, `DAILY_TOKEN_BUDGET`, `MAX_TURNS_IN_FLIGHT`, `MAX_OPEN_FEEDS` and `FORKS_PER_MINUTE`.
    pub fn from_env<F: Fn(&str) -> Option<String>>(env: &Env<F>) -> Result<Self, ConfigError> {
        let defaults = UserLimits::default();
        Ok(UserLimits {
            turns_per_minute: env.parse_or("TURNS_PER_MINUTE", defaults.turns_per_minute)?,
            open_streams: env.parse_or("MAX_OPEN_STREAMS", defaults.open_streams)?,
            streams_per_turn: env.parse_or("MAX_STREAMS_PER_TURN", defaults.streams_per_turn)?,
            sessions: env.parse_or("MAX_SESSIONS_PER_USER", defaults.sessions)?,
            daily_tokens: env.parse_or("DAILY_TOKEN_BUDGET", defaults.daily_tokens)?,
            turns_in_flight: env.parse_or("MAX_TURNS_IN_FLIGHT", defaults.turns_in_flight)?,
            open_feeds: env.parse_or("MAX_OPEN_FEEDS", defaults.open_feeds)?,
            forks_per_minute: env.parse_or("FORKS_PER_MINUTE", defaults.forks_per_minute)?,
        })
    }
}

impl GlobalLimits {
    /// Reads `GLOBAL_TURNS_PER_MINUTE`.
    pub fn from_env<F: Fn(&str) -> Option<String>>(env: &Env<F>) -> Result<Self, ConfigError> {
        Ok(GlobalLimits { turns_per_minute: env.parse_or("GLOBAL_TURNS_PER_MINUTE", 0)? })
    }
}

/// Settings every function shares.
#[derive(Debug, Clone)]
pub struct CommonConfig {
    /// The DynamoDB table (`TABLE_NAME`).
    pub table_name: String,
    /// Store timing and retention (`WRITING_TIMEOUT_MS`, `PICKUP_TIMEOUT_MS`, `SESSION_TTL_DAYS`,
    /// `SESSION_IDLE_TIMEOUT`).
    pub store: crate::StoreOptions,
    /// Lease a generator holds on a turn (`LEASE_MS`, default 30 s).
    pub lease: Duration,
    /// Generation attempts per turn before it ends in timeout (`MAX_ATTEMPTS`, default 3).
    pub max_generation_attempts: u32,
    /// Per-user limits (`TURNS_PER_MINUTE`, `MAX_OPEN_STREAMS`, `MAX_STREAMS_PER_TURN`,
    /// `MAX_SESSIONS_PER_USER`, `DAILY_TOKEN_BUDGET`, `MAX_TURNS_IN_FLIGHT`).
    pub limits: UserLimits,
    /// Limits over every user (`GLOBAL_TURNS_PER_MINUTE`).
    pub global: GlobalLimits,
}

impl CommonConfig {
    /// Reads the shared settings.
    pub fn from_env<F: Fn(&str) -> Option<String>>(env: &Env<F>) -> Result<Self, ConfigError> {
        let defaults = crate::StoreOptions::default();
        let limits = UserLimits::from_env(env)?;
        let store = crate::StoreOptions {
            writing_timeout: env.millis_or("WRITING_TIMEOUT_MS", defaults.writing_timeout)?,
            pickup_timeout: env.millis_or("PICKUP_TIMEOUT_MS", defaults.pickup_timeout)?,
            max_sessions_per_user: limits.sessions,
            daily_token_budget: limits.daily_tokens,
            retention: match env
                .parse_or("SESSION_TTL_DAYS", defaults.retention.map_or(0, |d| d.as_secs() / 86_400))?
            {
                0 => None,
                days => Some(Duration::from_secs(days * 86_400)),
            },
            idle_timeout: env.duration_or("SESSION_IDLE_TIMEOUT", defaults.idle_timeout)?,
            ..defaults
        };
        Ok(CommonConfig {
            table_name: env.required("TABLE_NAME")?,
            store,
            lease: env.millis_or("LEASE_MS", Duration::from_secs(30))?,
            max_generation_attempts: env.parse_or("MAX_ATTEMPTS", 3)?,
            limits,
            global: GlobalLimits::from_env(env)?,
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
    fn limits_read_from_the_environment() {
        let env = Env::from_fn(|name| match name {
            "TURNS_PER_MINUTE" => Some("5".to_owned()),
            "MAX_OPEN_STREAMS" => Some("0".to_owned()),
            _ => None,
        });
        let limits = UserLimits::from_env(&env).unwrap();
        assert_eq!(limits, UserLimits { turns_per_minute: 5, open_streams: 0, ..UserLimits::default() });
        assert_eq!((limits.streams_per_turn, limits.daily_tokens), (2, 0), "defaults");
        let bad = Env::from_fn(|name| (name == "MAX_SESSIONS_PER_USER").then(|| "many".to_owned()));
        assert_eq!(UserLimits::from_env(&bad).unwrap_err().variable, "MAX_SESSIONS_PER_USER");
        let budget = Env::from_fn(|name| (name == "DAILY_TOKEN_BUDGET").then(|| "50000".to_owned()));
        assert_eq!(UserLimits::from_env(&budget).unwrap().daily_tokens, 50_000);
        let global = Env::from_fn(|name| (name == "GLOBAL_TURNS_PER_MINUTE").then(|| "600".to_owned()));
        assert_eq!(GlobalLimits::from_env(&global).unwrap().turns_per_minute, 600);
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

    #[test]
    fn retention_and_idle_timeout_read_days_and_units_and_zero_turns_them_off() {
        let base = [("TABLE_NAME", "t")];
        let defaults = CommonConfig::from_env(&env(&base)).unwrap().store;
        assert_eq!(defaults.retention, Some(Duration::from_secs(30 * 86_400)));
        assert_eq!(defaults.idle_timeout, Some(Duration::from_secs(30 * 60)));
        let set = |pairs: &[(&str, &str)]| {
            let all: Vec<(&str, &str)> = base.iter().chain(pairs).copied().collect();
            CommonConfig::from_env(&env(&all)).map(|c| c.store)
        };
        let store = set(&[("SESSION_TTL_DAYS", "7"), ("SESSION_IDLE_TIMEOUT", "2h")]).unwrap();
        assert_eq!(store.retention, Some(Duration::from_secs(7 * 86_400)));
        assert_eq!(store.idle_timeout, Some(Duration::from_secs(7200)));
        let off = set(&[("SESSION_TTL_DAYS", "0"), ("SESSION_IDLE_TIMEOUT", "0")]).unwrap();
        assert_eq!((off.retention, off.idle_timeout), (None, None));
        assert_eq!(
            set(&[("SESSION_IDLE_TIMEOUT", "90")]).unwrap().idle_timeout,
            Some(Duration::from_secs(90))
        );
        let err = set(&[("SESSION_IDLE_TIMEOUT", "soon")]).unwrap_err();
        assert_eq!(err.variable, "SESSION_IDLE_TIMEOUT");
        assert!(err.problem.contains("30m"), "{}", err.problem);
        assert_eq!(set(&[("SESSION_TTL_DAYS", "-1")]).unwrap_err().variable, "SESSION_TTL_DAYS");
    }
}
