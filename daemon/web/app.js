// The daemon's web page: a client of the public websocket protocol (docs/protocol.md) and nothing else.
// Every text from the server (transcripts, model output, stream names, file paths) is untrusted: it is only ever
// set with textContent or as an attribute value, never parsed as HTML.

const $ = (id) => document.getElementById(id);
const PROTOCOL = 1;
const BACKOFF_S = [0.5, 1, 2, 4, 8, 10];

const state = {
  ws: null,
  token: sessionStorage.getItem("ltu-token") || null,
  refused: false, // the daemon refused our token: wait for a new one instead of retrying
  attempt: 0,
  seq: new Map(), // "stream type" → last seq seen
  missed: 0,
  nextId: 0,
  asking: null, // the id of the question being answered
  learning: false, // the daemon answers label.list: labelling controls are shown
  learnIds: new Set(), // ids of our learning messages, whose errors go to the learning section
  streams: new Map(), // name → {item, meter, state}
};

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function clock(seconds) {
  return `${Number(seconds).toFixed(1)} s`;
}

function wall(unix) {
  return unix ? new Date(unix * 1000).toLocaleTimeString() : "";
}

function prepend(list, item, keep = 200) {
  list.prepend(item);
  while (list.children.length > keep) list.lastElementChild.remove();
}

function setConnection(text, cls) {
  const c = $("connection");
  c.textContent = text;
  c.className = cls || "";
}

function send(message) {
  if (!state.ws || state.ws.readyState !== WebSocket.OPEN) return null;
  state.nextId += 1;
  const id = `w${state.nextId}`;
  state.ws.send(JSON.stringify({ id, ...message }));
  return id;
}

// --- connection -------------------------------------------------------------------------------------------

function connect() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const ws = new WebSocket(`${scheme}//${location.host}/`);
  state.ws = ws;
  setConnection("connecting…");
  ws.addEventListener("open", () => {
    const hello = { type: "hello", protocol: PROTOCOL, client: "ltu-web", subscribe: { streams: ["*"], events: ["*"] } };
    if (state.token) hello.token = state.token;
    ws.send(JSON.stringify({ id: "hello", ...hello }));
  });
  ws.addEventListener("message", (m) => {
    if (typeof m.data !== "string") return;
    let msg;
    try {
      msg = JSON.parse(m.data);
    } catch {
      return;
    }
    handle(msg);
  });
  ws.addEventListener("close", () => {
    if (state.ws !== ws) return; // an older connection, already replaced
    state.ws = null;
    if (state.refused) return;
    const wait = BACKOFF_S[Math.min(state.attempt, BACKOFF_S.length - 1)];
    state.attempt += 1;
    setConnection(`disconnected; reconnecting in ${wait} s`, "bad");
    setTimeout(connect, wait * 1000);
  });
}

$("token-form").addEventListener("submit", (e) => {
  e.preventDefault();
  state.token = $("token").value || null;
  if (state.token) sessionStorage.setItem("ltu-token", state.token);
  else sessionStorage.removeItem("ltu-token");
  state.refused = false;
  state.attempt = 0;
  $("token-form").hidden = true;
  const old = state.ws;
  state.ws = null;
  if (old) old.close();
  connect();
});

// --- events -----------------------------------------------------------------------------------------------

function checkSeq(msg) {
  if (!msg.stream || !msg.seq) return;
  const key = `${msg.stream} ${msg.type}`;
  const last = state.seq.get(key);
  if (last !== undefined && msg.seq > last + 1) {
    // the daemon drops level and partial events first for a client that falls behind; this says how many
    state.missed += msg.seq - last - 1;
    $("missed").textContent = `missed ${state.missed} events`;
    $("missed").hidden = false;
  }
  state.seq.set(key, msg.seq);
}

