//! The model configuration, read once at cold start. A missing or invalid variable fails the
//! start with a message naming it; the API key is never printed.

use crate::llm::bedrock::{BedrockSettings, CachePoints};
use crate::llm::openai::OpenAiSettings;
use crate::llm::{Bedrock, DemoModel, Model, ModelProvider, OpenAi, RetryPolicy};
use crate::memory::MemoryLimits;
use crate::routing::{NamedModel, RouteRule, Routes};
use chat_core::config::{ConfigError, Env};
use std::sync::Arc;
use std::time::Duration;

/// Which provider answers.
#[derive(Debug, Clone)]
pub enum Provider {
    /// The built-in demo model (no network).
    Demo(DemoModel),
    /// An OpenAI-compatible endpoint.
    OpenAi {
        /// Its settings; `api_key` is filled from the secret at build time when one is named.
        settings: OpenAiSettings,
        /// A Secrets Manager secret holding the key (`OPENAI_API_KEY_SECRET_ARN`).
        api_key_secret: Option<String>,
    },
    /// Amazon Bedrock.
    Bedrock(BedrockSettings),
}

/// Everything about the model.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// The provider.
    pub provider: Provider,
    /// The system prompt (`LLM_SYSTEM_PROMPT`).
    pub system_prompt: Option<String>,
    /// Retries before the first token, and the idle timeout.
    pub retry: RetryPolicy,
    /// How much history the model sees.
    pub memory: MemoryLimits,
    /// The small model short, simple turns are routed to (`ROUTE_SMALL_*`); `None`: none.
    pub small: Option<SmallModel>,
}

/// The small model of response routing (see [`crate::routing`]): same provider, its own model
/// id and reply length.
#[derive(Debug, Clone)]
pub struct SmallModel {
    /// The model id (`ROUTE_SMALL_MODEL`).
    pub model: String,
    /// Its longest reply, in tokens (`ROUTE_SMALL_MAX_TOKENS`, default `LLM_MAX_TOKENS`).
    pub max_tokens: u32,
    /// Which turns go to it (`ROUTE_SMALL_MAX_CHARS`).
    pub rule: RouteRule,
}

fn invalid(variable: &str, problem: impl Into<String>) -> ConfigError {
    ConfigError { variable: variable.to_owned(), problem: problem.into() }
}

