// The chat page: plain JavaScript, no build step. It talks to the HTTP contract in docs/architecture.md:
// ingest for sessions and sends, the stream (EventSource) for tokens. Model output is rendered by
// building DOM nodes with textContent, never by parsing it as HTML, so a reply cannot inject
// markup or script.
"use strict";

const $ = (id) => document.getElementById(id);
const el = (tag, cls) => {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  return node;
};

// Where the page's requests go, as the server that served it says, never the page's URL or
// storage (which anyone who sends a link controls): the API is this page's own origin, and the
// stream's origin is the one the server wrote into the page (and into its CSP, which allows no
// other). An origin an earlier version of the page remembered is forgotten.
const API = "";
const STREAM = document.querySelector('meta[name="chat-stream"]')?.content || "";
localStorage.removeItem("chat.api");
const IN_FLIGHT = new Set(["user_writing", "user_committed", "ai_generating"]);

const state = {
  user: localStorage.getItem("chat.user"),
  token: localStorage.getItem("chat.token"),
  session: null, // the open session's id
  sessionsCursor: null,
  olderCursor: null,
  stream: null, // { source, bubble, session, turn, lastId }
  retry: null, // what the notice's Retry button does
  lastTurn: 0, // the open session's last turn: the one Regenerate and Edit redo
  editing: null, // the turn whose message the composer is rewriting, if any
  feed: null, // the EventSource of the user's feed: what other tabs do
  starting: 0, // requests of this tab that may start a turn, still unanswered
};

class ApiError extends Error {
  constructor(status, code, message, retryAfter) {
    super(message);
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter;
  }
}

