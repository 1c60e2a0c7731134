//! `template.yaml` and the code must not drift: the table is the one `table.rs` defines (which
//! local bootstrap creates), the queue is the one the local stack creates, every function is
//! built by cargo-lambda for arm64, and each policy grants only actions its function's code uses.

use chat_core::table;
use policies::{logical, strings, template};
use serde_norway::Value;
use std::collections::BTreeSet;

#[path = "e2e/policies.rs"]
mod policies;

fn resource<'a>(template: &'a Value, name: &str) -> &'a Value {
    &template["Resources"][name]
}

#[test]
fn the_table_is_the_one_table_rs_defines() {
    let template = template();
    let table = &resource(&template, "Table")["Properties"];
    assert_eq!(table["BillingMode"], "PAY_PER_REQUEST");
    let keys: Vec<(String, String)> = table["KeySchema"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|k| (k["AttributeName"].as_str().unwrap().to_owned(), k["KeyType"].as_str().unwrap().to_owned()))
        .collect();
    assert_eq!(
        keys,
        vec![(table::PK.to_owned(), "HASH".to_owned()), (table::SK.to_owned(), "RANGE".to_owned())]
    );
    let attributes: BTreeSet<(String, String)> = table["AttributeDefinitions"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| {
            (a["AttributeName"].as_str().unwrap().to_owned(), a["AttributeType"].as_str().unwrap().to_owned())
        })
        .collect();
    let expected: BTreeSet<(String, String)> =
        table::KEY_ATTRIBUTES.iter().map(|(a, kind)| ((*a).to_owned(), (*kind).to_owned())).collect();
    assert_eq!(attributes, expected);
    let indexes = table["GlobalSecondaryIndexes"].as_sequence().unwrap();
    assert_eq!(indexes.len(), table::INDEXES.len());
    for def in &table::INDEXES {
        let index = indexes
            .iter()
            .find(|i| i["IndexName"] == def.name)
            .unwrap_or_else(|| panic!("index {} is missing", def.name));
        let schema = index["KeySchema"].as_sequence().unwrap();
        assert_eq!(
            (schema[0]["AttributeName"].as_str(), schema[0]["KeyType"].as_str()),
            (Some(def.hash_key), Some("HASH"))
        );
        assert_eq!(
            (schema[1]["AttributeName"].as_str(), schema[1]["KeyType"].as_str()),
            (Some(def.range_key), Some("RANGE"))
        );
        assert_eq!(index["Projection"]["ProjectionType"].as_str(), Some(def.projection));
        assert_eq!(strings(&index["Projection"]["NonKeyAttributes"]), def.non_key_attributes.to_vec());
    }
    assert_eq!(table["TimeToLiveSpecification"]["AttributeName"].as_str(), Some(table::TTL_ATTRIBUTE));
    assert_eq!(table["TimeToLiveSpecification"]["Enabled"], true);
    // The stream the sweeper counts expired sessions from: the owner is in the old image.
    assert_eq!(table["StreamSpecification"]["StreamViewType"], "OLD_IMAGE");
    let expired = &resource(&template, "SweeperFunction")["Properties"]["Events"]["SessionsExpired"];
    assert_eq!(expired["Type"], "DynamoDB");
    let pattern: serde_json::Value = serde_json::from_str(
        expired["Properties"]["FilterCriteria"]["Filters"][0]["Pattern"].as_str().unwrap(),
    )
    .unwrap();
    assert_eq!(pattern["eventName"], serde_json::json!(["REMOVE"]));
    assert_eq!(pattern["userIdentity"]["principalId"], serde_json::json!(["dynamodb.amazonaws.com"]));
    assert_eq!(pattern["dynamodb"]["Keys"]["sk"]["S"], serde_json::json!([table::SESSION_SK]));
    assert_eq!(table["PointInTimeRecoverySpecification"]["PointInTimeRecoveryEnabled"], true);
}

#[test]
fn the_queue_matches_the_local_stack_and_outlasts_the_generator() {
    let template = template();
    let local = chat_local::StackSettings::new(".");
    let queue = &resource(&template, "TurnsQueue")["Properties"];
    assert_eq!(queue["RedrivePolicy"]["maxReceiveCount"].as_u64(), Some(u64::from(local.max_receive_count)));
    assert!(local.max_receive_count >= 5);
    let generator_timeout =
        resource(&template, "GeneratorFunction")["Properties"]["Timeout"].as_u64().unwrap();
    assert!(
        queue["VisibilityTimeout"].as_u64().unwrap() >= 6 * generator_timeout,
        "visibility >= 6x the generator timeout"
    );
    let event = &resource(&template, "GeneratorFunction")["Properties"]["Events"]["Turns"];
    assert_eq!(event["Type"], "SQS");
    assert_eq!(strings(&event["Properties"]["FunctionResponseTypes"]), ["ReportBatchItemFailures"]);
}

