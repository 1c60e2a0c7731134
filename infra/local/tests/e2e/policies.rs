//! The functions' IAM policies as `template.yaml` writes them: plain `Allow` statements, no
//! wildcard actions, a policy wrapped only in `!If [Condition, policy, !Ref AWS::NoValue]`.
//! Shared by the template drift tests (`tests/template.rs`) and the end-to-end IAM test.

use serde_norway::Value;

/// `template.yaml`, parsed.
pub fn template() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../template.yaml");
    serde_norway::from_str(&std::fs::read_to_string(path).expect("template.yaml")).expect("valid YAML")
}

/// The template's logical name of a function: `generator` → `GeneratorFunction`.
pub fn logical(function: &str) -> String {
    format!("{}{}Function", function[..1].to_uppercase(), &function[1..])
}

/// One action a function's policy grants, on the resources its statement names (as written:
/// `!GetAtt Table.Arn`, `!Sub "${Table.Arn}/index/by_user"`, …), under a condition if its policy
/// has one.
#[derive(Debug, Clone)]
pub struct Grant {
    pub condition: Option<String>,
    pub action: String,
    pub resources: Vec<Value>,
}

/// Every grant of `function`'s (logical name) policies; panics on anything but the forms above.
pub fn grants(template: &Value, function: &str) -> Vec<Grant> {
    let mut grants = Vec::new();
    let policies = template["Resources"][function]["Properties"]["Policies"].as_sequence();
    for policy in policies.unwrap_or_else(|| panic!("{function} has no policies")) {
        match policy {
            Value::Tagged(tagged) => {
                assert_eq!(tagged.tag.to_string(), "!If", "{function}: only !If wraps a policy");
                let branches = tagged.value.as_sequence().unwrap();
                let condition = branches[0].as_str().unwrap().to_owned();
                assert!(matches!(&branches[2], Value::Tagged(t) if t.value == "AWS::NoValue"));
                grants.extend(statements(function, &branches[1], Some(condition)));
            }
            policy => grants.extend(statements(function, policy, None)),
        }
    }
    grants
}

fn statements(function: &str, policy: &Value, condition: Option<String>) -> Vec<Grant> {
    let mut grants = Vec::new();
    for statement in policy["Statement"].as_sequence().unwrap() {
        assert_eq!(statement["Effect"], "Allow");
        let resources = match &statement["Resource"] {
            Value::Sequence(resources) => resources.clone(),
            Value::Null => Vec::new(),
            resource => vec![resource.clone()],
        };
        for action in strings(&statement["Action"]) {
            assert!(!action.contains('*'), "{function}: no wildcard actions");
            grants.push(Grant { condition: condition.clone(), action, resources: resources.clone() });
        }
    }
    grants
}

/// A sequence of strings.
pub fn strings(value: &Value) -> Vec<String> {
    value
        .as_sequence()
        .map(|s| s.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
        .unwrap_or_default()
}
