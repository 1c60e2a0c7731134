//! Server-Sent Events framing.

/// One event. Data containing line breaks is split over several `data:` lines, which the client
/// joins back with `\n`, as the SSE specification requires.
pub fn event(name: &str, id: Option<&str>, data: &str) -> String {
    let mut out = String::with_capacity(data.len() + 32);
    out.push_str("event: ");
    out.push_str(name);
    out.push('\n');
    if let Some(id) = id {
        out.push_str("id: ");
        out.push_str(id);
        out.push('\n');
    }
    for line in data.split("\r\n").flat_map(|l| l.split(['\n', '\r'])) {
        out.push_str("data: ");
        out.push_str(line);
        out.push('\n');
    }
    out.push('\n');
    out
}

/// A comment line: keeps the connection alive, ignored by clients.
pub fn comment(text: &str) -> String {
    format!(": {text}\n\n")
}

/// Tells the client how long to wait before reconnecting.
pub fn retry(millis: u64) -> String {
    format!("retry: {millis}\n\n")
}

/// The largest token index an event id may name: far past any reply (a reply is one item of at
/// most 400 KB), so a larger one is a client's mistake, not a place to resume from.
pub const MAX_EVENT_INDEX: u64 = 10_000_000;

/// Parses an event id `{turn}:{index}`; turns count from 1, and the index is at most
/// [`MAX_EVENT_INDEX`].
pub fn parse_id(raw: &str) -> Option<(u64, u64)> {
    let (turn, index) = raw.trim().split_once(':')?;
    let (turn, index): (u64, u64) = (turn.parse().ok()?, index.parse().ok()?);
    (turn >= 1 && index <= MAX_EVENT_INDEX).then_some((turn, index))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_line_data_is_split_over_data_lines() {
        assert_eq!(event("token", Some("1:0"), "a\nb"), "event: token\nid: 1:0\ndata: a\ndata: b\n\n");
        assert_eq!(event("token", None, "end\n"), "event: token\ndata: end\ndata: \n\n");
        assert_eq!(event("token", None, "x\r\ny"), "event: token\ndata: x\ndata: y\n\n");
    }

    #[test]
    fn ids_parse_as_turn_and_index() {
        assert_eq!(parse_id("3:17"), Some((3, 17)));
        assert_eq!(parse_id("3"), None);
        assert_eq!(parse_id("a:1"), None);
        assert_eq!(parse_id("0:1"), None, "turns count from 1");
        assert_eq!(parse_id("1:18446744073709551615"), None, "an index past any reply");
        assert_eq!(parse_id(&format!("2:{MAX_EVENT_INDEX}")), Some((2, MAX_EVENT_INDEX)));
    }
}