#[test]
fn every_function_is_built_by_cargo_lambda_for_arm64() {
    let template = template();
    let globals = &template["Globals"]["Function"];
    assert_eq!(globals["Runtime"], "provided.al2023");
    assert_eq!(strings(&globals["Architectures"]), ["arm64"]);
    for name in chat_local::FUNCTIONS {
        let logical = logical(name);
        let function = resource(&template, &logical);
        assert_eq!(function["Type"], "AWS::Serverless::Function", "{logical}");
        assert_eq!(function["Metadata"]["BuildMethod"], "rust-cargolambda");
        assert_eq!(function["Metadata"]["BuildProperties"]["Binary"].as_str(), Some(name));
    }
    let stream = &resource(&template, "StreamFunction")["Properties"];
    assert_eq!(stream["FunctionUrlConfig"]["InvokeMode"], "RESPONSE_STREAM");
    let stream_timeout_ms = stream["Timeout"].as_u64().unwrap() * 1000;
    let stream_limit: u64 =
        stream["Environment"]["Variables"]["STREAM_MAX_DURATION_MS"].as_str().unwrap().parse().unwrap();
    assert!(
        stream_limit + 60_000 <= stream_timeout_ms,
        "the stream closes itself well before the Lambda limit"
    );
}

/// The AWS actions each function's code performs, from the store and queue operations it calls.
/// TransactWriteItems is authorised per item (Put, Update, Delete, ConditionCheck →
/// ConditionCheckItem), and BatchGet/BatchWrite by name. What the functions actually send, as
/// the local stack records it, is held against the same policies end to end (`tests/e2e/iam.rs`).
#[test]
fn each_policy_grants_exactly_the_actions_its_function_uses() {
    let expected: [(&str, &[&str]); 4] = [
        (
            "IngestFunction",
            &[
                "dynamodb:BatchGetItem",
                "dynamodb:BatchWriteItem",
                "dynamodb:ConditionCheckItem",
                "dynamodb:DeleteItem",
                "dynamodb:GetItem",
                "dynamodb:PutItem",
                "dynamodb:Query",
                "dynamodb:UpdateItem",
                "sqs:SendMessage",
            ],
        ),
        (
            "GeneratorFunction",
            &[
                "dynamodb:BatchWriteItem",
                "dynamodb:GetItem",
                "dynamodb:PutItem",
                "dynamodb:Query",
                "dynamodb:UpdateItem",
            ],
        ),
        ("StreamFunction", &["dynamodb:GetItem", "dynamodb:Query", "dynamodb:UpdateItem"]),
        (
            "SweeperFunction",
            &[
                "dynamodb:BatchGetItem",
                "dynamodb:BatchWriteItem",
                "dynamodb:GetItem",
                "dynamodb:PutItem",
                "dynamodb:Query",
                "dynamodb:UpdateItem",
                "sqs:SendMessage",
            ],
        ),
    ];
    // Granted only under a condition: (function, condition, actions).
    let conditional: [(&str, &str, &[&str]); 2] = [
        ("GeneratorFunction", "IsBedrock", &["bedrock:InvokeModelWithResponseStream"]),
        ("GeneratorFunction", "HasApiKeySecret", &["secretsmanager:GetSecretValue"]),
    ];
    let template = template();
    for (function, actions) in expected {
        let grants = policies::grants(&template, function);
        for grant in &grants {
            assert!(!grant.resources.is_empty(), "{function}: {} names its resources", grant.action);
            assert!(
                !grant.resources.iter().any(|r| r == "*"),
                "{function}: {} on every resource",
                grant.action
            );
        }
        let granted: BTreeSet<String> =
            grants.iter().filter(|g| g.condition.is_none()).map(|g| g.action.clone()).collect();
        let expected: BTreeSet<String> = actions.iter().map(|a| (*a).to_owned()).collect();
        assert_eq!(granted, expected, "{function}");
        let conditions: BTreeSet<&str> = grants.iter().filter_map(|g| g.condition.as_deref()).collect();
        for condition in conditions {
            let (_, _, actions) = conditional
                .iter()
                .find(|(f, c, _)| *f == function && *c == condition)
                .unwrap_or_else(|| panic!("{function}: unexpected condition {condition}"));
            let expected: BTreeSet<String> = actions.iter().map(|a| (*a).to_owned()).collect();
            let granted: BTreeSet<String> = grants
                .iter()
                .filter(|g| g.condition.as_deref() == Some(condition))
                .map(|g| g.action.clone())
                .collect();
            assert_eq!(granted, expected, "{function} if {condition}");
        }
    }
}