impl ModelConfig {
    /// Reads the model settings; `faults` enables the demo model's test directives.
    pub fn from_env<F: Fn(&str) -> Option<String>>(
        env: &Env<F>,
        faults: bool,
    ) -> Result<ModelConfig, ConfigError> {
        let temperature = match env.optional("LLM_TEMPERATURE") {
            None => None,
            Some(_) => match env.parse_or::<f32>("LLM_TEMPERATURE", 0.0)? {
                t if (0.0..=2.0).contains(&t) => Some(t),
                t => return Err(invalid("LLM_TEMPERATURE", format!("is {t}; use a value from 0 to 2"))),
            },
        };
        let max_tokens = match env.parse_or::<u32>("LLM_MAX_TOKENS", 1024)? {
            0 => return Err(invalid("LLM_MAX_TOKENS", "must be at least 1")),
            n => n,
        };
        let provider = match env.optional("LLM_PROVIDER").as_deref().unwrap_or("demo") {
            "demo" => Provider::Demo(DemoModel {
                reply_tokens: env.parse_or("DEMO_REPLY_TOKENS", 50)?,
                token_delay: env.millis_or("DEMO_TOKEN_DELAY_MS", Duration::from_millis(20))?,
                faults,
            }),
            "openai" => {
                let base_url =
                    env.optional("OPENAI_BASE_URL").unwrap_or_else(|| "https://api.openai.com/v1".to_owned());
                if !(base_url.starts_with("https://") || base_url.starts_with("http://")) {
                    return Err(invalid(
                        "OPENAI_BASE_URL",
                        format!("is {base_url:?}; it must start with https:// or http://"),
                    ));
                }
                let api_key = env.optional("OPENAI_API_KEY");
                let api_key_secret = env.optional("OPENAI_API_KEY_SECRET_ARN");
                if api_key.is_some() && api_key_secret.is_some() {
                    return Err(invalid(
                        "OPENAI_API_KEY_SECRET_ARN",
                        "is set together with OPENAI_API_KEY; set only one",
                    ));
                }
                Provider::OpenAi {
                    settings: OpenAiSettings {
                        base_url,
                        api_key,
                        model: env.required("LLM_MODEL")?,
                        temperature,
                        max_tokens,
                        max_tokens_field: match env.optional("OPENAI_MAX_TOKENS_FIELD").as_deref() {
                            None | Some("max_tokens") => "max_tokens",
                            Some("max_completion_tokens") => "max_completion_tokens",
                            Some(other) => {
                                return Err(invalid(
                                    "OPENAI_MAX_TOKENS_FIELD",
                                    format!("is {other:?}; use \"max_tokens\" or \"max_completion_tokens\""),
                                ))
                            }
                        },
                        connect_timeout: env.millis_or("LLM_CONNECT_TIMEOUT_MS", Duration::from_secs(10))?,
                        stream_usage: env.parse_or("OPENAI_STREAM_USAGE", true)?,
                    },
                    api_key_secret,
                }
            }
            "bedrock" => Provider::Bedrock(BedrockSettings {
                model: env.required("LLM_MODEL")?,
                temperature,
                max_tokens,
                cache_points: match env.optional("BEDROCK_CACHE_POINTS") {
                    None => CachePoints::default(),
                    Some(raw) => raw.parse().map_err(|problem| invalid("BEDROCK_CACHE_POINTS", problem))?,
                },
            }),
            other => {
                return Err(invalid(
                    "LLM_PROVIDER",
                    format!("is {other:?}; use \"demo\", \"openai\" or \"bedrock\""),
                ))
            }
        };
        let defaults = RetryPolicy::default();
        let retry = RetryPolicy {
            max_attempts: env.parse_or("LLM_MAX_ATTEMPTS", defaults.max_attempts)?.max(1),
            base: env.millis_or("LLM_RETRY_BASE_MS", defaults.base)?,
            cap: env.millis_or("LLM_RETRY_CAP_MS", defaults.cap)?,
            idle_timeout: env.millis_or("LLM_IDLE_TIMEOUT_MS", defaults.idle_timeout)?,
        };
        let memory_defaults = MemoryLimits::default();
        let memory = MemoryLimits {
            max_tokens: env.parse_or("MEMORY_MAX_TOKENS", memory_defaults.max_tokens)?,
            max_turns: match env.parse_or("MEMORY_MAX_TURNS", memory_defaults.max_turns)? {
                0 => return Err(invalid("MEMORY_MAX_TURNS", "must be at least 1 (the current turn)")),
                n => n,
            },
        };
        let small = match env.optional("ROUTE_SMALL_MODEL") {
            None => None,
            Some(model) => Some(SmallModel {
                model,
                max_tokens: match env.parse_or::<u32>("ROUTE_SMALL_MAX_TOKENS", max_tokens)? {
                    0 => return Err(invalid("ROUTE_SMALL_MAX_TOKENS", "must be at least 1")),
                    n => n,
                },
                rule: RouteRule {
                    max_chars: env.parse_or("ROUTE_SMALL_MAX_CHARS", RouteRule::default().max_chars)?,
                },
            }),
        };
        Ok(ModelConfig { provider, system_prompt: env.optional("LLM_SYSTEM_PROMPT"), retry, memory, small })
    }

    /// The main model's id, as replies record it.
    pub fn model_name(&self) -> String {
        match &self.provider {
            Provider::Demo(_) => "demo".to_owned(),
            Provider::OpenAi { settings, .. } => settings.model.clone(),
            Provider::Bedrock(settings) => settings.model.clone(),
        }
    }

    /// This configuration with the small model in the main one's place.
    fn small_config(&self, small: &SmallModel) -> ModelConfig {
        let provider = match &self.provider {
            Provider::Demo(demo) => Provider::Demo(DemoModel {
                reply_tokens: demo.reply_tokens.min(small.max_tokens as usize),
                ..demo.clone()
            }),
            Provider::OpenAi { settings, api_key_secret } => Provider::OpenAi {
                settings: OpenAiSettings {
                    model: small.model.clone(),
                    max_tokens: small.max_tokens,
                    ..settings.clone()
                },
                api_key_secret: api_key_secret.clone(),
            },
            Provider::Bedrock(settings) => Provider::Bedrock(BedrockSettings {
                model: small.model.clone(),
                max_tokens: small.max_tokens,
                ..settings.clone()
            }),
        };
        ModelConfig { provider, small: None, ..self.clone() }
    }

    /// Builds the models turns are routed between.
    pub async fn build_routes(&self, aws: &aws_config::SdkConfig) -> Result<Routes, ConfigError> {
        let main = NamedModel { model: self.build(aws).await?, name: self.model_name() };
        let small = match &self.small {
            None => None,
            Some(small) => {
                let model = self.small_config(small).build(aws).await?;
                Some((NamedModel { model, name: small.model.clone() }, small.rule))
            }
        };
        Ok(Routes { main, small })
    }

