//! The chat page in a real headless Chromium (Debian's `chromium` and `chromium-driver`, installed
//! by `make browser`), driven over WebDriver (fantoccini) against the local stack with sign-in
//! (`AUTH_MODE=jwt`, its own issuer). Each scenario saves a screenshot under `target/browser/`.

use crate::harness::*;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// With sign-in; two turns a minute per user (see [`JWT`]).
fn api() -> &'static str {
    &app(&JWT).api
}

/// One browser at a time: two cores cannot run several Chromiums and the stack well.
static ONE_BROWSER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A ChromeDriver process and the browser session it runs; both end when this is dropped.
struct Browser {
    client: Client,
    driver: Child,
    _profile: TempDir,
    _turn: tokio::sync::MutexGuard<'static, ()>,
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Drop for Browser {
    /// Ends ChromeDriver and the Chromium it started, which a failed test did not close: they
    /// share a process group of their own, and all of it goes.
    fn drop(&mut self) {
        let group = format!("-{}", self.driver.id());
        let _ = Command::new("kill").args(["-KILL", "--", &group]).stderr(Stdio::null()).status();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn tool(variable: &str, default: &str) -> String {
    let path = std::env::var(variable).unwrap_or_else(|_| default.to_owned());
    assert!(
        std::path::Path::new(&path).exists(),
        "{path} is missing: `make browser` installs Debian's chromium and chromium-driver (or set {variable})"
    );
    path
}

async fn browser() -> Browser {
    let turn = ONE_BROWSER.lock().await;
    let chromium = tool("CHROMIUM", "/usr/bin/chromium");
    let chromedriver = tool("CHROMEDRIVER", "/usr/bin/chromedriver");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let driver = Command::new(chromedriver)
        .arg(format!("--port={port}"))
        .arg("--allowed-ips=127.0.0.1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        // A group of its own, which the Chromium it starts joins: dropping the browser ends both.
        .process_group(0)
        .spawn()
        .expect("chromedriver starts");
    let profile =
        TempDir(std::env::temp_dir().join(format!("chat-browser-{}", uuid::Uuid::new_v4().simple())));
    let capabilities = json!({
        "browserName": "chrome",
        "goog:chromeOptions": {
            "binary": chromium,
            // Headless on loopback only: no sandbox as root, and none of Chromium's calls home,
            // which this machine's closed network refuses.
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--window-size=1200,860",
                format!("--user-data-dir={}", profile.0.display()),
            ],
        },
    });
    let capabilities = match capabilities {
        Value::Object(map) => map,
        _ => unreachable!(),
    };
    let url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(20);
    let client = loop {
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        match ClientBuilder::new(connector).capabilities(capabilities.clone()).connect(&url).await {
            Ok(client) => break client,
            Err(err) if Instant::now() < deadline => {
                let _ = err;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(err) => panic!("no WebDriver session from chromedriver: {err}"),
        }
    };
    Browser { client, driver, _profile: profile, _turn: turn }
}

impl Browser {
    async fn js(&self, script: &str) -> Value {
        self.client.execute(script, vec![]).await.unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
    }

    /// Waits until `script` returns something truthy; returns it.
    async fn until(&self, what: &str, script: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let value = self.js(script).await;
            if !matches!(value, Value::Null | Value::Bool(false)) {
                return value;
            }
            if Instant::now() >= deadline {
                self.screenshot(&format!("timeout-{}", what.replace(' ', "-"))).await;
                panic!("timed out waiting for {what}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn screenshot(&self, name: &str) {
        let png = self.client.screenshot().await.expect("screenshot");
        let dir = root().join("target/browser");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
    }

    async fn type_into(&self, css: &str, text: &str) {
        let field = self.client.find(Locator::Css(css)).await.expect(css);
        field.clear().await.unwrap();
        field.send_keys(text).await.unwrap();
    }

    async fn click(&self, css: &str) {
        self.client.find(Locator::Css(css)).await.expect(css).click().await.unwrap();
    }

    async fn open_page(&self) {
        self.client.goto(&format!("{}/", api())).await.unwrap();
    }

    /// Signs in through the page's name form (the local issuer mints the token).
    async fn sign_in(&self, user: &str) {
        self.open_page().await;
        self.until(
            "the sign-in form",
            "return !document.getElementById('sign-in').hidden",
            Duration::from_secs(10),
        )
        .await;
        self.type_into("#name", user).await;
        self.click("#name-submit").await;
        let check = format!("return document.getElementById('whoami').textContent.includes({})", json!(user));
        self.until("signed in", &check, Duration::from_secs(10)).await;
    }

    async fn send(&self, text: &str) {
        self.type_into("#input", text).await;
        self.click("#send").await;
    }

    /// The newest assistant bubble: its turn, state and raw text.
    async fn reply(&self) -> Value {
        self.js("const all = document.querySelectorAll('#messages li.assistant');
             const b = all[all.length - 1];
             return b ? {turn: Number(b.dataset.turn), state: b.dataset.state, raw: b.dataset.raw,
                         count: all.length, text: b.textContent, title: b.title} : null;")
            .await
    }

    async fn until_reply(&self, state: &str) -> Value {
        let script = format!(
            "const all = document.querySelectorAll('#messages li.assistant');
             const b = all[all.length - 1];
             return b && b.dataset.state === {} ? true : null;",
            json!(state)
        );
        self.until(&format!("a {state} reply"), &script, Duration::from_secs(30)).await;
        self.reply().await
    }

    async fn session_id(&self) -> String {
        self.js("return location.hash.slice(1)").await.as_str().unwrap().to_owned()
    }

    async fn close(self) {
        let client = self.client.clone();
        client.close().await.expect("browser session closes");
        drop(self);
    }
}

async fn token(user: &str) -> String {
    let answer = request(
        reqwest::Method::POST,
        format!("{}/dev/token", api()),
        Some(json!({"sub": user}).to_string()),
    )
    .await;
    answer.body["token"].as_str().unwrap().to_owned()
}

/// The session as the API has it, read with `user`'s token.
async fn stored(user: &str, id: &str) -> Value {
    let response =
        http().get(format!("{}/sessions/{id}", api())).bearer_auth(token(user).await).send().await.unwrap();
    assert_eq!(response.status(), 200);
    response.json::<Value>().await.unwrap()["session"].clone()
}

#[tokio::test]
async fn send_and_see_the_reply_rendered() {
    let browser = browser().await;
    let user = format!("alice-{}", uuid::Uuid::new_v4().simple());
    browser.sign_in(&user).await;
    browser.send("Hello **world**, with `code` in it").await;
    let reply = browser.until_reply("done").await;
    let id = browser.session_id().await;
    let session = stored(&user, &id).await;
    assert_eq!(reply["raw"], reply_of(&session, 1).unwrap()["content"], "the page shows the committed reply");
    assert!(reply["raw"].as_str().unwrap().contains("Hello **world**"));
    let rendered = browser
        .js("const b = document.querySelector('#messages li.assistant');
             return {strong: b.querySelector('strong')?.textContent, code: b.querySelector('code')?.textContent}")
        .await;
    assert_eq!(rendered, json!({"strong": "world", "code": "code"}), "markdown is rendered");
    let listed =
        browser.js("return [...document.querySelectorAll('#sessions a')].map(a => a.dataset.session)").await;
    assert_eq!(listed, json!([id]), "the new chat is listed");
    // Hovering the reply shows its tokens and cost, as stored, live and after a reload.
    let stored_reply = reply_of(&session, 1).unwrap();
    let (usage, cost) =
        (&stored_reply["usage"], stored_reply["cost_usd"].as_f64().expect("demo has a price"));
    let expected =
        format!("{} tokens in, {} out · ${cost:.6}", usage["input_tokens"], usage["output_tokens"]);
    assert_eq!(reply["title"], expected);
    browser.client.refresh().await.unwrap();
    assert_eq!(browser.until_reply("done").await["title"], expected, "the history shows the same");
    browser.screenshot("send-and-reply").await;
    browser.close().await;
}

#[tokio::test]
async fn a_reload_mid_reply_continues_it_without_a_gap_or_a_duplicate() {
    let browser = browser().await;
    let user = format!("reload-{}", uuid::Uuid::new_v4().simple());
    browser.sign_in(&user).await;
    // 200 tokens, 20 ms apart: four seconds of streaming.
    browser.send("[[reply-tokens:200]] tell me a long story").await;
    browser
        .until(
            "the reply under way",
            "const b = document.querySelector('#messages li.assistant');
             return b && b.dataset.state === 'streaming' && b.dataset.raw.split(' ').length > 30",
            Duration::from_secs(30),
        )
        .await;
    let before = browser.reply().await;
    browser.client.refresh().await.unwrap();
    let after = browser.until_reply("done").await;
    let id = browser.session_id().await;
    let committed = reply_of(&stored(&user, &id).await, 1).unwrap()["content"].as_str().unwrap().to_owned();
    assert_eq!(
        after["raw"].as_str().unwrap(),
        committed,
        "exactly the committed reply: no gap, no duplicate"
    );
    assert!(
        committed.starts_with(before["raw"].as_str().unwrap()),
        "what was shown before the reload is its start"
    );
    assert!(committed.len() > before["raw"].as_str().unwrap().len(), "the reload happened mid-reply");
    assert_eq!(after["count"], 1, "one reply bubble");
    browser.screenshot("reload-mid-reply").await;
    browser.close().await;
}

#[tokio::test]
async fn stop_ends_the_reply_and_keeps_what_was_written() {
    let browser = browser().await;
    let user = format!("stop-{}", uuid::Uuid::new_v4().simple());
    browser.sign_in(&user).await;
    browser.send("[[reply-tokens:2000]] never stop talking").await;
    browser
        .until(
            "the Stop button while generating",
            "const b = document.querySelector('#messages li.assistant');
             return !document.getElementById('stop').hidden && b && b.dataset.raw.length > 40",
            Duration::from_secs(30),
        )
        .await;
    browser.click("#stop").await;
    let reply = browser.until_reply("stopped").await;
    let id = browser.session_id().await;
    let committed = reply_of(&stored(&user, &id).await, 1).unwrap();
    assert_eq!(committed["stop_reason"], "cancelled");
    assert_eq!(reply["raw"], committed["content"]);
    assert!(reply["text"].as_str().unwrap().contains("Stopped."), "{reply}");
    assert_eq!(browser.js("return document.getElementById('stop').hidden").await, json!(true));
    browser.screenshot("stop").await;
    browser.close().await;
}

#[tokio::test]
async fn two_users_do_not_see_each_others_sessions() {
    let browser = browser().await;
    let alice = format!("alice-{}", uuid::Uuid::new_v4().simple());
    let bob = format!("bob-{}", uuid::Uuid::new_v4().simple());
    browser.sign_in(&alice).await;
    browser.send("a secret for alice only").await;
    browser.until_reply("done").await;
    let alices = browser.session_id().await;
    browser.click("#sign-out").await;
    browser.sign_in(&bob).await;
    let listed = browser.js("return document.querySelectorAll('#sessions a').length").await;
    assert_eq!(listed, 0, "bob's list is empty");
    // Bob opens alice's chat by its address.
    browser.client.goto(&format!("{}/#{alices}", api())).await.unwrap();
    browser.client.refresh().await.unwrap();
    let notice = browser
        .until(
            "the not-found notice",
            "const n = document.getElementById('notice'); return !n.hidden && n.textContent",
            Duration::from_secs(10),
        )
        .await;
    assert!(notice.as_str().unwrap().contains("not yours"), "{notice}");
    let page = browser.js("return document.body.innerText").await;
    assert!(!page.as_str().unwrap().contains("secret for alice"), "nothing of alice's is shown");
    browser.screenshot("two-users").await;
    browser.close().await;
}

/// A listener on loopback that counts the connections made to it.
async fn counting_listener() -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = hits.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            drop(socket);
        }
    });
    (port, hits)
}

#[tokio::test]
async fn a_page_opened_with_another_api_in_its_address_sends_nothing_there() {
    let (port, hits) = counting_listener().await;
    let elsewhere = format!("http://127.0.0.1:{port}");
    let browser = browser().await;
    let user = format!("link-{}", uuid::Uuid::new_v4().simple());
    browser.sign_in(&user).await;
    // A link someone sent: the page with `?api=` naming their server, opened while signed in.
    browser.client.goto(&format!("{}/?api={elsewhere}", api())).await.unwrap();
    browser.client.refresh().await.unwrap();
    let check = format!("return document.getElementById('whoami').textContent.includes({})", json!(user));
    browser.until("signed in", &check, Duration::from_secs(10)).await;
    browser.send("hello after a link").await;
    browser.until_reply("done").await;
    // An origin an earlier version of the page stored is not used either.
    browser.js(&format!("localStorage.setItem('chat.api', {}); return true", json!(elsewhere))).await;
    browser.client.refresh().await.unwrap();
    browser
        .until(
            "the sessions listed by the real API",
            "return document.querySelectorAll('#sessions a').length === 1",
            Duration::from_secs(10),
        )
        .await;
    browser.send("and again").await;
    browser
        .until(
            "the second reply",
            "const all = document.querySelectorAll('#messages li.assistant');
             return all.length === 2 && all[1].dataset.state === 'done'",
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 0, "nothing went to {elsewhere}");
    assert_eq!(browser.js("return localStorage.getItem('chat.api')").await, Value::Null);
    let stored = browser.js("return JSON.stringify(localStorage)").await;
    assert!(!stored.as_str().unwrap().contains(&port.to_string()), "{stored}");
    browser.screenshot("api-link-ignored").await;
    browser.close().await;
}

#[tokio::test]
async fn hostile_text_renders_in_linear_time() {
    let browser = browser().await;
    browser.open_page().await;
    browser
        .until("the page's script", "return typeof renderMarkdown === 'function'", Duration::from_secs(10))
        .await;
    // Each used to take seconds (every `[` scanned to the end of the text), and a reply was
    // rendered again on every frame.
    let timings = browser
        .js("const time = (text) => {
               const start = performance.now();
               renderMarkdown(text, document.createElement('div'));
               return performance.now() - start;
             };
             return {brackets: time('['.repeat(40000)), links: time('[a](http://'.repeat(4000)),
                     ticks: time('`'.repeat(40000)), open_bold: time('**' + 'a'.repeat(40000))};")
        .await;
    for (case, ms) in timings.as_object().unwrap() {
        let ms = ms.as_f64().unwrap();
        eprintln!("renderMarkdown {case}: {ms:.1} ms");
        assert!(ms < 300.0, "{case} took {ms:.0} ms: {timings}");
    }
    browser.close().await;
}

#[tokio::test]
async fn a_reply_containing_markup_runs_no_script() {
    let browser = browser().await;
    let user = format!("xss-{}", uuid::Uuid::new_v4().simple());
    browser.sign_in(&user).await;
    // The demo model repeats the message, so the reply carries this markup.
    let attack = r#"<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2"> [x](javascript:window.__pwned=3) **still bold**"#;
    browser.send(attack).await;
    let reply = browser.until_reply("done").await;
    assert!(reply["raw"].as_str().unwrap().contains(attack));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let probe = browser
        .js("const m = document.getElementById('messages');
             return {pwned: window.__pwned ?? null,
                     elements: m.querySelectorAll('script, img, iframe, [onerror]').length,
                     links: [...m.querySelectorAll('a')].map(a => a.href),
                     bold: m.querySelector('li.assistant strong')?.textContent,
                     shown: m.querySelector('li.assistant').textContent.includes('<script>window.__pwned = 1</script>')}")
        .await;
    assert_eq!(
        probe,
        json!({"pwned": null, "elements": 0, "links": [], "bold": "still bold", "shown": true}),
        "the markup is shown as text and nothing runs"
    );
    browser.screenshot("markup-is-text").await;
    browser.close().await;
}

#[tokio::test]
async fn a_failed_reply_and_a_rate_limit_are_told_in_words_with_retry() {
    let browser = browser().await;
    let user = format!("errors-{}", uuid::Uuid::new_v4().simple());
    browser.sign_in(&user).await;
    // The demo model fails after 3 tokens on every attempt.
    browser.send("[[fail-after:3]] this will break").await;
    let failed = browser.until_reply("failed").await;
    assert!(failed["text"].as_str().unwrap().contains("the model failed"), "{failed}");
    let notice = browser.js("return document.getElementById('notice-text').textContent").await;
    assert!(notice.as_str().unwrap().starts_with("The assistant could not answer"), "{notice}");
    // Retry sends the message again, as a new turn: the second and last turn of this minute.
    browser.click("#notice-retry").await;
    browser
        .until(
            "the retried turn",
            "return document.querySelectorAll('#messages li.assistant').length === 2 &&
                    document.querySelectorAll('#messages li.assistant')[1].dataset.state === 'failed'",
            Duration::from_secs(30),
        )
        .await;
    browser.click("#notice-retry").await;
    let limited = browser
        .until(
            "the rate-limit notice",
            "const t = document.getElementById('notice-text').textContent;
             return t.startsWith('Slow down') && t",
            Duration::from_secs(10),
        )
        .await;
    assert!(limited.as_str().unwrap().contains("try again in"), "{limited}");
    let retry_enabled = browser.js("return !document.getElementById('notice-retry').disabled").await;
    assert_eq!(retry_enabled, json!(false), "Retry waits for Retry-After");
    assert_eq!(browser.js("return document.querySelectorAll('#messages li.user').length").await, 2);
    browser.screenshot("errors-in-words").await;
    browser.close().await;
}

#[tokio::test]
async fn a_tool_the_model_called_is_shown_with_its_answer_live_and_after_a_reload() {
    let browser = browser().await;
    let user = format!("tools-{}", uuid::Uuid::new_v4().simple());
    browser.sign_in(&user).await;
    // The demo model's directive: it asks the calculator first, then answers with the result.
    browser.send("What is [[calc:6*7]]?").await;
    let reply = browser.until_reply("done").await;
    assert!(reply["raw"].as_str().unwrap().contains("The calculator says: 42."), "{reply}");
    let tools = "return [...document.querySelectorAll('#messages li.assistant ul.tools li')]
                   .map(li => ({text: li.textContent, state: li.dataset.state}))";
    let live = browser.js(tools).await;
    assert_eq!(live, json!([{"text": "Used calculator {\"expression\":\"6*7\"} → 42", "state": "done"}]));
    browser.screenshot("tool-call").await;
    // From the stored reply, the same line.
    browser.client.refresh().await.unwrap();
    browser.until_reply("done").await;
    assert_eq!(browser.js(tools).await, live, "the history shows the tool call as the stream did");
    browser.close().await;
}

/// How the page shows the messages: per bubble, its role, turn, whether it is an earlier
/// version, and its controls.
async fn bubbles(browser: &Browser) -> Value {
    browser
        .js("return [...document.querySelectorAll('#messages > li')].map(li => ({
                 role: li.className.split(' ')[0], turn: Number(li.dataset.turn),
                 earlier: li.classList.contains('superseded'),
                 controls: [...li.querySelectorAll('.controls button')].map(b => b.dataset.action)}))")
        .await
}

#[tokio::test]
async fn regenerate_keeps_the_earlier_reply_as_a_version_and_fork_opens_a_chat_from_it() {
    let browser = browser().await;
    let user = format!("regen-{}", uuid::Uuid::new_v4().simple());
    browser.sign_in(&user).await;
    browser.send("Hello there").await;
    browser.until_reply("done").await;
    let id = browser.session_id().await;
    browser.click("#messages li.assistant .controls button[data-action=regenerate]").await;
    browser
        .until(
            "the regenerated reply",
            "const all = document.querySelectorAll('#messages li.assistant');
             return all.length === 2 && all[1].dataset.state === 'done'",
            Duration::from_secs(30),
        )
        .await;
    let expected = json!([
        {"role": "user", "turn": 1, "earlier": true, "controls": []},
        {"role": "assistant", "turn": 1, "earlier": true, "controls": ["fork"]},
        {"role": "user", "turn": 2, "earlier": false, "controls": []},
        {"role": "assistant", "turn": 2, "earlier": false, "controls": ["regenerate", "edit", "fork"]},
    ]);
    assert_eq!(bubbles(&browser).await, expected, "live");
    let session = stored(&user, &id).await;
    assert_eq!(session["messages"][1]["superseded_by"], 2);
    assert_eq!(browser.reply().await["raw"], reply_of(&session, 2).unwrap()["content"]);
    browser.client.refresh().await.unwrap();
    browser.until_reply("done").await;
    assert_eq!(bubbles(&browser).await, expected, "after a reload, from the history");
    browser.screenshot("regenerate").await;

    // Fork at the earlier version: a new chat with that exchange, where it is the current one.
    browser.click("#messages li.assistant[data-turn='1'] .controls button[data-action=fork]").await;
    let check = format!("return location.hash.length > 1 && location.hash.slice(1) !== {}", json!(id));
    browser.until("the fork opened", &check, Duration::from_secs(10)).await;
    browser
        .until(
            "the fork's history",
            "return document.querySelectorAll('#messages > li').length === 2",
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(
        bubbles(&browser).await,
        json!([
            {"role": "user", "turn": 1, "earlier": false, "controls": []},
            {"role": "assistant", "turn": 1, "earlier": false, "controls": ["regenerate", "edit", "fork"]},
        ])
    );
    let fork = browser.session_id().await;
    assert_eq!(stored(&user, &fork).await["forked_from"], json!({"session_id": id, "turn": 1}));
    let listed = browser
        .until("both chats listed", "const s = [...document.querySelectorAll('#sessions a')]; return s.length === 2 && s.map(a => a.dataset.session)", Duration::from_secs(10))
        .await;
    assert_eq!(listed, json!([fork, id]), "newest first");
    browser.screenshot("fork").await;
    browser.close().await;
}

#[tokio::test]
async fn edit_rewrites_the_last_message_and_the_reply_answers_the_new_text() {
    let browser = browser().await;
    let user = format!("edit-{}", uuid::Uuid::new_v4().simple());
    browser.sign_in(&user).await;
    browser.send("the first words").await;
    browser.until_reply("done").await;
    browser.click("#messages li.assistant .controls button[data-action=edit]").await;
    let editing = browser
        .js("return {input: document.getElementById('input').value, send: document.getElementById('send').textContent,
                     cancel: !document.getElementById('cancel-edit').hidden}")
        .await;
    assert_eq!(editing, json!({"input": "the first words", "send": "Save & send", "cancel": true}));
    browser.type_into("#input", "the second words").await;
    browser.click("#send").await;
    browser
        .until(
            "the reply to the edit",
            "const all = document.querySelectorAll('#messages li.assistant');
             return all.length === 2 && all[1].dataset.state === 'done'",
            Duration::from_secs(30),
        )
        .await;
    let reply = browser.reply().await;
    assert!(reply["raw"].as_str().unwrap().contains("the second words"), "{reply}");
    let shown = bubbles(&browser).await;
    assert_eq!(shown[0]["earlier"], true);
    assert_eq!(shown[2]["earlier"], false);
    let user_texts = browser
        .js("return [...document.querySelectorAll('#messages li.user')].map(li => li.textContent)")
        .await;
    assert_eq!(user_texts, json!(["the first words", "the second words"]));
    assert_eq!(browser.js("return document.getElementById('send').textContent").await, json!("Send"));
    browser.screenshot("edit").await;
    browser.close().await;
}

#[tokio::test]
async fn the_list_shows_titles_and_times_and_a_chat_is_renamed_and_exported_from_the_page() {
    let browser = browser().await;
    let user = format!("title-{}", uuid::Uuid::new_v4().simple());
    browser.sign_in(&user).await;
    browser.send("Hello from the list, with many words to make a title of").await;
    browser.until_reply("done").await;
    let listed = browser
        .until(
            "the titled chat listed",
            "const a = document.querySelector('#sessions a');
             return a && a.firstChild.textContent !== 'New chat' && [a.firstChild.textContent, a.querySelector('small').textContent]",
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(listed, json!(["Hello from the list, with many words to…", "just now"]));
    assert_eq!(browser.js("return document.getElementById('chat-title').textContent").await, listed[0]);

    browser.click("#rename").await;
    browser.type_into("#title-input", "Greetings").await;
    browser.click("#title-form button[type=submit]").await;
    browser
        .until(
            "the new name listed",
            "return document.querySelector('#sessions a').firstChild.textContent === 'Greetings'",
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(
        browser.js("return document.getElementById('chat-title').textContent").await,
        json!("Greetings")
    );
    let id = browser.session_id().await;
    assert_eq!(stored(&user, &id).await["title"], "Greetings");

    // The download's content, caught where the page hands it to the browser.
    browser
        .js("window.exported = [];
             const make = URL.createObjectURL;
             URL.createObjectURL = (blob) => { blob.text().then(t => window.exported.push(t)); return make(blob); };
             return true")
        .await;
    browser.click("#export-md").await;
    let text = browser.until("the export", "return window.exported[0]", Duration::from_secs(10)).await;
    let text = text.as_str().unwrap();
    assert!(text.starts_with("# Greetings\n"), "{text}");
    assert!(text.contains("## You · turn 1\n\nHello from the list"), "{text}");
    assert!(text.contains("## Assistant · turn 1\n"), "{text}");
    browser.screenshot("title-and-export").await;
    browser.close().await;
}

#[tokio::test]
async fn a_reply_started_in_one_tab_streams_live_in_another_and_a_rename_shows_in_both() {
    let browser = browser().await;
    let user = format!("tabs-{}", uuid::Uuid::new_v4().simple());
    browser.sign_in(&user).await;
    browser.send("The first message").await;
    browser.until_reply("done").await;
    let id = browser.session_id().await;
    let tab_a = browser.client.window().await.unwrap();

    // Tab B opens the same chat (the sign-in is shared), and shows it as it is.
    let tab_b = browser.client.new_window(true).await.unwrap().handle;
    browser.client.switch_to_window(tab_b.clone()).await.unwrap();
    browser.client.goto(&format!("{}/#{id}", api())).await.unwrap();
    browser.until_reply("done").await;

    // Tab A sends; tab B, untouched, shows the message and streams the reply as it is written.
    browser.client.switch_to_window(tab_a.clone()).await.unwrap();
    browser.send("[[reply-tokens:150]] a longer answer, please").await;
    browser.client.switch_to_window(tab_b.clone()).await.unwrap();
    browser
        .until(
            "tab B streaming tab A's reply",
            "const b = document.querySelector('#messages li.assistant[data-turn=\"2\"]');
             return b && b.dataset.state === 'streaming' && b.dataset.raw.length > 0",
            Duration::from_secs(5),
        )
        .await;
    let done = browser.until_reply("done").await;
    let committed = reply_of(&stored(&user, &id).await, 2).unwrap()["content"].clone();
    assert_eq!(done["raw"], committed, "tab B shows exactly the committed reply");
    let messages = browser
        .js("return [...document.querySelectorAll('#messages li.user')].map(li => li.textContent)")
        .await;
    assert_eq!(messages, json!(["The first message", "[[reply-tokens:150]] a longer answer, please"]));
    browser.screenshot("second-tab").await;

    // A rename in tab B reaches tab A's list, without a reload.
    browser.click("#rename").await;
    browser.type_into("#title-input", "Shared").await;
    browser.click("#title-form button[type=submit]").await;
    browser.client.switch_to_window(tab_a).await.unwrap();
    browser
        .until(
            "tab A's list renamed",
            "return document.querySelector('#sessions a').firstChild.textContent === 'Shared'
                 && document.getElementById('chat-title').textContent === 'Shared'",
            Duration::from_secs(5),
        )
        .await;
    let replies = browser.js("return document.querySelectorAll('#messages li.assistant').length").await;
    assert_eq!(replies, json!(2), "tab A shows its reply once");
    browser.close().await;
}

#[tokio::test]
async fn where_sse_is_blocked_the_page_long_polls_the_reply_and_shows_exactly_the_committed_text() {
    let browser = browser().await;
    let user = format!("lp-{}", uuid::Uuid::new_v4().simple());
    browser.sign_in(&user).await;
    // SSE is refused, as by a proxy that blocks text/event-stream: every EventSource fails.
    browser
        .js("window.EventSource = class {
               static CONNECTING = 0; static OPEN = 1; static CLOSED = 2;
               constructor(url) {
                 this.url = String(url); this.readyState = 0; this.listeners = {};
                 setTimeout(() => { this.readyState = 2; (this.listeners.error || []).forEach(f => f(new Event('error'))); }, 20);
               }
               addEventListener(type, f) { (this.listeners[type] ||= []).push(f); }
               close() { this.readyState = 2; }
             };
             return true")
        .await;
    browser.send("[[reply-tokens:120]] please answer anyway").await;
    browser
        .until(
            "the reply arriving by long-poll",
            "const b = document.querySelector('#messages li.assistant');
             return b && b.dataset.state === 'streaming' && b.dataset.raw.length > 20",
            Duration::from_secs(10),
        )
        .await;
    let reply = browser.until_reply("done").await;
    let id = browser.session_id().await;
    let committed = reply_of(&stored(&user, &id).await, 1).unwrap()["content"].clone();
    assert_eq!(reply["raw"], committed, "exactly the committed reply");
    let polls = browser
        .js("return performance.getEntriesByType('resource').map(e => e.name)
                 .filter(n => n.includes('/turns/1/log?') && n.includes('live=long-poll')).length")
        .await;
    assert!(polls.as_u64().unwrap() >= 2, "the page long-polled the log: {polls}");
    assert_eq!(reply["count"], 1, "one reply bubble");
    browser.screenshot("long-poll-fallback").await;
    browser.close().await;
}

/// A page whose stream is refused because the turn's streams are all taken (here by two other
/// clients; after a reload, by the page's own stream the relay has not yet seen go) waits and
/// tries again, then follows the reply to its end, rather than telling the user to close tabs.
#[tokio::test]
async fn a_page_refused_a_stream_while_the_turns_are_taken_tries_again_and_follows_the_reply() {
    let browser = browser().await;
    let user = format!("full-{}", uuid::Uuid::new_v4().simple());
    browser.sign_in(&user).await;
    let bearer = token(&user).await;
    // 500 tokens, 20 ms apart: ten seconds of streaming, so the turn still runs when the page
    // tries again (its end would free the slots anyway).
    let accepted = http()
        .post(format!("{}/sessions/{user}/messages", api()))
        .bearer_auth(&bearer)
        .json(&json!({"message": "[[reply-tokens:500]] a story for three"}))
        .send()
        .await
        .unwrap();
    assert_eq!(accepted.status(), 202);
    let id = accepted.json::<Value>().await.unwrap()["session_id"].as_str().unwrap().to_owned();
    // MAX_STREAMS_PER_TURN (2) streams of the turn, held by other clients.
    let url = format!("{}/sessions/{id}/stream?turn=1&access_token={bearer}", api());
    let (status, first) = SseReader::open(&url, None).await;
    assert_eq!(status, 200);
    let (status, second) = SseReader::open(&url, None).await;
    assert_eq!(status, 200);
    // The page opens the chat (a change of the address's fragment alone loads nothing).
    browser.client.goto(&format!("{}/#{id}", api())).await.unwrap();
    browser.client.refresh().await.unwrap();
    browser
        .until(
            "the page waiting for a stream",
            "return document.getElementById('connection').textContent.includes('Waiting for a free stream')",
            Duration::from_secs(15),
        )
        .await;
    drop(first);
    browser
        .until(
            "the reply streaming before its end",
            "const b = document.querySelector('#messages li.assistant');
             return b && b.dataset.state === 'streaming' && b.dataset.raw.length > 0",
            Duration::from_secs(8),
        )
        .await;
    let reply = browser.until_reply("done").await;
    let committed = reply_of(&stored(&user, &id).await, 1).unwrap()["content"].clone();
    assert_eq!(reply["raw"], committed, "exactly the committed reply");
    assert_eq!(reply["count"], 1, "one reply bubble");
    let told = browser.js("return document.body.textContent.includes('too many replies open')").await;
    assert_eq!(told, json!(false), "no notice to close tabs");
    drop(second);
    browser.close().await;
}