/// Bedrock's policy exists only when it is the provider, and the key's secret only for openai.
#[test]
fn model_conditions_follow_the_provider() {
    let template = template();
    let conditions = &template["Conditions"];
    let text = |v: &Value| serde_norway::to_string(v).unwrap();
    assert!(
        text(&conditions["IsBedrock"]).contains("LlmProvider")
            && text(&conditions["IsBedrock"]).contains("bedrock")
    );
    let secret = text(&conditions["HasApiKeySecret"]);
    assert!(secret.contains("openai") && secret.contains("OpenAiApiKeySecretArn"), "{secret}");
    let allowed = strings(&template["Parameters"]["LlmProvider"]["AllowedValues"]);
    assert_eq!(allowed, ["demo", "openai", "bedrock"]);
    let vars = &resource(&template, "GeneratorFunction")["Properties"]["Environment"]["Variables"];
    assert!(vars.get("OPENAI_API_KEY").is_none(), "the key never sits in the environment");
}

/// Read by a library rather than by name in our code: `RUST_LOG` by tracing's `EnvFilter`.
const READ_BY_LIBRARIES: [&str; 1] = ["RUST_LOG"];

/// Every environment variable the template sets is one its function's code reads.
#[test]
fn every_environment_variable_is_read_by_its_function() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let sources = |dir: &str| -> String {
        let mut text = String::new();
        let mut dirs = vec![std::path::PathBuf::from(root).join(dir)];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).unwrap().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    dirs.push(path);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    text.push_str(&std::fs::read_to_string(&path).unwrap());
                }
            }
        }
        text
    };
    let shared = sources("shared/chat-core/src")
        + &sources("shared/chat-auth/src")
        + &sources("shared/chat-runtime/src");
    let template = template();
    let globals = &template["Globals"]["Function"]["Environment"]["Variables"];
    for name in chat_local::FUNCTIONS {
        let logical = logical(name);
        let code = sources(&format!("functions/{name}/src")) + &shared;
        let own = &resource(&template, &logical)["Properties"]["Environment"]["Variables"];
        for vars in [own, globals] {
            for var in vars.as_mapping().into_iter().flat_map(|m| m.keys()) {
                let var = var.as_str().unwrap();
                if READ_BY_LIBRARIES.contains(&var) {
                    continue;
                }
                assert!(
                    code.contains(&format!("\"{var}\"")),
                    "{logical} sets {var}, which its code never reads"
                );
            }
        }
    }
}

/// Identity is one choice: `AuthMode` sets both Function URLs' auth (public with token checks in
/// the code for jwt, AWS_IAM for iam) and the functions' `AUTH_MODE`, never one without the other.
#[test]
fn auth_mode_sets_the_function_urls_and_the_functions_together() {
    let template = template();
    let allowed = strings(&template["Parameters"]["AuthMode"]["AllowedValues"]);
    assert_eq!(allowed, ["jwt", "iam"], "none is for the local stack only");
    assert_eq!(template["Parameters"]["IamAllowedCallers"]["Type"], "CommaDelimitedList");
    assert_eq!(template["Parameters"]["IamAllowedCallers"]["Default"], "");
    for logical in ["IngestFunction", "StreamFunction"] {
        let properties = &resource(&template, logical)["Properties"];
        let url_auth = format!("{:?}", properties["FunctionUrlConfig"]["AuthType"]);
        assert!(
            url_auth.contains("IsJwt") && url_auth.contains("NONE") && url_auth.contains("AWS_IAM"),
            "{logical}: {url_auth}"
        );
        let variables = &properties["Environment"]["Variables"];
        assert_eq!(format!("{:?}", variables["AUTH_MODE"]), format!("{:?}", resource_ref("AuthMode")));
        for var in ["JWT_ISSUER", "JWT_AUDIENCE"] {
            assert!(format!("{:?}", variables[var]).contains("IsJwt"), "{logical} sets {var} only for jwt");
        }
        // iam: the principals that may call, from the parameter.
        let allowed = format!("{:?}", variables["IAM_ALLOWED_CALLERS"]);
        assert!(allowed.contains("IsJwt") && allowed.contains("IamAllowedCallers"), "{logical}: {allowed}");
    }
}

fn resource_ref(name: &str) -> Value {
    serde_norway::from_str(&format!("!Ref {name}")).unwrap()
}