function handle(msg) {
  checkSeq(msg);
  switch (msg.type) {
    case "welcome": return welcome(msg);
    case "error": return error(msg);
    case "level": return level(msg);
    case "transcript.partial":
    case "transcript.final": return transcript(msg);
    case "stream.status": return streamStatus(msg.stream, msg.state, msg.detail);
    case "stream.gap": return prepend($("transcript"), el("li", `${msg.stream}: ${msg.duration_s} s of audio lost (${msg.reason})`, "missed"));
    case "scene": return scene(msg);
    case "alert": return alert(msg);
    case "alert.cleared": return alertCleared(msg);
    case "digest": return prepend($("digests"), el("li", `${msg.stream} ${wall(msg.since)}–${wall(msg.until)}: ${msg.text}`));
    case "answer.start":
    case "answer.delta":
    case "answer.done": return answer(msg);
    case "history.results": return results(msg);
    case "timeline.data": return timeline(msg);
    case "labels": return labels(msg);
    case "labelled":
    case "label.removed": return send({ type: "label.list" });
    case "learn.started": return learnStatus(`learning started (${msg.job})`, 0, 0);
    case "learn.progress": return learnStatus(`${msg.phase}: ${msg.detail}`, msg.done, msg.total);
    case "learn.done": return learnDone(msg);
    case "learn.rolled_back":
      learnStatus(`back to ${msg.checkpoint}`);
      return send({ type: "label.list" });
    default: return undefined;
  }
}

function welcome(msg) {
  state.attempt = 0;
  $("token-form").hidden = true;
  setConnection("connected", "good");
  $("server").textContent = `${msg.server}${msg.model ? "" : " (transcripts only)"}`;
  $("demo").hidden = !msg.demo;
  privacy();
  const select = $("ask-stream");
  select.replaceChildren(el("option", "any"));
  select.firstChild.value = "";
  const filter = $("tl-stream");
  const chosen = filter.value;
  filter.replaceChildren(el("option", "all"));
  filter.firstChild.value = "";
  for (const s of msg.streams) {
    streamStatus(s.name, s.state, s.kind);
    for (const list of [select, filter]) {
      const o = el("option", s.name);
      o.value = s.name;
      list.append(o);
    }
  }
  filter.value = chosen;
  requestTimeline();
  if (msg.model) state.learnIds.add(send({ type: "label.list" }));
}

async function privacy() {
  // what the daemon keeps, from its health report (same origin, no token needed)
  try {
    const health = await (await fetch("/healthz")).json();
    const store = health.store || {};
    $("privacy").textContent = store.enabled === false
      ? "Audio is not stored, and nothing is kept: there is no history store."
      : `Audio is not stored${store.clips ? ", except short clips around alerts" : ""}; transcripts and scene ` +
        `descriptions are kept for ${store.retention_days} days in the history store.`;
  } catch {
    $("privacy").textContent = "";
  }
}

function error(msg) {
  if (msg.code === "unauthorized") {
    state.refused = true;
    setConnection(state.token ? "the daemon refused this token" : "this daemon needs a token", "bad");
    $("token-form").hidden = false;
    $("token").focus();
    return;
  }
  if (msg.re && state.learnIds.has(msg.re)) {
    state.learnIds.delete(msg.re);
    if (msg.code === "learn_disabled") return undefined; // learning is off: its controls stay hidden
    $("learn-now").disabled = false;
    return learnStatus(`${msg.code}: ${msg.message}`);
  }
  const where = msg.re && msg.re === state.asking ? $("answer") : null;
  if (where) where.textContent = `error: ${msg.code}: ${msg.message}`;
  else prepend($("transcript"), el("li", `error ${msg.code}: ${msg.message}`, "missed"));
}

function streamStatus(name, st, detail) {
  let s = state.streams.get(name);
  if (!s) {
    const item = el("li");
    const label = el("span", name, "name");
    const meter = document.createElement("meter");
    meter.min = -90; meter.max = 0; meter.low = -60; meter.high = -6; meter.value = -90;
    meter.setAttribute("aria-label", `${name} level (dBFS)`);
    const db = el("span", "", "db");
    const info = el("span", "", "state");
    item.append(label, meter, db, info);
    $("streams").append(item);
    s = { item, meter, db, info };
    state.streams.set(name, s);
  }
  s.info.textContent = detail ? `${st} (${detail})` : st;
}

function level(msg) {
  const s = state.streams.get(msg.stream);
  if (!s) return;
  s.meter.value = Math.max(-90, msg.rms_dbfs);
  s.db.textContent = `${msg.rms_dbfs.toFixed(0)} dBFS`;
}

