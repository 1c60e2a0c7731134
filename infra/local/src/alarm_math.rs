//! The part of CloudWatch metric math the template's alarms use, to evaluate an alarm's
//! expression on figures the local stack emitted: numbers, metric ids, `+ - * /`, comparisons
//! (`>= > <= < ==`, 1 or 0), parentheses, `IF(condition, then, else)` and `FILL(metric, value)`.
//! A metric with no data is `NaN`, as in CloudWatch, until `FILL` replaces it.

use std::collections::HashMap;

/// Why an expression could not be evaluated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("metric math: {0}")]
pub struct MathError(String);

/// Evaluates `expression` with `metrics` (id → value; an id absent here has no data).
pub fn evaluate(expression: &str, metrics: &HashMap<String, f64>) -> Result<f64, MathError> {
    let tokens = tokenize(expression)?;
    let mut parser = Parser { tokens, at: 0, metrics };
    let value = parser.comparison()?;
    match parser.tokens.get(parser.at) {
        None => Ok(value),
        Some(token) => Err(MathError(format!("unexpected {token:?}"))),
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Number(f64),
    Name(String),
    Op(&'static str),
    Open,
    Close,
    Comma,
}

fn tokenize(text: &str) -> Result<Vec<Token>, MathError> {
    let mut tokens = Vec::new();
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            ' ' | '\t' | '\n' => i += 1,
            '(' | ')' | ',' => {
                tokens.push(match c {
                    '(' => Token::Open,
                    ')' => Token::Close,
                    _ => Token::Comma,
                });
                i += 1;
            }
            '+' | '-' | '*' | '/' => {
                tokens.push(Token::Op(match c {
                    '+' => "+",
                    '-' => "-",
                    '*' => "*",
                    _ => "/",
                }));
                i += 1;
            }
            '>' | '<' | '=' => {
                let two = chars.get(i + 1) == Some(&'=');
                let op = match (c, two) {
                    ('>', true) => ">=",
                    ('>', false) => ">",
                    ('<', true) => "<=",
                    ('<', false) => "<",
                    ('=', true) => "==",
                    _ => return Err(MathError("a lone '='".to_owned())),
                };
                tokens.push(Token::Op(op));
                i += if two { 2 } else { 1 };
            }
            c if c.is_ascii_digit() || c == '.' => {
                let start = i;
                while i < chars.len() && (chars[i].is_ascii_digit() || chars[i] == '.') {
                    i += 1;
                }
                let raw: String = chars[start..i].iter().collect();
                tokens.push(Token::Number(raw.parse().map_err(|_| MathError(format!("bad number {raw}")))?));
            }
            c if c.is_ascii_alphabetic() || c == '_' => {
                let start = i;
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                    i += 1;
                }
                tokens.push(Token::Name(chars[start..i].iter().collect()));
            }
            other => return Err(MathError(format!("unexpected character {other:?}"))),
        }
    }
    Ok(tokens)
}

struct Parser<'a> {
    tokens: Vec<Token>,
    at: usize,
    metrics: &'a HashMap<String, f64>,
}