/// Reserved concurrency is off by default, so a first deploy fits any account (AWS keeps 100 of
/// an account's concurrency unreserved, and new accounts often have 10 to 50): each function's
/// reservation is a parameter whose default, 0, leaves `ReservedConcurrentExecutions` out. The
/// generator's queue never polls beyond its reservation, and without one has a cap of its own
/// (an SQS event source's maximum concurrency is 2 to 1000).
#[test]
fn reserved_concurrency_is_off_by_default_and_the_queue_always_has_a_valid_cap() {
    let template = template();
    for name in chat_local::FUNCTIONS {
        let capitalised = format!("{}{}", name[..1].to_uppercase(), &name[1..]);
        let parameter = format!("{capitalised}ReservedConcurrency");
        let condition = format!("Reserve{capitalised}");
        let reserved = &resource(&template, &format!("{capitalised}Function"))["Properties"]
            ["ReservedConcurrentExecutions"];
        let expected: Value =
            serde_norway::from_str(&format!("!If [{condition}, !Ref {parameter}, !Ref AWS::NoValue]"))
                .unwrap();
        assert_eq!(reserved, &expected, "{name}");
        let when: Value = serde_norway::from_str(&format!("!Not [!Equals [!Ref {parameter}, 0]]")).unwrap();
        assert_eq!(template["Conditions"][condition.as_str()], when, "{condition}");
        assert_eq!(template["Parameters"][parameter.as_str()]["Default"].as_u64(), Some(0), "{parameter}");
    }
    let turns = &resource(&template, "GeneratorFunction")["Properties"]["Events"]["Turns"]["Properties"];
    let cap: Value = serde_norway::from_str(
        "!If [ReserveGenerator, !Ref GeneratorReservedConcurrency, !Ref GeneratorMaxConcurrency]",
    )
    .unwrap();
    assert_eq!(turns["ScalingConfig"]["MaximumConcurrency"], cap);
    let own_cap = &template["Parameters"]["GeneratorMaxConcurrency"];
    let bounds = (own_cap["MinValue"].as_u64().unwrap(), own_cap["MaxValue"].as_u64().unwrap());
    assert!(bounds.0 >= 2 && bounds.1 <= 1000, "GeneratorMaxConcurrency {bounds:?}");
    assert!((bounds.0..=bounds.1).contains(&own_cap["Default"].as_u64().unwrap()));
    let rule = format!("{:?}", template["Rules"]["GeneratorReserveFeedsItsQueue"]);
    assert!(rule.contains("GeneratorReservedConcurrency"), "a reservation of 1 is refused: {rule}");
}

/// `samconfig.toml`: the sections and `key = value` lines it is written in. (It is read as TOML
/// proper, by the same reader as SAM's, in `infra/test_preflight.py`, which `make test` runs.)
fn samconfig() -> std::collections::BTreeMap<String, std::collections::BTreeMap<String, String>> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../samconfig.toml");
    let text = std::fs::read_to_string(path).expect("samconfig.toml is committed");
    let mut sections = std::collections::BTreeMap::new();
    let mut section = String::new();
    for (number, line) in text.lines().enumerate().map(|(i, l)| (i + 1, l.trim())) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_owned();
            continue;
        }
        let (key, value) =
            line.split_once(" = ").unwrap_or_else(|| panic!("samconfig.toml:{number}: {line}"));
        let value = match value.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
            Some(text) => {
                assert!(!text.contains(['"', '\\']), "samconfig.toml:{number}: plain strings only");
                text.to_owned()
            }
            None => {
                assert!(
                    value == "true" || value == "false" || value.parse::<f64>().is_ok(),
                    "samconfig.toml:{number}: {value}"
                );
                value.to_owned()
            }
        };
        sections
            .entry(section.clone())
            .or_insert_with(std::collections::BTreeMap::new)
            .insert(key.to_owned(), value);
    }
    sections
}

/// `make deploy` (ENV=default) and `make deploy ENV=prod` deploy without a question: each
/// environment names its own stack, lets SAM make its artifact bucket, acknowledges the IAM
/// roles and skips the change-set prompt. Only prod reserves concurrency (and the reservations
/// are ones the template accepts); every parameter either sets is one the template has.
#[test]
fn samconfig_deploys_default_and_prod_without_questions() {
    let template = template();
    let config = samconfig();
    let mut stacks = BTreeSet::new();
    for env in ["default", "prod"] {
        let global = &config[&format!("{env}.global.parameters")];
        let deploy = &config[&format!("{env}.deploy.parameters")];
        assert!(stacks.insert(global["stack_name"].clone()), "{env}: a stack of its own");
        assert_eq!(deploy["confirm_changeset"], "false", "{env}");
        assert_eq!(deploy["resolve_s3"], "true", "{env}");
        assert_eq!(deploy["capabilities"], "CAPABILITY_IAM", "{env}");
        let overrides: std::collections::BTreeMap<&str, &str> = deploy["parameter_overrides"]
            .split_whitespace()
            .map(|pair| pair.split_once('=').unwrap_or_else(|| panic!("{env}: {pair}")))
            .collect();
        for name in overrides.keys() {
            assert!(
                template["Parameters"].get(*name).is_some(),
                "{env} sets {name}, which the template lacks"
            );
        }
        for name in chat_local::FUNCTIONS {
            let parameter = format!("{}{}ReservedConcurrency", name[..1].to_uppercase(), &name[1..]);
            let reserved: u64 = overrides[parameter.as_str()].parse().unwrap();
            match env {
                "default" => assert_eq!(reserved, 0, "{env}: {parameter}"),
                // One sweeper instance would be shared by its schedule and its table-stream
                // pollers, which would throttle each other: it runs unreserved.
                _ if name == "sweeper" => assert_eq!(reserved, 0, "{env}: {parameter}"),
                _ => assert!(reserved >= 1, "{env}: {parameter}"),
            }
            let min = template["Parameters"][parameter.as_str()]["MinValue"].as_u64().unwrap();
            assert!(reserved >= min, "{env}: {parameter}");
            if name == "generator" {
                assert_ne!(reserved, 1, "{env}: an SQS event source's maximum concurrency is at least 2");
            }
        }
    }
}

