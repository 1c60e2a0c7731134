//! The chat page (`web/` at the workspace root: plain HTML, CSS and JavaScript, no build step),
//! served by the ingest function at `/`. Its API is then the origin that served it, and the only
//! other origin it talks to is the stream's, which ingest already knows (`STREAM_URL_BASE`): it
//! is written into the page and into its Content-Security-Policy once per cold start. Nothing
//! the page reads from its URL or storage can point it anywhere else.

use lambda_http::http::{header, StatusCode};
use lambda_http::{Body, Response};

/// Where the page learns the stream's origin; replaced once in `index.html`.
const STREAM_META: &str = r#"<meta name="chat-stream" content="">"#;

/// The page's files, with the stream's origin written in and the policy that pins it.
#[derive(Debug, Clone)]
pub struct Page {
    html: String,
    policy: String,
}

impl Page {
    /// The page for a deployment whose streams are served at `stream_url_base` (empty or
    /// relative: the page's own origin).
    pub fn new(stream_url_base: &str) -> Page {
        let stream = origin_of(stream_url_base);
        let template = include_str!("../../../web/index.html");
        debug_assert!(template.contains(STREAM_META), "index.html carries the stream meta tag");
        let meta = format!(
            r#"<meta name="chat-stream" content="{}">"#,
            escape_html(stream.as_deref().unwrap_or(""))
        );
        let html = template.replacen(STREAM_META, &meta, 1);
        Page { html, policy: policy(stream.as_deref()) }
    }

    /// A file of the page by path: its content type and text.
    pub fn asset(&self, path: &str) -> Option<(&'static str, &str)> {
        match path {
            "/" | "/index.html" => Some(("text/html; charset=utf-8", self.html.as_str())),
            "/app.js" => Some(("text/javascript; charset=utf-8", include_str!("../../../web/app.js"))),
            "/app.css" => Some(("text/css; charset=utf-8", include_str!("../../../web/app.css"))),
            _ => None,
        }
    }

    /// The Content-Security-Policy every file of the page is served with.
    pub fn policy(&self) -> &str {
        &self.policy
    }

    /// The answer to `GET` (or `HEAD`) of one of the page's files.
    pub fn response(&self, path: &str) -> Option<Response<Body>> {
        let (content_type, text) = self.asset(path)?;
        let response = Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, content_type)
            .header(header::CACHE_CONTROL, "no-cache")
            .header(header::CONTENT_SECURITY_POLICY, &self.policy)
            .header(header::X_CONTENT_TYPE_OPTIONS, "nosniff")
            .header(header::REFERRER_POLICY, "no-referrer")
            .body(Body::Text(text.to_owned()))
            .expect("status and headers are valid");
        Some(response)
    }
}

/// Only the page's own files run, so markup that reached the page could not run script; it
/// connects to its own origin (the API) and to the stream's, and nowhere else.
fn policy(stream: Option<&str>) -> String {
    let connect = match stream {
        Some(origin) => format!("'self' {origin}"),
        None => "'self'".to_owned(),
    };
    format!(
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
         connect-src {connect}; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
}

/// The origin (scheme, host and port) of an absolute http(s) URL; `None` for an empty or
/// relative one, which is the page's own origin.
fn origin_of(url: &str) -> Option<String> {
    let uri = url.trim().parse::<lambda_http::http::Uri>().ok()?;
    let scheme = uri.scheme_str().filter(|s| matches!(*s, "http" | "https"))?;
    let authority = uri.authority()?;
    if authority.as_str().contains('@') {
        return None;
    }
    Some(format!("{scheme}://{}", authority.as_str().to_ascii_lowercase()))
}

fn escape_html(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_and_its_files_are_served_and_nothing_else() {
        let page = Page::new("");
        let (kind, html) = page.asset("/").unwrap();
        assert!(kind.starts_with("text/html"));
        assert!(html.contains("app.js") && html.contains("app.css"));
        assert!(!html.contains("<script>"), "no inline script: the policy allows none");
        assert_eq!(page.asset("/index.html"), page.asset("/"));
        assert!(page.asset("/app.js").unwrap().1.contains("textContent"));
        assert!(page.asset("/app.css").is_some());
        assert!(page.asset("/../Cargo.toml").is_none() && page.asset("/sessions").is_none());
        assert!(
            !page.asset("/app.js").unwrap().1.contains("innerHTML"),
            "model output is never parsed as HTML"
        );
    }

    #[test]
    fn the_policy_names_exactly_the_pages_origin_and_the_streams() {
        let page = Page::new("https://abc123.lambda-url.us-east-1.on.aws/");
        let connect = page.policy().split(';').find(|d| d.trim().starts_with("connect-src")).unwrap();
        assert_eq!(connect.trim(), "connect-src 'self' https://abc123.lambda-url.us-east-1.on.aws");
        assert!(!page.policy().contains("https:;") && !page.policy().contains('*'), "{}", page.policy());
        let html = page.asset("/").unwrap().1;
        assert!(html
            .contains(r#"<meta name="chat-stream" content="https://abc123.lambda-url.us-east-1.on.aws">"#));
        // The local stack: the stream is on the API's own origin.
        let local = Page::new("http://127.0.0.1:9000");
        assert!(local.policy().contains("connect-src 'self' http://127.0.0.1:9000;"), "{}", local.policy());
        // Relative or unset: the page's own origin only.
        for base in ["", "/stream", "not a url"] {
            let page = Page::new(base);
            assert!(page.policy().contains("connect-src 'self';"), "{base}: {}", page.policy());
            assert!(page.asset("/").unwrap().1.contains(STREAM_META), "{base}");
        }
        assert_eq!(origin_of("https://user@evil.test/"), None);
        assert_eq!(escape_html(r#""><script>"#), "&quot;&gt;&lt;script&gt;");
    }

    #[test]
    fn the_script_takes_its_origins_from_the_server_never_from_its_url_or_storage() {
        let page = Page::new("");
        let script = page.asset("/app.js").unwrap().1;
        assert!(!script.contains(r#"params.get("api")"#) && !script.contains("URLSearchParams"), "no ?api=");
        assert!(!script.contains(r#"setItem("chat.api""#), "no API origin in storage");
        assert!(script.contains(r#"meta[name="chat-stream"]"#), "the stream origin comes from the page");
    }
}