    /// The provider and models, for the log (never the key).
    pub fn describe(&self) -> String {
        let main = match &self.provider {
            Provider::Demo(_) => "demo".to_owned(),
            Provider::OpenAi { settings, .. } => {
                format!("openai {} at {}", settings.model, settings.base_url)
            }
            Provider::Bedrock(settings) => format!("bedrock {}", settings.model),
        };
        match &self.small {
            Some(small) => {
                format!("{main}; messages up to {} characters to {}", small.rule.max_chars, small.model)
            }
            None => main,
        }
    }

    /// Builds the model: fetches the API key from its secret when one is named.
    pub async fn build(&self, aws: &aws_config::SdkConfig) -> Result<Model, ConfigError> {
        let provider: Arc<dyn ModelProvider> = match &self.provider {
            Provider::Demo(demo) => Arc::new(demo.clone()),
            Provider::OpenAi { settings, api_key_secret: None } => Arc::new(
                OpenAi::new(settings.clone()).map_err(|e| invalid("OPENAI_BASE_URL", e.to_string()))?,
            ),
            Provider::OpenAi { settings, api_key_secret: Some(arn) } => {
                let client = aws_sdk_secretsmanager::Client::new(aws);
                let settings =
                    OpenAiSettings { api_key: Some(fetch_secret(&client, arn).await?), ..settings.clone() };
                let provider =
                    OpenAi::new(settings).map_err(|e| invalid("OPENAI_BASE_URL", e.to_string()))?;
                // A rejected key is reloaded from the secret, so a rotation needs no restart.
                let arn = arn.clone();
                Arc::new(provider.with_key_loader(Arc::new(move || {
                    let (client, arn) = (client.clone(), arn.clone());
                    Box::pin(async move { fetch_secret(&client, &arn).await })
                })))
            }
            Provider::Bedrock(settings) => Arc::new(Bedrock::new(aws, settings.clone())),
        };
        Ok(Model::new(provider, self.retry))
    }
}