/// What `sam build` writes stays out of git.
#[test]
fn sam_build_output_is_ignored() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../.gitignore");
    let ignored = std::fs::read_to_string(path).unwrap();
    assert!(ignored.lines().any(|l| l.trim() == "/.aws-sam/" || l.trim() == ".aws-sam/"), "{ignored}");
}

/// CORS comes from a configured origin list, empty by default. The one `*` is the stream's in
/// jwt mode: a stream needs its bearer token and no ambient credential rides along, and pinning
/// it to ingest's origin would be a dependency cycle (ingest names the stream's URL).
#[test]
fn cors_allows_only_configured_origins_and_a_stream_only_with_its_token() {
    let template = template();
    let origins = &template["Parameters"]["AllowedOrigins"];
    assert_eq!(origins["Default"].as_str(), Some(""));
    let cors =
        |logical: &str| resource(&template, logical)["Properties"]["FunctionUrlConfig"]["Cors"].clone();
    let ingest = format!("{:?}", cors("IngestFunction"));
    assert!(ingest.contains("HasOrigins") && ingest.contains("AllowedOrigins"), "{ingest}");
    assert!(!ingest.contains("\"*\"") && !ingest.contains("StreamFunctionUrl"), "{ingest}");
    let Value::Tagged(stream) = cors("StreamFunction") else { panic!("the stream's CORS is an !If") };
    let branches = stream.value.as_sequence().unwrap();
    assert_eq!((stream.tag.to_string().as_str(), branches[0].as_str()), ("!If", Some("IsJwt")));
    assert_eq!(strings(&branches[1]["AllowOrigins"]), ["*"], "jwt: any page, with its token");
    assert_eq!(branches[1]["AllowCredentials"], false, "never with credentials");
    let iam = format!("{:?}", branches[2]);
    assert!(iam.contains("HasOrigins") && iam.contains("AllowedOrigins") && !iam.contains("\"*\""), "{iam}");
}

/// The chat page is served by ingest, so its API is the origin that served it; its address
/// names nothing else (no `?api=`, which once let a link send the token anywhere).
#[test]
fn the_chat_page_is_ingests_own_url_with_nothing_added() {
    let template = template();
    let page = &template["Outputs"]["ChatPageUrl"]["Value"];
    assert_eq!(page, &serde_norway::from_str::<Value>("!GetAtt IngestFunctionUrl.FunctionUrl").unwrap());
    assert!(!format!("{page:?}").contains("?api="), "{page:?}");
}

/// The Cognito pool the stack creates admits only users an administrator creates, unless
/// `SelfSignUp` says otherwise (its app client's id is public), and never tells a caller whether
/// an account exists.
#[test]
fn the_user_pool_is_admin_only_by_default_and_hides_which_users_exist() {
    let template = template();
    let sign_up = &template["Parameters"]["SelfSignUp"];
    assert_eq!(
        (sign_up["Default"].as_str(), strings(&sign_up["AllowedValues"])),
        (Some("false"), vec!["false".to_owned(), "true".to_owned()])
    );
    let condition = serde_norway::to_string(&template["Conditions"]["AllowSelfSignUp"]).unwrap();
    assert!(condition.contains("SelfSignUp") && condition.contains("true"), "{condition}");
    let only_admin =
        &resource(&template, "UserPool")["Properties"]["AdminCreateUserConfig"]["AllowAdminCreateUserOnly"];
    let Value::Tagged(choice) = only_admin else { panic!("follows AllowSelfSignUp: {only_admin:?}") };
    let branches = choice.value.as_sequence().unwrap();
    assert_eq!(choice.tag.to_string(), "!If");
    assert_eq!(
        (branches[0].as_str(), &branches[1], &branches[2]),
        (Some("AllowSelfSignUp"), &Value::Bool(false), &Value::Bool(true))
    );
    let client = &resource(&template, "UserPoolClient")["Properties"];
    assert_eq!(client["PreventUserExistenceErrors"], "ENABLED");
}

