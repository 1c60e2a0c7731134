//! The `calculator` tool: arithmetic on decimal numbers, parsed by recursive descent.

/// A number as the calculator answers it: whole numbers without a fraction.
pub(super) fn format_number(value: f64) -> String {
    if value.fract() == 0.0 && value.abs() < 1e15 {
        format!("{}", value as i64)
    } else {
        format!("{value}")
    }
}

/// Evaluates an arithmetic expression.
pub fn calculate(expression: &str) -> Result<f64, String> {
    let mut parser = Parser { chars: expression.chars().collect(), at: 0, depth: 0 };
    let value = parser.sum()?;
    parser.space();
    if parser.at < parser.chars.len() {
        return Err(format!("unexpected {:?} at position {}", parser.chars[parser.at], parser.at + 1));
    }
    if !value.is_finite() {
        return Err("the result is not a finite number (division by zero?)".to_owned());
    }
    Ok(value)
}

/// Recursive descent, with the usual precedence (`-2^2` is -4, `2^3^2` is 512):
/// sum := product (('+'|'-') product)*; product := unary (('*'|'/'|'%') unary)*;
/// unary := '-' unary | power; power := atom ('^' unary)?; atom := number | name | name(sum) | (sum).
struct Parser {
    chars: Vec<char>,
    at: usize,
    depth: u32,
}

impl Parser {
    fn space(&mut self) {
        while self.chars.get(self.at).is_some_and(|c| c.is_whitespace()) {
            self.at += 1;
        }
    }

    fn peek(&mut self) -> Option<char> {
        self.space();
        self.chars.get(self.at).copied()
    }

    fn sum(&mut self) -> Result<f64, String> {
        let mut value = self.product()?;
        while let Some(op @ ('+' | '-')) = self.peek() {
            self.at += 1;
            let rhs = self.product()?;
            value = if op == '+' { value + rhs } else { value - rhs };
        }
        Ok(value)
    }

    fn product(&mut self) -> Result<f64, String> {
        let mut value = self.unary()?;
        while let Some(op @ ('*' | '/' | '%')) = self.peek() {
            self.at += 1;
            let rhs = self.unary()?;
            if rhs == 0.0 && op != '*' {
                return Err("division by zero".to_owned());
            }
            value = match op {
                '*' => value * rhs,
                '/' => value / rhs,
                _ => value % rhs,
            };
        }
        Ok(value)
    }

    fn power(&mut self) -> Result<f64, String> {
        let base = self.atom()?;
        if self.peek() == Some('^') {
            self.at += 1;
            return Ok(base.powf(self.unary()?));
        }
        Ok(base)
    }

    fn unary(&mut self) -> Result<f64, String> {
        self.depth += 1;
        if self.depth > 200 {
            return Err("the expression is nested too deeply".to_owned());
        }
        let value = if self.peek() == Some('-') {
            self.at += 1;
            self.unary().map(|v| -v)
        } else {
            self.power()
        };
        self.depth -= 1;
        value
    }

    fn atom(&mut self) -> Result<f64, String> {
        match self.peek() {
            Some('(') => {
                self.at += 1;
                let value = self.sum()?;
                if self.peek() != Some(')') {
                    return Err(format!("a ')' is missing at position {}", self.at + 1));
                }
                self.at += 1;
                Ok(value)
            }
            Some(c) if c.is_ascii_digit() || c == '.' => {
                let start = self.at;
                while self.chars.get(self.at).is_some_and(|c| c.is_ascii_digit() || *c == '.') {
                    self.at += 1;
                }
                if matches!(self.chars.get(self.at), Some('e' | 'E'))
                    && self
                        .chars
                        .get(self.at + 1)
                        .is_some_and(|c| c.is_ascii_digit() || *c == '-' || *c == '+')
                {
                    self.at += 2;
                    while self.chars.get(self.at).is_some_and(char::is_ascii_digit) {
                        self.at += 1;
                    }
                }
                let text: String = self.chars[start..self.at].iter().collect();
                text.parse().map_err(|_| format!("{text:?} is not a number"))
            }
            Some(c) if c.is_ascii_alphabetic() => {
                let start = self.at;
                while self.chars.get(self.at).is_some_and(|c| c.is_ascii_alphanumeric()) {
                    self.at += 1;
                }
                let name: String = self.chars[start..self.at].iter().collect::<String>().to_ascii_lowercase();
                match name.as_str() {
                    "pi" => return Ok(std::f64::consts::PI),
                    "e" => return Ok(std::f64::consts::E),
                    _ => {}
                }
                let function: fn(f64) -> f64 = match name.as_str() {
                    "sqrt" => f64::sqrt,
                    "abs" => f64::abs,
                    "ln" => f64::ln,
                    "log10" => f64::log10,
                    "sin" => f64::sin,
                    "cos" => f64::cos,
                    "tan" => f64::tan,
                    "round" => f64::round,
                    "floor" => f64::floor,
                    "ceil" => f64::ceil,
                    _ => return Err(format!("unknown name {name:?}")),
                };
                if self.peek() != Some('(') {
                    return Err(format!("{name} needs its argument in parentheses"));
                }
                let value = self.atom()?;
                Ok(function(value))
            }
            Some(c) => Err(format!("unexpected {c:?} at position {}", self.at + 1)),
            None => Err("the expression ended early".to_owned()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_calculator_follows_precedence_and_explains_its_errors() {
        assert_eq!(calculate("2 + 3 * 4").unwrap(), 14.0);
        assert_eq!(calculate("(2 + 3) * 4").unwrap(), 20.0);
        assert_eq!(calculate("2 ^ 3 ^ 2").unwrap(), 512.0, "right associative");
        assert_eq!(calculate("-2 ^ 2").unwrap(), -4.0);
        assert_eq!(calculate("2 ^ -1").unwrap(), 0.5);
        assert_eq!(calculate("10 % 4 - 1.5e1").unwrap(), -13.0);
        assert_eq!(calculate("sqrt(16) + abs(-2) + round(2.5)").unwrap(), 9.0);
        assert!((calculate("2 * pi").unwrap() - std::f64::consts::TAU).abs() < 1e-12);
        assert_eq!(format_number(calculate("1234567 * 89").unwrap()), "109876463");
        assert_eq!(format_number(calculate("1 / 4").unwrap()), "0.25");
        assert_eq!(calculate("1 / 0").unwrap_err(), "division by zero");
        assert!(calculate("2 +").unwrap_err().contains("ended early"));
        assert!(calculate("(1 + 2").unwrap_err().contains("')' is missing"));
        assert!(calculate("2 $ 3").unwrap_err().contains("position 3"));
        assert!(calculate("foo(1)").unwrap_err().contains("unknown name"));
        assert!(calculate(&"(".repeat(10_000)).is_err(), "deep nesting is refused, not a stack overflow");
    }
}