function transcript(msg) {
  let line = document.querySelector(`[data-utterance="${CSS.escape(msg.id)}"]`);
  if (!line) {
    line = el("li");
    line.dataset.utterance = msg.id;
    line.append(el("span", "", "when"), el("span", msg.stream, "name"), el("span", "", "text"));
    prepend($("transcript"), line);
  }
  const final = msg.type === "transcript.final";
  if (final && msg.outcome === "no_speech") {
    line.remove(); // a voice-like sound, but the defences kept no words: nothing was said
    return;
  }
  line.className = final ? (msg.outcome === "failed" ? "final failed" : "final") : "partial";
  line.querySelector(".when").textContent = final ? `${clock(msg.start)} ${wall(msg.wall_start)}` : clock(msg.start);
  line.querySelector(".text").textContent = msg.outcome === "failed" ? "(not transcribed: the decode failed)" : msg.text;
}

function scene(msg) {
  const card = el("li", null, "card");
  card.id = `win-${msg.window.id}`;
  card.dataset.time = String(msg.time);
  card.append(el("span", `${msg.stream} ${msg.window.id} ${clock(msg.window.start)}`, "when"));
  const text = el("p", msg.text);
  if (msg.confidence !== null && msg.confidence !== undefined) {
    text.append(el("span", ` (${Math.round(msg.confidence * 100)} % sure)`, "heard"));
  }
  card.append(text);
  if (msg.window.transcript) card.append(el("p", `heard: ${msg.window.transcript}`, "heard"));
  if (state.learning) card.append(teachForm(msg.window.id));
  prepend($("scenes"), card, 50);
}

// --- learning (docs/protocol.md, Learning) ----------------------------------------------------------------

function teachForm(windowId) {
  // "This is <label>" / "Not this": the window's audio becomes an example of the label (or of the background)
  const form = el("form", null, "teach");
  form.dataset.window = windowId;
  const input = el("input");
  input.name = "label";
  input.setAttribute("list", "known-labels");
  input.maxLength = 60;
  input.setAttribute("aria-label", `What ${windowId} is`);
  input.placeholder = "what is it?";
  const yes = el("button", "This is");
  yes.type = "submit";
  const no = el("button", "Not this");
  no.type = "button";
  const sendLabel = (negative) => {
    const label = input.value.trim();
    if (!label) return input.focus();
    state.learnIds.add(send({ type: "label", window: windowId, label, negative }));
    form.replaceChildren(el("span", negative ? `marked: not ${label}` : `marked: ${label}`, "heard"));
    return undefined;
  };
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    sendLabel(false);
  });
  no.addEventListener("click", () => sendLabel(true));
  form.append(input, yes, no);
  return form;
}

function labels(msg) {
  state.learning = true;
  $("learn-view").hidden = false;
  const list = $("labels");
  const known = $("known-labels");
  list.replaceChildren();
  known.replaceChildren();
  for (const c of msg.classes) {
    const item = el("li", `${c.label}: ${c.clips.length} example${c.clips.length === 1 ? "" : "s"}`);
    if (c.clips.length < msg.min_clips) item.append(el("span", ` (needs ${msg.min_clips})`, "heard"));
    const del = el("button", "Delete");
    del.type = "button";
    del.setAttribute("aria-label", `Delete every example of ${c.label}`);
    del.addEventListener("click", () => state.learnIds.add(send({ type: "label.remove", label: c.label })));
    item.append(" ", del);
    list.append(item);
    const o = el("option");
    o.value = c.label;
    known.append(o);
  }
  $("labels-note").textContent = `${msg.clips} of at most ${msg.max_clips} examples, ` +
    `${(msg.bytes / 2 ** 20).toFixed(1)} of ${(msg.max_bytes / 2 ** 20).toFixed(0)} MB` +
    (msg.active ? `; in use: a model you taught (${msg.active})` : "; in use: the original model");
  $("learn-back").hidden = !msg.active;
  $("learn-now").disabled = Boolean(msg.job);
  if (msg.job) learnStatus(`learning: ${msg.job}`);
}

function learnStatus(text, done, total) {
  $("learn-status").textContent = text;
  const bar = $("learn-progress");
  if (done === undefined) return;
  bar.hidden = false;
  bar.max = total || 1;
  bar.value = total ? done : 0;
}