/// The spend and fairness limits are parameters that reach the functions that enforce them.
#[test]
fn the_spend_limits_reach_the_functions_that_enforce_them() {
    let template = template();
    for (parameter, variable, functions, default) in [
        ("DailyTokenBudget", "DAILY_TOKEN_BUDGET", &["IngestFunction", "GeneratorFunction"][..], 0),
        ("GlobalTurnsPerMinute", "GLOBAL_TURNS_PER_MINUTE", &["IngestFunction"][..], 0),
        ("MaxStreamsPerTurn", "MAX_STREAMS_PER_TURN", &["StreamFunction"][..], 2),
    ] {
        assert_eq!(template["Parameters"][parameter]["Default"].as_u64(), Some(default), "{parameter}");
        for function in functions {
            let value = &resource(&template, function)["Properties"]["Environment"]["Variables"][variable];
            assert_eq!(value, &resource_ref(parameter), "{function} {variable}");
        }
    }
}

/// Every metric of the stack's own namespace that an alarm or the dashboard names is one the
/// functions emit: a name `chat_runtime::metrics::name` defines, passed by some function's code.
#[test]
fn every_metric_an_alarm_or_the_dashboard_names_is_one_the_code_emits() {
    let template = template();
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let mut named = BTreeSet::new();
    let ours = |namespace: &Value| {
        let text = match namespace {
            Value::Tagged(tagged) => tagged.value.as_str().unwrap_or_default().to_owned(),
            other => other.as_str().unwrap_or_default().to_owned(),
        };
        text.starts_with("chat-fsm/")
    };
    for (_, resource) in template["Resources"].as_mapping().unwrap() {
        if resource["Type"] != "AWS::CloudWatch::Alarm" {
            continue;
        }
        let properties = &resource["Properties"];
        if ours(&properties["Namespace"]) {
            named.insert(properties["MetricName"].as_str().unwrap().to_owned());
        }
        for metric in properties["Metrics"].as_sequence().into_iter().flatten() {
            let metric = &metric["MetricStat"]["Metric"];
            if ours(&metric["Namespace"]) {
                named.insert(metric["MetricName"].as_str().unwrap().to_owned());
            }
        }
    }
    let alarmed = named.len();
    assert!(alarmed >= 3, "the failed-turn alarm reads the functions' own metrics");
    for metric in dashboard_metrics(&template) {
        if metric[0].as_str().is_some_and(|ns| ns.starts_with("chat-fsm/")) {
            named.insert(metric[1].as_str().unwrap().to_owned());
        }
    }
    assert!(named.len() > alarmed, "the dashboard shows more of them");

    // The names the code defines, `IDENT: &str = "Name"` in `mod name`, and where they are used.
    let metrics_rs = std::fs::read_to_string(format!("{root}/shared/chat-runtime/src/metrics.rs")).unwrap();
    let defined: Vec<(String, String)> = metrics_rs
        .lines()
        .filter_map(|line| {
            let rest = line.trim().strip_prefix("pub const ")?;
            let (ident, value) = rest.split_once(": &str = \"")?;
            Some((ident.to_owned(), value.strip_suffix("\";")?.to_owned()))
        })
        .collect();
    // Code outside tests: the functions', and chat-runtime's helpers the functions call
    // (`metrics::error_answer` counts refusals and server errors by code).
    let without_tests = |path: std::path::PathBuf| {
        let text = std::fs::read_to_string(path).unwrap();
        text.split("#[cfg(test)]").next().unwrap_or_default().to_owned()
    };
    let functions: String = chat_local::FUNCTIONS
        .iter()
        .flat_map(|f| rust_files(&format!("{root}/functions/{f}/src")))
        .map(without_tests)
        .collect();
    assert!(functions.contains("metrics::error_answer("), "the HTTP functions count their error answers");
    let code = functions + &without_tests(format!("{root}/shared/chat-runtime/src/metrics.rs").into());
    for name in &named {
        let (ident, _) = defined
            .iter()
            .find(|(_, value)| value == name)
            .unwrap_or_else(|| panic!("{name} is not a metric chat_runtime::metrics defines"));
        assert!(
            code.contains(&format!("name::{ident}")),
            "{name} is named by the template, and no function emits it"
        );
    }
}

fn rust_files(dir: &str) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    let mut dirs = vec![std::path::PathBuf::from(dir)];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    files
}

/// The dashboard's metric entries, `[namespace, name, dimension, value, …]`, with the template's
/// `${…}` references left as they are.
fn dashboard_metrics(template: &Value) -> Vec<Vec<serde_json::Value>> {
    let body = &resource(template, "Dashboard")["Properties"]["DashboardBody"];
    let Value::Tagged(sub) = body else { panic!("the dashboard body is a !Sub string") };
    let body: serde_json::Value =
        serde_json::from_str(sub.value.as_str().unwrap()).expect("the body is JSON");
    body["widgets"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|w| w["properties"]["metrics"].as_array().cloned().unwrap_or_default())
        .filter_map(|m| m.as_array().cloned())
        .filter(|m| m.len() >= 2 && m[0].is_string())
        .collect()
}