/// The secret's string value, trimmed.
async fn fetch_secret(client: &aws_sdk_secretsmanager::Client, arn: &str) -> Result<String, ConfigError> {
    let output = client.get_secret_value().secret_id(arn).send().await.map_err(|e| {
        use aws_sdk_secretsmanager::error::ProvideErrorMetadata;
        tracing::error!(code = e.code().unwrap_or(""), message = e.message().unwrap_or(""), error = %e, "cannot read the API key secret");
        invalid("OPENAI_API_KEY_SECRET_ARN", "names a secret this function cannot read (see the log)")
    })?;
    match output.secret_string().map(str::trim) {
        Some(key) if !key.is_empty() => Ok(key.to_owned()),
        _ => Err(invalid("OPENAI_API_KEY_SECRET_ARN", "names a secret with no string value")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn read(pairs: &[(&str, &str)]) -> Result<ModelConfig, ConfigError> {
        let map: HashMap<String, String> =
            pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        ModelConfig::from_env(&Env::from_fn(move |name| map.get(name).cloned()), false)
    }

    #[test]
    fn the_demo_needs_nothing() {
        assert!(matches!(read(&[]).unwrap().provider, Provider::Demo(_)));
    }

    #[test]
    fn missing_and_invalid_settings_name_the_variable() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[("LLM_PROVIDER", "gpt")], "LLM_PROVIDER"),
            (&[("LLM_PROVIDER", "openai")], "LLM_MODEL"),
            (&[("LLM_PROVIDER", "bedrock")], "LLM_MODEL"),
            (
                &[("LLM_PROVIDER", "openai"), ("LLM_MODEL", "m"), ("OPENAI_BASE_URL", "api.openai.com")],
                "OPENAI_BASE_URL",
            ),
            (&[("LLM_TEMPERATURE", "hot")], "LLM_TEMPERATURE"),
            (
                &[("LLM_PROVIDER", "bedrock"), ("LLM_MODEL", "m"), ("BEDROCK_CACHE_POINTS", "yes")],
                "BEDROCK_CACHE_POINTS",
            ),
            (
                &[("LLM_PROVIDER", "openai"), ("LLM_MODEL", "m"), ("OPENAI_MAX_TOKENS_FIELD", "max")],
                "OPENAI_MAX_TOKENS_FIELD",
            ),
            (&[("LLM_TEMPERATURE", "3")], "LLM_TEMPERATURE"),
            (&[("LLM_MAX_TOKENS", "0")], "LLM_MAX_TOKENS"),
            (&[("MEMORY_MAX_TOKENS", "lots")], "MEMORY_MAX_TOKENS"),
            (&[("MEMORY_MAX_TURNS", "0")], "MEMORY_MAX_TURNS"),
            (
                &[
                    ("LLM_PROVIDER", "openai"),
                    ("LLM_MODEL", "m"),
                    ("OPENAI_API_KEY", "sk-secret"),
                    ("OPENAI_API_KEY_SECRET_ARN", "arn"),
                ],
                "OPENAI_API_KEY_SECRET_ARN",
            ),
        ];
        for (pairs, variable) in cases {
            let err = read(pairs).unwrap_err();
            assert_eq!(err.variable, *variable, "{pairs:?}");
            assert!(!err.to_string().contains("sk-secret"));
        }
    }

    #[test]
    fn openai_settings_are_read_and_the_key_stays_out_of_debug_output() {
        let config = read(&[
            ("LLM_PROVIDER", "openai"),
            ("LLM_MODEL", "gpt-4o-mini"),
            ("OPENAI_API_KEY", "sk-secret"),
            ("LLM_TEMPERATURE", "0.2"),
            ("LLM_SYSTEM_PROMPT", "Be brief."),
        ])
        .unwrap();
        let Provider::OpenAi { settings, .. } = &config.provider else { panic!("not openai") };
        assert_eq!(settings.base_url, "https://api.openai.com/v1");
        assert_eq!(settings.temperature, Some(0.2));
        assert_eq!(config.system_prompt.as_deref(), Some("Be brief."));
        assert!(!format!("{config:?}").contains("sk-secret"));
        assert!(!config.describe().contains("sk-secret"));
        assert!(config.small.is_none(), "no routing unless a small model is named");
    }

    #[test]
    fn bedrock_cache_points_default_to_auto_which_knows_the_caching_models() {
        let config = read(&[
            ("LLM_PROVIDER", "bedrock"),
            ("LLM_MODEL", "us.anthropic.claude-3-7-sonnet-20250219-v1:0"),
        ])
        .unwrap();
        let Provider::Bedrock(settings) = &config.provider else { panic!("not bedrock") };
        assert_eq!(settings.cache_points, CachePoints::Auto);
        assert_eq!(settings.cache_points.minimum_tokens(&settings.model), Some(1024));
        assert_eq!(CachePoints::Auto.minimum_tokens("anthropic.claude-3-5-haiku-20241022-v1:0"), Some(2048));
        assert_eq!(CachePoints::Auto.minimum_tokens("amazon.nova-lite-v1:0"), Some(1000));
        assert_eq!(CachePoints::Auto.minimum_tokens("anthropic.claude-3-haiku-20240307-v1:0"), None);
        assert_eq!(CachePoints::Auto.minimum_tokens("meta.llama3-1-70b-instruct-v1:0"), None);
        assert_eq!(CachePoints::On.minimum_tokens("meta.llama3-1-70b-instruct-v1:0"), Some(1024));
        assert_eq!(CachePoints::Off.minimum_tokens("anthropic.claude-opus-4-20250514-v1:0"), None);
        let config =
            read(&[("LLM_PROVIDER", "bedrock"), ("LLM_MODEL", "m"), ("BEDROCK_CACHE_POINTS", "off")])
                .unwrap();
        let Provider::Bedrock(settings) = &config.provider else { panic!("not bedrock") };
        assert_eq!(settings.cache_points, CachePoints::Off);
    }

    #[test]
    fn a_small_model_routes_short_messages_with_its_own_reply_length() {
        let config = read(&[
            ("LLM_PROVIDER", "openai"),
            ("LLM_MODEL", "big-model"),
            ("LLM_MAX_TOKENS", "2048"),
            ("ROUTE_SMALL_MODEL", "small-model"),
            ("ROUTE_SMALL_MAX_CHARS", "80"),
            ("ROUTE_SMALL_MAX_TOKENS", "256"),
        ])
        .unwrap();
        let small = config.small.clone().expect("a small model");
        assert_eq!((small.model.as_str(), small.max_tokens, small.rule.max_chars), ("small-model", 256, 80));
        let Provider::OpenAi { settings, .. } = &config.small_config(&small).provider else { panic!() };
        assert_eq!((settings.model.as_str(), settings.max_tokens), ("small-model", 256));
        assert_eq!(config.model_name(), "big-model");
        assert!(config.describe().contains("up to 80 characters to small-model"), "{}", config.describe());
        let err = read(&[("ROUTE_SMALL_MODEL", "s"), ("ROUTE_SMALL_MAX_TOKENS", "0")]).unwrap_err();
        assert_eq!(err.variable, "ROUTE_SMALL_MAX_TOKENS");
    }
}