function learnDone(msg) {
  $("learn-progress").hidden = true;
  $("learn-now").disabled = false;
  const pct = (x) => (x === null || x === undefined ? "?" : `${Math.round(x * 100)} %`);
  const what = {
    swapped: "the new model is in use",
    refused: "the new model did worse: the one in use stays",
    failed: "learning failed",
  }[msg.outcome];
  learnStatus(`${what} (new ${pct(msg.accuracy)}, before ${pct(msg.previous_accuracy)}): ${msg.reason}`);
  send({ type: "label.list" });
}

function alert(msg) {
  const item = el("li", null, "alert");
  item.dataset.alert = msg.id;
  item.append(el("strong", msg.rule), el("span", ` ${msg.stream} ${wall(msg.wall)} `), el("q", msg.evidence));
  if (msg.score !== null && msg.score !== undefined) item.append(el("span", ` score ${Number(msg.score).toFixed(2)}`));
  if (state.learning && msg.window) item.append(teachForm(msg.window.id));
  const ack = el("button", "Acknowledge");
  ack.type = "button";
  ack.addEventListener("click", () => item.classList.add("acknowledged"));
  item.append(ack);
  prepend($("alerts"), item, 100);
}

function alertCleared(msg) {
  const item = document.querySelector(`[data-alert="${CSS.escape(msg.id)}"]`);
  if (item) {
    item.classList.add("cleared");
    item.append(el("span", ` cleared after ${msg.active_s.toFixed(0)} s`));
  }
}

function answer(msg) {
  if (msg.re !== state.asking) return;
  const box = $("answer");
  if (msg.type === "answer.start") {
    box.textContent = "";
    $("citations").replaceChildren();
  } else if (msg.type === "answer.delta") {
    box.textContent += msg.text;
  } else {
    box.textContent = msg.text;
    const cites = msg.window ? [msg.window] : msg.evidence;
    for (const w of cites || []) {
      const li = el("li");
      const a = el("a", `${w.id} ${clock(w.start)}`);
      a.href = `#win-${w.id}`;
      a.title = w.transcript || "";
      li.append(a);
      $("citations").append(li);
    }
    state.asking = null;
  }
}

function results(msg) {
  const list = $("results");
  list.replaceChildren();
  for (const h of msg.hits) {
    const li = el("li");
    li.append(el("span", `${h.stream} ${wall(h.wall_start)} `, "when"), el("span", h.transcript || h.scene || ""));
    list.append(li);
  }
  if (!msg.hits.length) list.append(el("li", "nothing found"));
}

// --- timeline: levels and marks from the store (docs/protocol.md, Timeline) -----------------------------------

const SVG = "http://www.w3.org/2000/svg";
const MARK_COLOURS = { speech: "#1d3557", scene: "#2d6a4f", alert: "#c1121f", gap: "#b08900" };

function svg(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  return node;
}

function requestTimeline() {
  const span = Number($("tl-span").value);
  const until = Date.now() / 1000;
  const stream = $("tl-stream").value;
  if (send({ type: "timeline", since: until - span, until, streams: [stream || "*"], buckets: 120 })) {
    $("timeline-note").textContent = "loading…";
  }
}