/// What users feel is alarmed on, for this stack's resources only, and every alarm notifies the
/// stack's topic (created unless AlarmTopicArn names one); nothing account-wide.
#[test]
fn alarms_watch_this_stacks_resources_and_notify_its_topic() {
    let template = template();
    let alarms: Vec<(&str, &Value)> = template["Resources"]
        .as_mapping()
        .unwrap()
        .iter()
        .filter(|(_, r)| r["Type"] == "AWS::CloudWatch::Alarm")
        .map(|(name, r)| (name.as_str().unwrap(), &r["Properties"]))
        .collect();
    for (name, alarm) in &alarms {
        let actions = format!("{:?}", alarm["AlarmActions"]);
        assert!(actions.contains("AlarmTopicArn") && actions.contains("AlarmTopic"), "{name}: {actions}");
        if alarm["Namespace"] == "AWS/Lambda" {
            assert_eq!(alarm["Dimensions"][0]["Name"], "FunctionName", "{name} is scoped to one function");
        }
    }
    let names: BTreeSet<&str> = alarms.iter().map(|(n, _)| *n).collect();
    for expected in [
        "FailedTurnsAlarm",
        "QueueAgeAlarm",
        "DeadLetterAlarm",
        "ExpiryFailuresAlarm",
        "ExpiryIteratorAgeAlarm",
        "TableThrottlesAlarm",
        "IngestUrlServerErrorsAlarm",
        "StreamUrlServerErrorsAlarm",
    ] {
        assert!(names.contains(expected), "{expected} is missing");
    }
    for function in ["Ingest", "Generator", "Stream", "Sweeper"] {
        for metric in ["Errors", "Throttles"] {
            assert!(names.contains(format!("{function}{metric}Alarm").as_str()), "{function} {metric}");
        }
    }
    assert_eq!(resource(&template, "AlarmTopic")["Condition"], "CreateAlarmTopic");
    // Under the AWS-managed key (alias/aws/sns) CloudWatch cannot publish: its own key, whose
    // policy lets CloudWatch use it.
    let topic_key = format!("{:?}", resource(&template, "AlarmTopic")["Properties"]["KmsMasterKeyId"]);
    assert!(topic_key.contains("AlarmTopicKey") && !topic_key.contains("alias/aws"), "{topic_key}");
    let key = &resource(&template, "AlarmTopicKey");
    assert_eq!(key["Condition"], "CreateAlarmTopic");
    let statements = key["Properties"]["KeyPolicy"]["Statement"].as_sequence().unwrap();
    let cloudwatch = statements
        .iter()
        .find(|s| s["Principal"]["Service"] == "cloudwatch.amazonaws.com")
        .expect("the key lets CloudWatch use it");
    let actions = strings(&cloudwatch["Action"]);
    assert!(
        actions.contains(&"kms:Decrypt".to_owned()) && actions.contains(&"kms:GenerateDataKey*".to_owned())
    );
    assert_eq!(resource(&template, "AlarmEmailSubscription")["Properties"]["Protocol"], "email");
    let globals = &template["Globals"]["Function"]["Environment"]["Variables"];
    assert!(format!("{:?}", globals["METRICS_NAMESPACE"]).contains("chat-fsm/${AWS::StackName}"));
}

/// A batch of the table's stream the sweeper cannot handle is halved until the bad record is
/// alone, only the records from the first failure on are delivered again, and a record given
/// up on leaves its place on a queue an alarm watches, rather than being dropped silently.
#[test]
fn the_sweepers_stream_source_retries_by_record_and_keeps_what_it_gives_up_on() {
    let template = template();
    let source =
        &resource(&template, "SweeperFunction")["Properties"]["Events"]["SessionsExpired"]["Properties"];
    assert_eq!(source["BisectBatchOnFunctionError"], true);
    assert_eq!(strings(&source["FunctionResponseTypes"]), ["ReportBatchItemFailures"]);
    assert_eq!(source["DestinationConfig"]["OnFailure"]["Type"], "SQS");
    assert!(format!("{:?}", source["DestinationConfig"]["OnFailure"]["Destination"])
        .contains("ExpiryFailuresQueue"));
    assert!(source["MaximumRetryAttempts"].as_u64().is_some_and(|n| n > 0));
}

