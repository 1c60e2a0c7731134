//! The alarms see what users feel. With the OpenAI-compatible fake model failing every request,
//! turns end in `error` while every function succeeds, and the functions' own log lines carry
//! EMF metrics for them: the template's failed-turn alarm, its metric math applied to those
//! figures, is in ALARM. With the model healthy, the same alarm is not.

use crate::harness::*;
use chat_local::fake_llm;
use chat_runtime::metrics::{self, name};
use serde_norway::Value;
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const TURNS: usize = 6;

/// The fake model as an OpenAI-compatible server, tried once per turn; its own stack, so that
/// the metrics in its log are this test's alone.
const ALARMS: Config = Config {
    name: "alarms",
    configure: |settings, model| {
        settings.function_env.extend(env(&[
            ("LLM_PROVIDER", "openai"),
            ("LLM_MODEL", "fake-model"),
            ("OPENAI_BASE_URL", &format!("{model}/v1")),
            ("LLM_MAX_ATTEMPTS", "1"),
            ("TOOLS", "none"),
        ]));
    },
};

#[tokio::test]
async fn the_failed_turn_alarm_fires_on_a_model_outage_and_not_on_a_healthy_model() {
    let info = app(&ALARMS);
    let (server, log) = (info.model, &info.log);
    let alarm = FailedTurnsAlarm::from_template();

    // The outage: every turn ends in error.
    server.script(vec![fake_llm::status(500, &[], r#"{"error": {"message": "the model is down"}}"#)]);
    let from = log_length(log);
    run_turns(&info.api, "error").await;
    let outage = emitted_since(log, from, name::TURNS_FAILED, TURNS).await;
    assert_eq!(outage.get(name::TURNS_FAILED), Some(&(TURNS as f64)), "{outage:?}");
    assert_eq!(outage.get(name::TURNS_COMMITTED), None);
    assert!(outage.get(name::MODEL_ERRORS).is_some_and(|n| *n >= TURNS as f64), "{outage:?}");
    let (ratio, firing) = alarm.evaluate(&outage);
    assert!(firing, "the failed-turn ratio was {ratio}; the alarm should be in ALARM");

    // The model is back: the same alarm, on the next window's figures, is OK.
    server.script(vec![fake_llm::openai_reply(&["All", " good"], Duration::from_millis(5))]);
    let from = log_length(log);
    run_turns(&info.api, "ai_committed").await;
    let healthy = emitted_since(log, from, name::TURNS_COMMITTED, TURNS).await;
    assert_eq!(healthy.get(name::TURNS_COMMITTED), Some(&(TURNS as f64)), "{healthy:?}");
    assert_eq!(healthy.get(name::TURNS_FAILED), None);
    assert!(healthy.contains_key(name::TIME_TO_FIRST_TOKEN), "first tokens are timed: {healthy:?}");
    let (ratio, firing) = alarm.evaluate(&healthy);
    assert!(!firing, "the failed-turn ratio was {ratio}; the alarm should be OK");
}

/// Sends one message in each of `TURNS` new sessions and waits for each to reach `state`.
async fn run_turns(api: &str, state: &str) {
    for _ in 0..TURNS {
        let sent = send_text(api, &user(), "How are you?", None).await;
        assert_eq!(sent.status, 202, "{}", sent.body);
        let id = sent.body["session_id"].as_str().unwrap().to_owned();
        wait_for_state(api, &id, Duration::from_secs(30), |s| s == state).await;
    }
}

fn log_length(log: &PathBuf) -> usize {
    std::fs::read(log).map_or(0, |bytes| bytes.len())
}

/// The sums of every metric the functions emitted (EMF lines of the stack's log after byte
/// `from`), once `wanted` has reached `at_least`: a function logs a turn's metrics just after
/// the write that ended it.
async fn emitted_since(log: &PathBuf, from: usize, wanted: &str, at_least: usize) -> HashMap<String, f64> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let bytes = std::fs::read(log).expect("the stack's log");
        let mut sums: HashMap<String, f64> = HashMap::new();
        for line in String::from_utf8_lossy(&bytes[from.min(bytes.len())..]).lines() {
            if let Some(emitted) = metrics::parse(line) {
                assert!(emitted.namespace.starts_with("chat-fsm/"), "{line}");
                assert_eq!(emitted.dimensions.get("Service").map(String::as_str), Some("chat"), "{line}");
                *sums.entry(emitted.name).or_default() += emitted.values.iter().sum::<f64>();
            }
        }
        if sums.get(wanted).is_some_and(|n| *n >= at_least as f64) || Instant::now() > deadline {
            return sums;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `FailedTurnsAlarm` as template.yaml defines it: its metrics by id, its expression, its
/// threshold (the parameter's default) and its comparison.
struct FailedTurnsAlarm {
    metrics: HashMap<String, String>,
    expression: String,
    threshold: f64,
    comparison: String,
}

impl FailedTurnsAlarm {
    fn from_template() -> FailedTurnsAlarm {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../template.yaml");
        let template: Value = serde_norway::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let alarm = &template["Resources"]["FailedTurnsAlarm"]["Properties"];
        let mut metrics = HashMap::new();
        let mut expression = None;
        for metric in alarm["Metrics"].as_sequence().expect("metric math") {
            let id = metric["Id"].as_str().unwrap().to_owned();
            match metric["Expression"].as_str() {
                Some(text) => expression = Some(text.to_owned()),
                None => {
                    let stat = &metric["MetricStat"];
                    assert_eq!(stat["Stat"], "Sum", "{id}");
                    metrics.insert(id, stat["Metric"]["MetricName"].as_str().unwrap().to_owned());
                }
            }
        }
        let threshold = match &alarm["Threshold"] {
            Value::Tagged(reference) => {
                let parameter = reference.value.as_str().unwrap();
                template["Parameters"][parameter]["Default"].as_f64().unwrap()
            }
            other => other.as_f64().unwrap(),
        };
        FailedTurnsAlarm {
            metrics,
            expression: expression.expect("an expression"),
            threshold,
            comparison: alarm["ComparisonOperator"].as_str().unwrap().to_owned(),
        }
    }

    /// The expression's value on `sums` (each id's metric summed over the window; a metric with
    /// no data has none), and whether the alarm is in ALARM.
    fn evaluate(&self, sums: &HashMap<String, f64>) -> (f64, bool) {
        let values: HashMap<String, f64> =
            self.metrics.iter().filter_map(|(id, name)| Some((id.clone(), *sums.get(name)?))).collect();
        let value =
            chat_local::alarm_math::evaluate(&self.expression, &values).expect("the expression evaluates");
        let firing = match self.comparison.as_str() {
            "GreaterThanThreshold" => value > self.threshold,
            "GreaterThanOrEqualToThreshold" => value >= self.threshold,
            other => panic!("comparison {other} is not handled here"),
        };
        (value, firing)
    }
}