impl Parser<'_> {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.at)
    }

    fn expect(&mut self, token: &Token) -> Result<(), MathError> {
        if self.peek() == Some(token) {
            self.at += 1;
            Ok(())
        } else {
            Err(MathError(format!("expected {token:?} at {:?}", self.peek())))
        }
    }

    fn comparison(&mut self) -> Result<f64, MathError> {
        let left = self.additive()?;
        let Some(Token::Op(op @ (">=" | ">" | "<=" | "<" | "=="))) = self.peek().cloned() else {
            return Ok(left);
        };
        self.at += 1;
        let right = self.additive()?;
        let holds = match op {
            ">=" => left >= right,
            ">" => left > right,
            "<=" => left <= right,
            "<" => left < right,
            _ => left == right,
        };
        Ok(if holds { 1.0 } else { 0.0 })
    }

    fn additive(&mut self) -> Result<f64, MathError> {
        let mut value = self.multiplicative()?;
        while let Some(Token::Op(op @ ("+" | "-"))) = self.peek().cloned() {
            self.at += 1;
            let right = self.multiplicative()?;
            value = if op == "+" { value + right } else { value - right };
        }
        Ok(value)
    }

    fn multiplicative(&mut self) -> Result<f64, MathError> {
        let mut value = self.unary()?;
        while let Some(Token::Op(op @ ("*" | "/"))) = self.peek().cloned() {
            self.at += 1;
            let right = self.unary()?;
            value = if op == "*" { value * right } else { value / right };
        }
        Ok(value)
    }

    fn unary(&mut self) -> Result<f64, MathError> {
        if self.peek() == Some(&Token::Op("-")) {
            self.at += 1;
            return Ok(-self.unary()?);
        }
        self.primary()
    }

    fn primary(&mut self) -> Result<f64, MathError> {
        let token = self.peek().cloned().ok_or_else(|| MathError("the expression ends early".to_owned()))?;
        self.at += 1;
        match token {
            Token::Number(n) => Ok(n),
            Token::Open => {
                let value = self.comparison()?;
                self.expect(&Token::Close)?;
                Ok(value)
            }
            Token::Name(name) if self.peek() == Some(&Token::Open) => {
                self.at += 1;
                let mut args = vec![self.comparison()?];
                while self.peek() == Some(&Token::Comma) {
                    self.at += 1;
                    args.push(self.comparison()?);
                }
                self.expect(&Token::Close)?;
                match (name.as_str(), args.as_slice()) {
                    ("IF", [condition, then, otherwise]) => {
                        Ok(if *condition != 0.0 && !condition.is_nan() { *then } else { *otherwise })
                    }
                    ("FILL", [value, fill]) => Ok(if value.is_nan() { *fill } else { *value }),
                    _ => Err(MathError(format!("{name} with {} arguments is not supported", args.len()))),
                }
            }
            Token::Name(name) => Ok(self.metrics.get(&name).copied().unwrap_or(f64::NAN)),
            other => Err(MathError(format!("unexpected {other:?}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RATIO: &str = "IF((FILL(failed, 0) + FILL(timedout, 0) + FILL(committed, 0)) >= 5, \
        (FILL(failed, 0) + FILL(timedout, 0)) / (FILL(failed, 0) + FILL(timedout, 0) + FILL(committed, 0)), 0)";

    fn with(values: &[(&str, f64)]) -> HashMap<String, f64> {
        values.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
    }

    #[test]
    fn the_failed_turn_ratio_counts_failures_and_timeouts_over_every_ended_turn() {
        assert_eq!(
            evaluate(RATIO, &with(&[("failed", 3.0), ("timedout", 1.0), ("committed", 4.0)])),
            Ok(0.5)
        );
        assert_eq!(evaluate(RATIO, &with(&[("failed", 6.0)])), Ok(1.0), "missing metrics fill with 0");
        assert_eq!(
            evaluate(RATIO, &with(&[("failed", 2.0), ("committed", 2.0)])),
            Ok(0.0),
            "under 5 turns: 0"
        );
        assert_eq!(evaluate(RATIO, &with(&[])), Ok(0.0));
    }

    #[test]
    fn arithmetic_follows_precedence_and_missing_data_is_nan() {
        assert_eq!(evaluate("1 + 2 * 3 - -4 / 2", &with(&[])), Ok(9.0));
        assert_eq!(evaluate("(1 + 2) * 3 > 8", &with(&[])), Ok(1.0));
        assert!(evaluate("reads + 1", &with(&[])).unwrap().is_nan());
        assert_eq!(evaluate("FILL(reads, 0) + FILL(writes, 0)", &with(&[("writes", 7.0)])), Ok(7.0));
        assert!(evaluate("SUM(x)", &with(&[])).is_err());
        assert!(evaluate("1 +", &with(&[])).is_err());
    }
}