/// Each function writes JSON lines to its own log group, which the stack owns with a retention
/// (`LogRetentionDays`, 30 by default): without one, Lambda creates a group that keeps user ids
/// forever. The group's name comes from the stack, never from the function it serves.
#[test]
fn each_function_logs_json_to_its_own_group_with_a_retention() {
    let template = template();
    let retention = &template["Parameters"]["LogRetentionDays"];
    assert_eq!(retention["Default"].as_u64(), Some(30));
    let allowed: Vec<u64> =
        retention["AllowedValues"].as_sequence().unwrap().iter().filter_map(Value::as_u64).collect();
    assert!(allowed.contains(&30) && !allowed.contains(&0), "{allowed:?}");
    for name in chat_local::FUNCTIONS {
        let logical = logical(name);
        let group_logical = format!("{}{}LogGroup", name[..1].to_uppercase(), &name[1..]);
        let logging = &resource(&template, &logical)["Properties"]["LoggingConfig"];
        assert_eq!(logging["LogFormat"], "JSON", "{logical}");
        assert_eq!(logging["LogGroup"], resource_ref(&group_logical), "{logical} logs to its own group");
        let group = resource(&template, &group_logical);
        assert_eq!(group["Type"], "AWS::Logs::LogGroup", "{group_logical}");
        assert_eq!(group["Properties"]["RetentionInDays"], resource_ref("LogRetentionDays"));
        let group_name = format!("{:?}", group["Properties"]["LogGroupName"]);
        assert!(
            group_name.contains(&format!("/aws/lambda/${{AWS::StackName}}-{name}")),
            "{group_logical}: {group_name}"
        );
        assert!(!group_name.contains("Function"), "{group_logical} must not depend on its function");
    }
    let groups = template["Resources"]
        .as_mapping()
        .unwrap()
        .values()
        .filter(|r| r["Type"] == "AWS::Logs::LogGroup")
        .count();
    assert_eq!(groups, chat_local::FUNCTIONS.len(), "one group per function");
}

/// X-Ray is one choice for every function: `Tracing` (`PassThrough` unless set to `Active`), in
/// the globals, which no function overrides. SAM gives each function's role the X-Ray write
/// permission itself.
#[test]
fn tracing_is_one_parameter_for_every_function() {
    let template = template();
    let tracing = &template["Parameters"]["Tracing"];
    assert_eq!(strings(&tracing["AllowedValues"]), ["Active", "PassThrough"]);
    assert_eq!(tracing["Default"], "PassThrough");
    assert_eq!(template["Globals"]["Function"]["Tracing"], resource_ref("Tracing"));
    for name in chat_local::FUNCTIONS {
        let logical = logical(name);
        assert!(resource(&template, &logical)["Properties"].get("Tracing").is_none(), "{logical}");
    }
}

/// Conversations and users outlive the stack: deleting it, or an update that would replace the
/// table or the user pool, leaves them in place, and neither can be deleted while its own
/// deletion protection is on.
#[test]
fn the_table_and_the_user_pool_outlive_the_stack() {
    let template = template();
    for (logical, protection, on) in [
        ("Table", "DeletionProtectionEnabled", Value::from(true)),
        ("UserPool", "DeletionProtection", "ACTIVE".into()),
    ] {
        let resource = resource(&template, logical);
        assert_eq!(resource["DeletionPolicy"], "Retain", "{logical}");
        assert_eq!(resource["UpdateReplacePolicy"], "Retain", "{logical}");
        assert_eq!(resource["Properties"][protection], on, "{logical}");
    }
}

/// The sizes and the flush `make bench-turn` prices and measures are the ones the stack deploys:
/// the generator and the stream (which live as long as a reply streams) have sizes of their
/// own, and the template's flush is the generator's default.
#[test]
fn memory_sizes_and_the_flush_are_the_ones_the_cost_bench_measures() {
    let template = template();
    use chat_local::cpu::{GENERATOR_MEMORY_MB, OTHER_MEMORY_MB, STREAM_MEMORY_MB};
    let default = |name: &str| template["Parameters"][name]["Default"].as_u64();
    assert_eq!(default("GeneratorMemorySize"), Some(u64::from(GENERATOR_MEMORY_MB)));
    assert_eq!(default("StreamMemorySize"), Some(u64::from(STREAM_MEMORY_MB)));
    assert_eq!(template["Globals"]["Function"]["MemorySize"].as_u64(), Some(u64::from(OTHER_MEMORY_MB)));
    for (function, parameter) in [("generator", "GeneratorMemorySize"), ("stream", "StreamMemorySize")] {
        let properties = &resource(&template, &logical(function))["Properties"];
        assert_eq!(properties["MemorySize"], resource_ref(parameter), "{function}");
    }
    for function in ["ingest", "sweeper"] {
        assert!(
            resource(&template, &logical(function))["Properties"].get("MemorySize").is_none(),
            "{function}"
        );
    }
    assert_eq!(default("FlushIntervalMs"), Some(generator::DEFAULT_FLUSH_INTERVAL.as_millis() as u64));
}