function timeline(msg) {
  const box = $("timeline");
  box.replaceChildren();
  const span = msg.until - msg.since;
  const x = (t) => Math.min(1000, Math.max(0, ((t - msg.since) / span) * 1000));
  const y = (db) => Math.min(100, Math.max(0, (-db / 90) * 100)); // 0 dBFS at the top, -90 at the bottom
  $("timeline-note").textContent = msg.streams.length
    ? `${wall(msg.since)} – ${wall(msg.until)}, level in dBFS (-90 to 0)`
    : "nothing stored in this span";
  for (const s of msg.streams) {
    const lane = el("figure", null, "lane");
    lane.dataset.stream = s.stream;
    const caption = el("figcaption", s.stream);
    const picture = svg("svg", { viewBox: "0 0 1000 100", preserveAspectRatio: "none", role: "img" });
    const heard = s.rms_dbfs.filter((v) => v !== null);
    const loudest = heard.length ? Math.max(...heard).toFixed(0) : null;
    picture.setAttribute(
      "aria-label",
      `${s.stream}: ${heard.length ? `level up to ${loudest} dBFS` : "no level stored"}, ${s.marks.length} events`,
    );
    // the level as bars (one per bucket; none where nothing was heard): a lone bucket still shows
    const step = 1000 / s.rms_dbfs.length;
    s.rms_dbfs.forEach((db, i) => {
      if (db === null) return;
      const top = y(db);
      picture.append(svg("rect", { class: "level", x: (i * step).toFixed(1), y: top.toFixed(1), width: Math.max(step, 1).toFixed(1), height: (100 - top).toFixed(1), fill: "#457b9d" }));
    });
    for (const m of s.marks) {
      const start = x(m.at);
      const width = Math.max(2, (m.end ? x(m.end) : start) - start);
      const mark = svg("rect", { x: start.toFixed(1), y: m.kind === "alert" ? 0 : 80, width: width.toFixed(1), height: m.kind === "alert" ? 100 : 20, fill: MARK_COLOURS[m.kind], "fill-opacity": m.kind === "alert" ? 0.35 : 0.8 });
      mark.append(svg("title", {}));
      mark.lastChild.textContent = `${m.kind} ${wall(m.at)}: ${m.text}`;
      picture.append(mark);
    }
    const axis = el("div", null, "axis");
    axis.append(el("span", wall(msg.since)), el("span", wall(msg.until)));
    lane.append(caption, picture, axis, marksList(s));
    box.append(lane);
  }
}

function marksList(s) {
  const list = el("ol", null, "marks");
  list.tabIndex = 0;
  list.setAttribute("aria-label", `${s.stream}: events`);
  for (const m of [...s.marks].reverse()) { // newest first, as the live lists
    const li = el("li", null, `mark kind-${m.kind}`);
    li.append(el("span", wall(m.at), "when"), el("span", m.kind, "kind"), el("span", m.text));
    if (m.clip) {
      const play = el("button", "Play clip");
      play.type = "button";
      play.dataset.clip = m.clip;
      play.addEventListener("click", () => playClip(li, m.clip, play));
      li.append(play);
    }
    list.append(li);
  }
  if (s.truncated) list.append(el("li", "older events in this span are not shown", "missed"));
  if (!s.marks.length) list.append(el("li", "no events"));
  return list;
}

async function playClip(li, name, button) {
  // fetched with the token (an <audio src> could not send it), played from memory
  button.disabled = true;
  try {
    const headers = state.token ? { Authorization: `Bearer ${state.token}` } : {};
    const reply = await fetch(`/clips/${encodeURIComponent(name)}`, { headers });
    if (!reply.ok) throw new Error(`${reply.status}`);
    const audio = document.createElement("audio");
    audio.controls = true;
    audio.src = URL.createObjectURL(await reply.blob());
    audio.setAttribute("aria-label", `clip ${name}`);
    li.append(audio);
    button.remove();
    audio.play().catch(() => undefined); // autoplay may be refused: the controls are there
  } catch (err) {
    button.disabled = false;
    li.append(el("span", ` the clip could not be loaded (${err.message})`, "missed"));
  }
}

// --- controls ---------------------------------------------------------------------------------------------

$("ask-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const scope = $("scope").value;
  const message = { type: "ask", question: $("question").value };
  const stream = $("ask-stream").value;
  if (scope === "history") message.scope = "history";
  if (stream) message.stream = stream;
  if (scope === "window" && $("ask-window").value) message.window = $("ask-window").value;
  const id = send(message);
  if (id) {
    state.asking = id;
    $("answer").textContent = "…";
  }
});

$("timeline-form").addEventListener("submit", (e) => {
  e.preventDefault();
  requestTimeline();
});

$("learn-now").addEventListener("click", () => {
  $("learn-now").disabled = true;
  state.learnIds.add(send({ type: "learn" }));
});

$("learn-back").addEventListener("click", () => state.learnIds.add(send({ type: "learn.rollback" })));

$("search-form").addEventListener("submit", (e) => {
  e.preventDefault();
  send({ type: "history.search", query: $("query").value });
});

connect();