async function api(method, path, body) {
  const headers = {};
  if (state.token) headers.authorization = "Bearer " + state.token;
  if (body !== undefined) headers["content-type"] = "application/json";
  let response;
  try {
    response = await fetch(API + path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch {
    throw new ApiError(0, "network", "The server cannot be reached. Check your connection and try again.");
  }
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!response.ok) {
    const error = (data && data.error) || {};
    const retryAfter = Number(response.headers.get("retry-after")) || error.retry_after || null;
    throw new ApiError(response.status, error.code || "http_" + response.status, error.message || response.statusText, retryAfter);
  }
  return data;
}

/// An error in words a person can act on.
function describe(err) {
  switch (err.status) {
    case 0:
      return err.message;
    case 401:
      return "Your sign-in is missing or has expired. Sign in again.";
    case 403:
      return "You are signed in as " + state.user + "; that belongs to someone else.";
    case 404:
      return "This chat does not exist, or it is not yours.";
    case 409:
      if (err.code === "turn_in_flight") return "The assistant is still answering in this chat. Wait for it, or press Stop.";
      return err.message;
    case 413:
      return "Your message is too long. " + err.message;
    case 429:
      return "Slow down: " + err.message.replace(/[.\s]*$/, ".") + (err.retryAfter ? " You can try again in " + err.retryAfter + " s." : "");
    default:
      if (err.status >= 500) return "The service is having trouble (" + err.code + "). Try again in a moment.";
      return err.message;
  }
}

function notice(text, retry) {
  state.retry = retry || null;
  $("notice-text").textContent = text;
  $("notice-retry").hidden = !retry;
  $("notice").hidden = false;
}

function clearNotice() {
  state.retry = null;
  $("notice").hidden = true;
}

/// Shows an error; 401 sends the user back to sign-in; 429 offers Retry once Retry-After passes.
function fail(err, retry) {
  if (err.status === 401) return signOut(describe(err));
  // Only what may work a second time gets a Retry button.
  if (!(err.status === 0 || err.status === 429 || err.status >= 500)) retry = null;
  notice(describe(err), retry);
  if (err.status === 429 && err.retryAfter && retry) {
    const button = $("notice-retry");
    button.disabled = true;
    setTimeout(() => (button.disabled = false), err.retryAfter * 1000);
  }
}

function connection(text) {
  $("connection").textContent = text || "";
  $("connection").hidden = !text;
}

// ----- markdown, as DOM nodes ------------------------------------------------------------

function renderMarkdown(text, into) {
  into.replaceChildren();
  const lines = text.split("\n");
  let paragraph = [];
  const flush = () => {
    if (paragraph.length) {
      const p = el("p");
      inline(paragraph.join("\n"), p);
      into.append(p);
      paragraph = [];
    }
  };
  for (let i = 0; i < lines.length; ) {
    const line = lines[i];
    const fence = line.match(/^\s*```\s*([\w+.-]*)\s*$/);
    if (fence) {
      flush();
      const code = [];
      for (i++; i < lines.length && !/^\s*```\s*$/.test(lines[i]); i++) code.push(lines[i]);
      i++;
      const pre = el("pre");
      const c = el("code");
      if (fence[1]) c.dataset.lang = fence[1];
      c.textContent = code.join("\n");
      pre.append(c);
      into.append(pre);
      continue;
    }
    const heading = line.match(/^(#{1,6})\s+(.*)$/);
    if (heading) {
      flush();
      const h = el("h" + Math.min(6, heading[1].length + 2));
      inline(heading[2], h);
      into.append(h);
      i++;
      continue;
    }
    const listItem = /^\s*([-*+]|\d+[.)])\s+/;
    if (listItem.test(line)) {
      flush();
      const list = el(/^\s*\d/.test(line) ? "ol" : "ul");
      for (; i < lines.length && listItem.test(lines[i]); i++) {
        const li = el("li");
        inline(lines[i].replace(listItem, ""), li);
        list.append(li);
      }
      into.append(list);
      continue;
    }
    if (line.trim() === "") flush();
    else paragraph.push(line);
    i++;
  }
  flush();
}

// Every part of the pattern is bounded and none can start inside another's failed attempt, so a
// line of text is scanned in linear time whatever it holds (40,000 `[` used to take seconds):
// a code span is 1-3 backticks around at most 2000 others; a link's label cannot contain a `[`
// and its URL stops at a bracket.
function inline(text, into) {
  const pattern = /(`{1,3})([^`]{1,2000}?)\1(?!`)|\*\*([^*]{1,2000})\*\*|\*([^*\s][^*]{0,2000})\*|\[([^[\]\n]{1,500})\]\((https?:\/\/[^\s()[\]<>]{1,2048})\)/g;
  let last = 0;
  for (let m; (m = pattern.exec(text)); ) {
    if (m.index > last) plain(text.slice(last, m.index), into);
    let node;
    if (m[1]) {
      node = el("code");
      node.textContent = m[2];
    } else if (m[3]) {
      node = el("strong");
      node.textContent = m[3];
    } else if (m[4]) {
      node = el("em");
      node.textContent = m[4];
    } else {
      node = el("a");
      node.textContent = m[5];
      node.href = m[6]; // http(s) only, by the pattern
      node.rel = "noopener noreferrer nofollow";
      node.target = "_blank";
    }
    into.append(node);
    last = pattern.lastIndex;
  }
  if (last < text.length) plain(text.slice(last), into);
}

function plain(text, into) {
  text.split("\n").forEach((part, i) => {
    if (i) into.append(el("br"));
    into.append(document.createTextNode(part));
  });
}

// ----- messages ----------------------------------------------------------------------------

function userBubble(text, turn) {
  const li = el("li", "user");
  li.dataset.turn = turn;
  li.textContent = text;
  $("messages").append(li);
  return li;
}

function assistantBubble(turn) {
  const li = el("li", "assistant");
  li.dataset.turn = turn;
  li.dataset.raw = "";
  li.append(el("div", "body"));
  $("messages").append(li);
  return li;
}

// ----- tools a reply used ----------------------------------------------------------------

/// The bubble's list of tool calls, created above its text on first use.
function toolList(bubble) {
  let list = bubble.querySelector("ul.tools");
  if (!list) {
    list = el("ul", "tools");
    bubble.prepend(list);
  }
  return list;
}

/// A tool call, shown as "name arguments …" until its result arrives (once per call id).
function showToolCall(bubble, call) {
  const list = toolList(bubble);
  if ([...list.children].some((li) => li.dataset.id === call.id)) return;
  const li = el("li", "tool");
  li.dataset.id = call.id;
  li.dataset.state = "running";
  li.dataset.call = call.name + (call.arguments && call.arguments !== "{}" ? " " + call.arguments : "");
  li.textContent = "Using " + li.dataset.call + " …";
  list.append(li);
}

/// A tool's answer, next to its call: "name arguments → result" (the start of a long one).
function showToolResult(bubble, result) {
  showToolCall(bubble, { id: result.id, name: result.name, arguments: "" });
  const li = [...toolList(bubble).children].find((n) => n.dataset.id === result.id);
  const content = String(result.content ?? result.result ?? "");
  const shown = content.length > 200 ? content.slice(0, 200) + "…" : content;
  li.dataset.state = result.is_error ? "failed" : "done";
  li.textContent = "Used " + li.dataset.call + " → " + shown;
}

function setReply(bubble, text, status, detail) {
  bubble.dataset.raw = text;
  bubble.dataset.state = status;
  renderMarkdown(text, bubble.querySelector(".body"));
  bubble.querySelector(".meta")?.remove();
  bubble.classList.toggle("failed", status === "failed");
  if (detail) {
    const meta = el("span", "meta");
    meta.textContent = detail;
    bubble.append(meta);
  }
}

/// What writing a reply consumed and cost, shown on hover: its tokens by kind, and its cost when
/// the server knows one (it never guesses one).
function showUsage(bubble, usage, cost) {
  if (!usage) return bubble.removeAttribute("title");
  let text = usage.input_tokens + " tokens in";
  if (usage.cache_read_tokens) text += " + " + usage.cache_read_tokens + " from cache";
  if (usage.cache_write_tokens) text += " + " + usage.cache_write_tokens + " to cache";
  text += ", " + usage.output_tokens + " out";
  if (typeof cost === "number") text += " · $" + cost.toFixed(6);
  bubble.title = text;
}

function stopDetail(reason) {
  if (reason === "reply_limit") return "Stopped: the reply reached its size limit.";
  if (reason) return "Stopped.";
  return "";
}

function scrollDown() {
  const list = $("messages");
  list.scrollTop = list.scrollHeight;
}

function generating(on) {
  $("stop").hidden = !on;
  $("send").disabled = on;
}

// ----- the stream --------------------------------------------------------------------------

function closeStream() {
  if (state.stream) {
    state.stream.source.close();
    state.stream.stopPainting?.();
  }
  state.stream = null;
  connection("");
  generating(false);
  updateControls();
}

/// Follows `turn` of `session` into `bubble` from the start (or after `lastId`): the stream replays
/// what was written, then relays live, so a reload shows the whole reply, once.
function follow(session, turn, bubble, lastId, limited = 0) {
  closeStream();
  const url = new URL(STREAM + "/sessions/" + encodeURIComponent(session) + "/stream?turn=" + turn, location.href);
  if (state.token) url.searchParams.set("access_token", state.token);
  if (lastId) url.searchParams.set("last_event_id", lastId);
  const source = new EventSource(url);
  const stream = { source, bubble, session, turn, lastId, limited, text: bubble.dataset.raw || "", stopped: null };
  state.stream = stream;
  generating(true);
  updateControls();
  bubble.dataset.state = "streaming";
  // The reply is rendered again as it grows, at most every 100 ms, and less often as it gets
  // long (rendering is linear, but a long reply re-rendered every frame is not).
  let timer = 0;
  const paint = () => {
    timer = 0;
    setReply(bubble, stream.text, "streaming");
    scrollDown();
  };
  stream.stopPainting = () => clearTimeout(timer);
  source.onopen = () => {
    connection("");
    stream.limited = 0;
  };
  source.addEventListener("token", (e) => {
    stream.text += e.data;
    stream.lastId = e.lastEventId;
    if (!timer) timer = setTimeout(paint, Math.max(100, Math.min(2000, stream.text.length / 100)));
  });
  source.addEventListener("tool_call", (e) => {
    stream.lastId = e.lastEventId;
    showToolCall(bubble, JSON.parse(e.data));
    scrollDown();
  });
  source.addEventListener("tool_result", (e) => {
    stream.lastId = e.lastEventId;
    showToolResult(bubble, JSON.parse(e.data));
    scrollDown();
  });
  source.addEventListener("message_end", (e) => {
    const end = JSON.parse(e.data);
    stream.stopped = end.stopped ? end.reason || "cancelled" : null;
    stream.usage = end.usage;
    stream.cost = end.cost_usd;
  });
  source.addEventListener("commit_done", () => {
    stream.stopPainting();
    setReply(bubble, stream.text, stream.stopped ? "stopped" : "done", stopDetail(stream.stopped));
    showUsage(bubble, stream.usage, stream.cost);
    closeStream();
    loadSessions();
  });
  source.addEventListener("error", (e) => {
    if (e.data) {
      const error = JSON.parse(e.data);
      if (error.code === "token_expired") {
        // The stream outlived the sign-in it was opened with: sign in again to go on.
        return signOut("Your sign-in has expired. Sign in again.");
      }
      if (error.code === "store_unavailable") {
        // A passing fault: the server asked for a reconnect (retry:), and the browser resumes
        // after the last token it got.
        connection("Reconnecting…");
        return;
      }
      // The turn ended without a reply: the server says why.
      setReply(bubble, stream.text, "failed", error.message || "The reply failed.");
      closeStream();
      notice("The assistant could not answer: " + (error.message || error.code), () => retryLast());
      loadSessions();
      return;
    }
    // SSE that keeps failing (refused, or a proxy in the way) gives way to long-polling the
    // turn's log, from the last token this page has.
    stream.failures = (stream.failures || 0) + 1;
    if (state.stream === stream && (source.readyState === EventSource.CLOSED || stream.failures >= 3)) {
      source.close();
      return fallBack(stream, url);
    }
    if (source.readyState === EventSource.CONNECTING) {
      // The browser reconnects by itself, sending Last-Event-ID: the stream resumes after it.
      connection("Reconnecting…");
    }
  });
  source.addEventListener("token", () => (stream.failures = 0));
}

/// Follows `stream`'s turn again from the last token it got, keeping every token it got (some
/// may not be painted yet).
function followAgain(stream, limited) {
  stream.stopPainting?.();
  stream.bubble.dataset.raw = stream.text;
  follow(stream.session, stream.turn, stream.bubble, stream.lastId, limited);
}

/// SSE failed: a limit the server set (429: too many streams open) is told as it is; anything
/// else (a proxy in the way) is worked around by long-polling.
async function fallBack(stream, url) {
  const probe = new AbortController();
  const timer = setTimeout(() => probe.abort(), 5000);
  const headers = state.token ? { authorization: "Bearer " + state.token } : {};
  // The token rides in the header here, not in the address.
  const bare = new URL(url);
  bare.searchParams.delete("access_token");
  const response = await fetch(bare, { headers, signal: probe.signal }).catch(() => null);
  clearTimeout(timer);
  probe.abort();
  if (state.stream !== stream) return;
  if (response && response.status === 429 && stream.limited < 3) {
    // A stream this page just left (a reload) holds its slot until its relay notices, a moment
    // later: try again after about 1, 2, 4 s (at most Retry-After, at least 1 s; spread, so tabs
    // do not all come back at once) before saying anything.
    const asked = Number(response.headers.get("retry-after"));
    const most = Number.isFinite(asked) && asked > 0 ? asked : 5;
    const wait = Math.max(1, Math.min(most, 2 ** stream.limited)) * (0.75 + Math.random() / 2);
    connection("Waiting for a free stream…");
    setTimeout(() => {
      if (state.stream === stream) followAgain(stream, stream.limited + 1);
    }, wait * 1000);
    return;
  }
  if (response && response.status === 429) {
    connection("");
    notice("You have too many replies open in other tabs; close one and retry.", () => followAgain(stream, 0));
    generating(false);
    return;
  }
  followByLongPoll(stream);
}

/// Follows a reply by long-polling its turn's log (the Durable Streams read protocol): where SSE
/// does not get through. The text arrives as it is written; once the log is closed, the chat is
/// read again to show how the turn ended, with its tools and usage.
async function followByLongPoll(stream) {
  const { session, turn, bubble } = stream;
  const headers = {};
  if (state.token) headers.authorization = "Bearer " + state.token;
  const next = stream.lastId ? Number(stream.lastId.split(":")[1]) + 1 : 0;
  let offset = String(next).padStart(16, "0");
  let cursor = "";
  let failures = 0;
  const aborter = new AbortController();
  stream.source = {
    close: () => {
      stream.closed = true;
      aborter.abort();
    },
  };
  connection("");
  while (state.stream === stream && !stream.closed) {
    const url = new URL(STREAM + "/sessions/" + encodeURIComponent(session) + "/turns/" + turn + "/log", location.href);
    url.searchParams.set("offset", offset);
    url.searchParams.set("live", "long-poll");
    if (cursor) url.searchParams.set("cursor", cursor);
    let response;
    try {
      response = await fetch(url, { headers, signal: aborter.signal });
    } catch {
      if (stream.closed) return;
      response = null;
    }
    if (!response || !(response.ok || response.status === 204)) {
      if (response && response.status === 401) return signOut("Your sign-in has expired. Sign in again.");
      if (++failures >= 5) {
        connection("Disconnected");
        notice("The connection to the reply was lost.", () => follow(session, turn, bubble, stream.lastId));
        generating(false);
        return;
      }
      connection("Reconnecting…");
      await new Promise((resolve) => setTimeout(resolve, 1000 * failures));
      continue;
    }
    failures = 0;
    connection("");
    if (response.status === 200) {
      const text = await response.text();
      if (state.stream !== stream) return;
      stream.text += text;
      setReply(bubble, stream.text, "streaming");
      scrollDown();
    }
    offset = response.headers.get("stream-next-offset") || offset;
    cursor = response.headers.get("stream-cursor") || cursor;
    const index = Number(offset) - 1;
    if (index >= 0) stream.lastId = turn + ":" + index;
    if (response.headers.get("stream-closed") === "true") {
      closeStream();
      await openSession(session);
      loadSessions();
      return;
    }
  }
}

// ----- sessions ----------------------------------------------------------------------------

async function loadSessions(more) {
  try {
    let path = "/users/" + encodeURIComponent(state.user) + "/sessions?limit=20";
    if (more && state.sessionsCursor) path += "&cursor=" + encodeURIComponent(state.sessionsCursor);
    const page = await api("GET", path);
    const list = $("sessions");
    if (!more) list.replaceChildren();
    for (const session of page.sessions) {
      const li = el("li");
      const a = el("a");
      a.href = "#" + session.id;
      a.dataset.session = session.id;
      a.textContent = session.title || "New chat";
      const small = el("small");
      small.textContent = ago(session.updated_at);
      small.title = new Date(session.updated_at).toLocaleString();
      a.append(small);
      if (session.id === state.session) {
        a.setAttribute("aria-current", "true");
        // The open chat's name as the server has it now (the small model may have named it).
        if ($("title-form").hidden) $("chat-title").textContent = session.title || "New chat";
      }
      li.append(a);
      list.append(li);
    }
    state.sessionsCursor = page.next_cursor;
    $("more-sessions").hidden = !page.next_cursor;
    return true;
  } catch (err) {
    fail(err, () => loadSessions(more));
    return false;
  }
}

/// How long ago an instant was, in words: "just now", "5 min ago", "3 h ago", "yesterday", a date.
function ago(iso) {
  const seconds = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (seconds < 45) return "just now";
  if (seconds < 3600) return Math.max(1, Math.round(seconds / 60)) + " min ago";
  if (seconds < 86400) return Math.round(seconds / 3600) + " h ago";
  if (seconds < 2 * 86400) return "yesterday";
  return new Date(iso).toLocaleDateString();
}

/// The open chat's bar: its name, and renaming and exporting it.
function showChatBar(title) {
  $("chat-bar").hidden = !state.session;
  $("chat-title").textContent = title || "New chat";
  $("chat-title").hidden = false;
  $("title-form").hidden = true;
  $("rename").hidden = false;
}

function startRename() {
  $("title-input").value = $("chat-title").textContent;
  $("chat-title").hidden = true;
  $("rename").hidden = true;
  $("title-form").hidden = false;
  $("title-input").focus();
  $("title-input").select();
}

async function rename(title) {
  clearNotice();
  let renamed;
  try {
    renamed = await api("PATCH", "/sessions/" + encodeURIComponent(state.session), { title });
  } catch (err) {
    return fail(err, () => rename(title));
  }
  showChatBar(renamed.title);
  loadSessions();
}

/// Downloads the whole chat as Markdown or JSON.
async function exportChat(format) {
  clearNotice();
  const headers = {};
  if (state.token) headers.authorization = "Bearer " + state.token;
  let response;
  try {
    response = await fetch(API + "/sessions/" + encodeURIComponent(state.session) + "/export?format=" + format, { headers });
  } catch {
    return notice("The server cannot be reached. Check your connection and try again.", () => exportChat(format));
  }
  if (!response.ok) {
    const error = ((await response.json().catch(() => null)) || {}).error || {};
    return fail(new ApiError(response.status, error.code || "http_" + response.status, error.message || response.statusText), () => exportChat(format));
  }
  const blob = await response.blob();
  const link = el("a");
  link.href = URL.createObjectURL(blob);
  link.download = "chat-" + state.session + (format === "markdown" ? ".md" : ".json");
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10000);
}

async function openSession(id, older) {
  clearNotice();
  if (!older) closeStream();
  let page;
  try {
    let path = "/sessions/" + encodeURIComponent(id) + "?limit=20";
    if (older && state.olderCursor) path += "&cursor=" + encodeURIComponent(state.olderCursor);
    page = await api("GET", path);
  } catch (err) {
    if (!older) {
      state.session = null;
      showChatBar();
      $("messages").replaceChildren();
      if (err.status === 404) history.replaceState(null, "", location.pathname + location.search);
    }
    return fail(err, () => openSession(id, older));
  }
  const session = page.session;
  state.session = session.id;
  if (!older) showChatBar(session.title);
  state.olderCursor = page.next_cursor;
  $("older").hidden = !page.next_cursor;
  for (const a of document.querySelectorAll("#sessions a")) {
    a.toggleAttribute("aria-current", a.dataset.session === session.id);
  }
  const list = $("messages");
  const firstBefore = older ? list.firstChild : null;
  if (!older) list.replaceChildren();
  const nodes = [];
  let pending = null;
  for (const message of session.messages) {
    const turn = Number(message.id.split(":")[1]);
    if (message.role === "user") {
      const li = el("li", "user");
      li.dataset.turn = turn;
      li.textContent = message.content;
      if (message.superseded_by) markSuperseded(li, message.superseded_by);
      nodes.push(li);
    } else {
      const li = el("li", "assistant");
      li.dataset.turn = turn;
      li.append(el("div", "body"));
      nodes.push(li);
      for (const use of message.tool_calls || []) {
        showToolCall(li, use);
        showToolResult(li, use);
      }
      setReply(li, message.content, message.stopped ? "stopped" : "done", stopDetail(message.stop_reason || (message.stopped ? "cancelled" : null)));
      showUsage(li, message.usage, message.cost_usd);
      if (message.superseded_by) markSuperseded(li, message.superseded_by);
    }
  }
  for (const node of nodes) list.insertBefore(node, firstBefore);
  if (older) return updateControls();
  const latest = session.turn;
  state.lastTurn = latest;
  endEdit();
  const answered = session.messages.some((m) => m.role === "assistant" && m.id.endsWith(":" + latest + ":assistant"));
  if (IN_FLIGHT.has(session.state) && !answered) {
    // A reply is on its way (or this page was reloaded mid-reply): follow it from the start.
    pending = assistantBubble(latest);
    follow(session.id, latest, pending);
  } else if (!answered && (session.state === "error" || session.state === "timeout") && latest > 0) {
    const li = assistantBubble(latest);
    setReply(li, "", "failed", session.error || "The assistant could not answer this message.");
  }
  updateControls();
  scrollDown();
}

// ----- sending -----------------------------------------------------------------------------

let lastSend = null;

async function send(text, key) {
  clearNotice();
  const body = { message: text, client_message_id: key };
  if (state.session) body.session_id = state.session;
  lastSend = { text, key, session: state.session };
  $("send").disabled = true;
  let accepted;
  try {
    accepted = await starting(api("POST", "/sessions/" + encodeURIComponent(state.user) + "/messages", body));
  } catch (err) {
    $("send").disabled = false;
    return fail(err, () => send(text, key));
  }
  $("input").value = "";
  if (accepted.session_id !== state.session) {
    state.session = accepted.session_id;
    history.replaceState(null, "", "#" + accepted.session_id);
    $("messages").replaceChildren();
    showChatBar("New chat");
    loadSessions();
  }
  state.lastTurn = accepted.turn;
  dropTurn(accepted.turn);
  userBubble(text, accepted.turn);
  const bubble = assistantBubble(accepted.turn);
  scrollDown();
  follow(accepted.session_id, accepted.turn, bubble);
}

/// Counts a request that may start a turn while it is unanswered: the feed's news of that turn
/// is this tab's own, which it shows itself.
async function starting(request) {
  state.starting++;
  try {
    return await request;
  } finally {
    state.starting--;
  }
}

/// Removes a turn's bubbles, so showing it again never shows it twice.
function dropTurn(turn) {
  for (const li of document.querySelectorAll('#messages > li[data-turn="' + turn + '"]')) li.remove();
}

// ----- regenerate, edit, fork --------------------------------------------------------------

function button(label, action, onClick) {
  const b = el("button");
  b.type = "button";
  b.textContent = label;
  b.dataset.action = action;
  b.addEventListener("click", onClick);
  return b;
}

/// A turn a regenerate or an edit redid: kept, shown as an earlier version.
function markSuperseded(li, by) {
  li.classList.add("superseded");
  li.dataset.supersededBy = by;
}

/// The finished replies' controls, while no reply is being written: Fork on every answered turn,
/// Regenerate on the last turn's reply (answered or failed), and Edit on the last turn's message.
function updateControls() {
  for (const controls of document.querySelectorAll("#messages .controls")) controls.remove();
  if (state.stream || !state.session) return;
  for (const bubble of document.querySelectorAll("#messages li.assistant")) {
    const turn = Number(bubble.dataset.turn);
    const controls = el("div", "controls");
    if (turn === state.lastTurn) {
      controls.append(button("Regenerate", "regenerate", () => regenerate(turn, crypto.randomUUID())));
      controls.append(button("Edit", "edit", () => startEdit(turn)));
    }
    if (bubble.dataset.state === "done" || bubble.dataset.state === "stopped") {
      controls.append(button("Fork", "fork", () => fork(turn, crypto.randomUUID())));
    }
    if (controls.childElementCount) bubble.append(controls);
  }
}

/// A new turn redoing the last one was accepted: the redone turn stays, marked, and the new
/// reply streams below it.
function revised(accepted) {
  for (const li of document.querySelectorAll('#messages li[data-turn="' + accepted.revises + '"]')) {
    markSuperseded(li, accepted.turn);
  }
  state.lastTurn = accepted.turn;
  dropTurn(accepted.turn);
  userBubble(accepted.message, accepted.turn);
  const bubble = assistantBubble(accepted.turn);
  scrollDown();
  follow(accepted.session_id, accepted.turn, bubble);
}

async function regenerate(turn, key) {
  clearNotice();
  let accepted;
  try {
    accepted = await starting(api("POST", "/sessions/" + encodeURIComponent(state.session) + "/regenerate", { turn, client_message_id: key }));
  } catch (err) {
    return fail(err, () => regenerate(turn, key));
  }
  revised(accepted);
}

/// Puts the last turn's message in the composer; sending it then redoes the turn with the new text.
function startEdit(turn) {
  const message = document.querySelector('#messages li.user[data-turn="' + turn + '"]');
  state.editing = turn;
  $("input").value = message ? message.textContent : "";
  $("send").textContent = "Save & send";
  $("cancel-edit").hidden = false;
  $("input").focus();
}

function endEdit() {
  state.editing = null;
  $("send").textContent = "Send";
  $("cancel-edit").hidden = true;
}

async function edit(turn, text, key) {
  clearNotice();
  $("send").disabled = true;
  let accepted;
  try {
    accepted = await starting(api("POST", "/sessions/" + encodeURIComponent(state.session) + "/edit", { turn, message: text, client_message_id: key }));
  } catch (err) {
    $("send").disabled = false;
    return fail(err, () => edit(turn, text, key));
  }
  endEdit();
  $("input").value = "";
  revised(accepted);
}

/// A new chat with this one's history up to `turn`, opened.
async function fork(turn, key) {
  clearNotice();
  let forked;
  try {
    forked = await api("POST", "/sessions/" + encodeURIComponent(state.session) + "/fork", { turn, client_message_id: key });
  } catch (err) {
    return fail(err, () => fork(turn, key));
  }
  history.replaceState(null, "", "#" + forked.session_id);
  await loadSessions();
  await openSession(forked.session_id);
}

/// Sends the last message again as a new turn (after the assistant failed to answer it).
function retryLast() {
  if (lastSend) send(lastSend.text, crypto.randomUUID());
}

async function stop() {
  if (!state.stream) return;
  $("stop").disabled = true;
  try {
    await api("POST", "/sessions/" + encodeURIComponent(state.stream.session) + "/cancel");
  } catch (err) {
    if (err.code !== "no_turn_in_flight") fail(err, stop);
  } finally {
    $("stop").disabled = false;
  }
}

// ----- the feed: what the user's other tabs do -------------------------------------------

/// Follows the user's feed: another tab's new chat, rename or delete refreshes the list, and a
/// turn another tab starts in the open chat streams here too. The feed is a hint: on every
/// (re)connect the page reloads what it shows.
function openFeed() {
  closeFeed();
  const url = new URL(STREAM + "/users/" + encodeURIComponent(state.user) + "/events", location.href);
  if (state.token) url.searchParams.set("access_token", state.token);
  const feed = new EventSource(url);
  state.feed = feed;
  let opened = false;
  feed.onopen = () => {
    if (opened) {
      loadSessions();
      if (state.session && !state.stream) openSession(state.session);
    }
    opened = true;
  };
  // A burst of news reloads the list once.
  let reload = 0;
  const listChanged = () => {
    clearTimeout(reload);
    reload = setTimeout(() => loadSessions(), 300);
  };
  feed.addEventListener("session_created", listChanged);
  feed.addEventListener("session_renamed", listChanged);
  feed.addEventListener("session_deleted", (e) => {
    listChanged();
    if (JSON.parse(e.data).session_id === state.session) {
      closeStream();
      state.session = null;
      showChatBar();
      $("messages").replaceChildren();
      history.replaceState(null, "", location.pathname + location.search);
      notice("This chat was deleted in another tab.");
    }
  });
  feed.addEventListener("turn_started", (e) => {
    const event = JSON.parse(e.data);
    listChanged();
    // Another tab's turn in the open chat: show its message and follow its reply live.
    const shown = document.querySelector('#messages li.user[data-turn="' + event.turn + '"]');
    if (event.session_id === state.session && !state.stream && !state.starting && !shown) openSession(state.session);
  });
  feed.addEventListener("turn_ended", (e) => {
    const event = JSON.parse(e.data);
    listChanged();
    const following = state.stream && state.stream.session === event.session_id;
    const reply = document.querySelector('#messages li.assistant[data-turn="' + event.turn + '"]');
    const ended = reply && ["done", "stopped", "failed"].includes(reply.dataset.state);
    if (event.session_id === state.session && !following && !state.starting && !ended) openSession(state.session);
  });
  feed.addEventListener("resync", () => {
    loadSessions();
    if (state.session && !state.stream) openSession(state.session);
  });
  feed.addEventListener("error", (e) => {
    if (e.data && JSON.parse(e.data).code === "token_expired") return signOut("Your sign-in has expired. Sign in again.");
    // Refused (too many tabs, say): the browser gives up on it, the page tries again later.
    if (feed.readyState === EventSource.CLOSED && state.feed === feed) setTimeout(() => state.feed === feed && openFeed(), 30000);
  });
}

// A hidden tab lets its feed go (it holds a stream and a Lambda), and catches up when shown.
document.addEventListener("visibilitychange", () => {
  if (!state.user) return;
  if (document.hidden) return closeFeed();
  if (!state.feed) {
    openFeed();
    loadSessions();
    if (state.session && !state.stream) openSession(state.session);
  }
});

function closeFeed() {
  if (state.feed) state.feed.close();
  state.feed = null;
}

// ----- signing in --------------------------------------------------------------------------

function subjectOf(token) {
  try {
    const payload = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(payload)).sub || null;
  } catch {
    return null;
  }
}

function signOut(why) {
  closeStream();
  closeFeed();
  localStorage.removeItem("chat.user");
  localStorage.removeItem("chat.token");
  state.user = state.token = state.session = null;
  history.replaceState(null, "", location.pathname + location.search);
  $("messages").replaceChildren();
  $("sessions").replaceChildren();
  clearNotice();
  $("sign-in-error").textContent = why || "";
  showSignIn();
}

function showSignIn() {
  $("app").hidden = true;
  $("sign-out").hidden = true;
  $("whoami").textContent = "";
  $("sign-in").hidden = false;
}

async function signIn(user, token) {
  state.user = user;
  state.token = token;
  // Proves the sign-in works before the page commits to it.
  try {
    await api("GET", "/users/" + encodeURIComponent(user) + "/sessions?limit=1");
  } catch (err) {
    state.user = state.token = null;
    throw err;
  }
  localStorage.setItem("chat.user", user);
  if (token) localStorage.setItem("chat.token", token);
  else localStorage.removeItem("chat.token");
  enter();
}

async function enter() {
  $("sign-in").hidden = true;
  $("app").hidden = false;
  $("sign-out").hidden = false;
  $("whoami").textContent = "Signed in as " + state.user;
  const listed = await loadSessions();
  openFeed();
  const id = location.hash.slice(1);
  if (listed && id) await openSession(id);
  $("input").focus();
}

$("token-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const token = $("token").value.trim();
  const sub = subjectOf(token);
  if (!sub) {
    $("sign-in-error").textContent = "That is not a token with a subject (sub). Paste the whole ID or access token.";
    return;
  }
  try {
    await signIn(sub, token);
  } catch (err) {
    $("sign-in-error").textContent = err.status === 401 ? "The server did not accept that token: " + err.message : describe(err);
  }
});

$("name-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const name = $("name").value.trim();
  if (!name) return;
  try {
    await signIn(name, null);
    return;
  } catch (err) {
    if (err.status !== 401) {
      $("sign-in-error").textContent = describe(err);
      return;
    }
  }
  // The server wants a token: a local stack's own issuer gives development tokens.
  try {
    const minted = await api("POST", "/dev/token", { sub: name });
    await signIn(name, minted.token);
  } catch {
    $("sign-in-error").textContent = "This server needs a token from your identity provider: paste it above.";
  }
});

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("input").value;
  if (!text.trim() || state.stream) return;
  if (state.editing !== null) edit(state.editing, text, crypto.randomUUID());
  else send(text, crypto.randomUUID());
});
$("rename").addEventListener("click", startRename);
$("title-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const title = $("title-input").value.trim();
  if (title) rename(title);
  else showChatBar($("chat-title").textContent);
});
$("title-input").addEventListener("keydown", (e) => {
  if (e.key === "Escape") showChatBar($("chat-title").textContent);
});
$("export-md").addEventListener("click", () => exportChat("markdown"));
$("export-json").addEventListener("click", () => exportChat("json"));
$("cancel-edit").addEventListener("click", () => {
  endEdit();
  $("input").value = "";
});
$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", stop);
$("new-chat").addEventListener("click", () => {
  closeStream();
  clearNotice();
  state.session = null;
  state.lastTurn = 0;
  endEdit();
  showChatBar();
  history.replaceState(null, "", location.pathname + location.search);
  $("messages").replaceChildren();
  $("older").hidden = true;
  for (const a of document.querySelectorAll("#sessions a")) a.removeAttribute("aria-current");
  $("input").focus();
});
$("sessions").addEventListener("click", (e) => {
  const a = e.target.closest("a[data-session]");
  if (!a) return;
  e.preventDefault();
  history.replaceState(null, "", "#" + a.dataset.session);
  openSession(a.dataset.session);
});
$("more-sessions").addEventListener("click", () => loadSessions(true));
$("older").addEventListener("click", () => state.session && openSession(state.session, true));
$("notice-retry").addEventListener("click", () => {
  const retry = state.retry;
  clearNotice();
  if (retry) retry();
});
$("sign-out").addEventListener("click", () => signOut());
window.addEventListener("offline", () => connection("Offline"));
window.addEventListener("online", () => connection(state.stream ? "Reconnecting…" : ""));

if (state.user) enter();
else showSignIn();
