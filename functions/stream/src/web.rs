//! The chat page (`web/` at the workspace root: plain HTML, CSS and JavaScript, no build step),
//! served by the stream function at `/`: once deployed with `AuthMode=jwt` its Function URL is one
//! a browser can open, and the local stack routes `/` here too.

/// A file of the page by path: its content type and text.
pub fn asset(path: &str) -> Option<(&'static str, &'static str)> {
    match path {
        "/" | "/index.html" => Some(("text/html; charset=utf-8", include_str!("../../../web/index.html"))),
        "/app.js" => Some(("text/javascript; charset=utf-8", include_str!("../../../web/app.js"))),
        "/app.css" => Some(("text/css; charset=utf-8", include_str!("../../../web/app.css"))),
        _ => None,
    }
}

/// Only the page's own files run, so markup that reached the page could not run script; API
/// calls may go to the ingest Function URL, another origin once deployed.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    img-src 'self' data:; connect-src 'self' https: http://127.0.0.1:* http://localhost:*; \
    base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_and_its_files_are_served_and_nothing_else() {
        let (kind, html) = asset("/").unwrap();
        assert!(kind.starts_with("text/html"));
        assert!(html.contains("app.js") && html.contains("app.css"));
        assert!(!html.contains("<script>"), "no inline script: the policy allows none");
        assert_eq!(asset("/index.html"), asset("/"));
        assert!(asset("/app.js").unwrap().1.contains("textContent"));
        assert!(asset("/app.css").is_some());
        assert!(asset("/../Cargo.toml").is_none() && asset("/sessions").is_none());
        assert!(!asset("/app.js").unwrap().1.contains("innerHTML"), "model output is never parsed as HTML");
    }
}
