/*
 * PartnerLab participant page: a small single-page app without dependencies or a build step.
 *
 * The server owns the game. It sends the full state of this seat on every (re)connect and whenever
 * the seat's view changes; this page only renders that state and sends the participant's decisions
 * (docs/protocol.md). What the page remembers on its own is UI memory: drafts of what was typed,
 * which submission waits for its ack, errors, the last quiz result. Drafts survive re-renders and
 * reloads within one step (stage, or round + phase) and are dropped when the step changes.
 *
 * Safety rule: text from people or from the server is inserted with text nodes only (the h() helper
 * below never parses HTML), so a "<script>" in a pitch is shown as text.
 */
(function () {
  "use strict";

  var app = document.getElementById("app");
  if (!app) return;
  var WS_PATH = app.getAttribute("data-ws-path");

  var PHASE_NAMES = { pitch: "Messages", choice: "Choice", return: "Return", feedback: "Results", belief: "Guesses" };
  var ROUND_PHASES = ["pitch", "choice", "return", "feedback"];
  var ACK_TIMEOUT_MS = 15000;
  var PING_EVERY_MS = 25000;
  var PING_TIMEOUT_MS = 10000;
  // Reconnecting: the n-th retry in a row waits a random time between half and all of min(15 s, 0.5 s × 2^n),
  // so that hundreds of pages that lost the server together come back spread out, not together.
  var RETRY_FIRST_MS = 500;
  var RETRY_MAX_MS = 15000;
  var CLOSE_NOT_FOUND = 4404; // the seat does not exist: permanent
  var CLOSE_BUSY = 4503; // the server had no database connection for us: try again later

  // ---- state (from the server) and the reducer ----------------------------------------------------

  var state = null;
  var clockOffset = 0; // server clock − local clock, in ms

  /** Mirror of experiment/events.py apply_event: keep the two in step. */
  function applyEvent(current, event) {
    if (event.type === "state") return !current || event.version >= current.version ? event : current;
    if (event.type === "progress") {
      var game = current && current.game;
      if (!game || event.version < current.version) return current;
      if (game.round !== event.round || game.phase !== event.phase) return current;
      var next = Object.assign({}, current, { version: event.version });
      next.game = Object.assign({}, game, { progress: { done: event.done, of: event.of } });
      return next;
    }
    return current;
  }

  // ---- UI memory ------------------------------------------------------------------------------------

  var ui = {
    scope: null, // the step drafts belong to; changing it resets drafts, acks and errors
    drafts: {},
    touched: {}, // sliders the participant has set (an untouched slider has no value yet)
    pending: {}, // form key -> ref of the message waiting for its ack
    acked: {}, // form key -> true once the server accepted it
    errors: {}, // form key -> {code, message}
    notice: null, // an error that belongs to no form
    quizResult: null,
    confirmDecline: false,
  };
  var refs = {}; // ref -> form key
  var refCounter = 0;

  function scopeOf(s) {
    if (!s) return null;
    if (s.stage === "playing" && s.game) return "playing:" + s.game.round + ":" + s.game.phase;
    return s.stage;
  }

  function enterScope(scope) {
    ui.scope = scope;
    ui.drafts = storedDrafts(scope);
    ui.touched = {};
    ui.pending = {};
    ui.acked = {};
    ui.errors = {};
    ui.notice = null;
    ui.confirmDecline = false;
    ui.quizResult = null;
    refs = {};
    storeDrafts(); // drops the previous step's drafts
  }

  // Drafts are also kept in this tab's sessionStorage, so that a reload (or a phone browser that
  // discards a background tab) does not lose what was typed. They belong to this seat and this step
  // only, and sessionStorage ends with the tab. Without storage (blocked, full) drafts just do not
  // survive a reload.
  var DRAFT_STORE = "partnerlab.drafts:" + WS_PATH;

  function storedDrafts(scope) {
    try {
      var saved = JSON.parse(window.sessionStorage.getItem(DRAFT_STORE) || "null");
      return saved && saved.scope === scope && saved.drafts && typeof saved.drafts === "object" ? saved.drafts : {};
    } catch (err) {
      return {};
    }
  }

  function storeDrafts() {
    try {
      window.sessionStorage.setItem(DRAFT_STORE, JSON.stringify({ scope: ui.scope, drafts: ui.drafts }));
    } catch (err) { /* no storage: see above */ }
  }

  // Every control writes its draft in its own handler; store them after those handlers (a slider moved
  // by a key sets its draft in a timeout, hence the deferral).
  ["input", "change", "keyup", "pointerup"].forEach(function (type) {
    app.addEventListener(type, function () { setTimeout(storeDrafts); });
  });

  // ---- DOM helpers (text nodes only: never innerHTML) ------------------------------------------------

  function h(tag, props) {
    var el = document.createElement(tag);
    if (props) {
      Object.keys(props).forEach(function (key) {
        var value = props[key];
        if (value === null || value === undefined || value === false) return;
        if (key === "class") el.className = value;
        else if (key === "text") el.textContent = value;
        else if (key === "style") Object.keys(value).forEach(function (k) { el.style.setProperty(k, value[k]); });
        else if (key.slice(0, 2) === "on") el.addEventListener(key.slice(2), value);
        else if (key === "value") el.value = value;
        else if (typeof value === "boolean") { if (key in el) el[key] = value; else el.setAttribute(key, ""); }
        else el.setAttribute(key, String(value));
      });
    }
    appendAll(el, Array.prototype.slice.call(arguments, 2));
    return el;
  }

  function appendAll(el, children) {
    children.forEach(function (child) {
      if (child === null || child === undefined || child === false) return;
      if (Array.isArray(child)) appendAll(el, child);
      else el.appendChild(child instanceof Node ? child : document.createTextNode(String(child)));
    });
    return el;
  }

  /** Paragraphs from a plain text with line breaks (consent, instructions). */
  function paragraphs(text) {
    return String(text || "").split(/\n+/).filter(function (p) { return p.trim(); })
      .map(function (p) { return h("p", null, p); });
  }

  function plural(n, one, many) { return n === 1 ? one : many; }
  function points(n) { return n + " " + plural(n, "point", "points"); }

  function parseTime(iso) {
    if (!iso) return null;
    // Python sends microseconds; keep milliseconds so every browser parses it.
    var t = Date.parse(String(iso).replace(/(\.\d{3})\d+/, "$1"));
    return isNaN(t) ? null : t;
  }

  function serverNow() { return Date.now() + clockOffset; }

  function formatSeconds(total) {
    total = Math.max(0, Math.ceil(total));
    var m = Math.floor(total / 60), s = total % 60;
    return m + ":" + (s < 10 ? "0" : "") + s;
  }

  function secondsUntil(iso) {
    var t = parseTime(iso);
    return t === null ? null : (t - serverNow()) / 1000;
  }

  function wholeNumber(value) {
    if (typeof value === "number") return Number.isInteger(value) ? value : null;
    var s = String(value === undefined || value === null ? "" : value).trim();
    return /^\d+$/.test(s) ? parseInt(s, 10) : null;
  }

  function charCount(text) { return Array.from(text).length; } // code points, as the server counts

  // ---- live parts: updated every tick without re-rendering -----------------------------------------

  var liveUpdaters = [];
  function live(fn) { liveUpdaters.push(fn); fn(); }
  function tick() { liveUpdaters.forEach(function (fn) { fn(); }); }

  /**
   * A "m:ss" countdown to a server time; ``onZero`` text replaces it once the time has passed. It turns
   * red in its last ``urgent`` seconds (10 by default; 0: never).
   */
  function countdown(iso, opts) {
    opts = opts || {};
    var urgent = opts.urgent === undefined ? 10 : opts.urgent;
    var el = h("span", { class: "countdown" });
    live(function () {
      var left = secondsUntil(iso);
      var text = left === null ? "–" : left <= 0 && opts.onZero ? opts.onZero : formatSeconds(left);
      if (el.textContent !== text) el.textContent = text;
      el.classList.toggle("urgent", left !== null && left > 0 && left <= urgent);
    });
    return el;
  }

  // ---- connection ---------------------------------------------------------------------------------------

  var ws = null;
  var connected = false;
  var attempt = 0; // retries since the last connection that brought a state
  var busy = false; // the last connection was closed with CLOSE_BUSY
  var retryAt = null;
  var retryTimer = null;
  var fatal = null;
  var pingTimer = null;
  var pingDeadline = null;
  var lastFrameAt = 0;
  var connBanner = h("div", { class: "conn", role: "status", "aria-live": "polite", hidden: true });
  document.body.insertBefore(connBanner, document.body.firstChild);

  function socketUrl() {
    return (location.protocol === "https:" ? "wss:" : "ws:") + "//" + location.host + WS_PATH;
  }

  function connect() {
    clearTimeout(retryTimer);
    retryAt = null;
    var socket;
    try {
      socket = new WebSocket(socketUrl());
    } catch (err) {
      scheduleReconnect();
      return;
    }
    ws = socket;
    socket.onopen = function () {
      if (socket !== ws) return;
      connected = true;
      // The backoff is not reset here: a busy server accepts and closes at once (CLOSE_BUSY). Only a
      // connection that brought a state counts as back (see receive).
      lastFrameAt = Date.now();
      startPings();
      updateBanner();
    };
    socket.onmessage = function (e) {
      if (socket !== ws) return;
      lastFrameAt = Date.now();
      pingDeadline = null; // any frame proves the connection is alive
      var event;
      try { event = JSON.parse(e.data); } catch (err) { return; }
      receive(event);
    };
    socket.onclose = function (e) { lost(socket, e.code); };
  }

  function lost(socket, code) {
    if (socket !== ws) return; // an old socket we already gave up on
    ws = null;
    connected = false;
    stopPings();
    // Whatever was waiting for an ack is settled by the full state sent on reconnect.
    ui.pending = {};
    busy = code === CLOSE_BUSY;
    if (code === CLOSE_NOT_FOUND) {
      fatal = "This link is not valid. Please use the link you were given to join the study.";
    } else {
      scheduleReconnect();
    }
    updateBanner();
    render(true);
  }

  /** Milliseconds to wait before retry number ``n`` (from 0) of a row; ``random`` in [0, 1). */
  function reconnectDelay(n, random) {
    var ceiling = Math.min(RETRY_MAX_MS, RETRY_FIRST_MS * Math.pow(2, Math.min(n, 30)));
    return ceiling / 2 + random * (ceiling / 2);
  }

  function scheduleReconnect() {
    var delay = reconnectDelay(attempt, Math.random());
    attempt += 1;
    retryAt = Date.now() + delay;
    clearTimeout(retryTimer);
    retryTimer = setTimeout(connect, delay);
  }

  function reconnectNow() {
    if (ws || fatal) return;
    // The person (or the browser coming back online / to the front) asks: try now, but keep the backoff's
    // count while the server says it is busy, so that its next waits stay long.
    if (!busy) attempt = 0;
    connect();
    updateBanner();
  }

  function startPings() {
    stopPings();
    pingTimer = setInterval(function () {
      if (!connected) return;
      var now = Date.now();
      if (pingDeadline && now > pingDeadline) {
        // No answer: the connection died without closing (sleep, network switch). Do not wait for a
        // close handshake that may never come: give the socket up and reconnect at once.
        var dead = ws;
        lost(dead, 1006);
        try { dead.close(); } catch (err) { /* already closing */ }
        return;
      }
      if (!pingDeadline && now - lastFrameAt > PING_EVERY_MS) {
        pingDeadline = now + PING_TIMEOUT_MS;
        send({ type: "ping", ref: "ping" });
      }
    }, 1000);
  }

  function stopPings() { clearInterval(pingTimer); pingTimer = null; pingDeadline = null; }

  function updateBanner() {
    var text = null;
    connBanner.className = "conn";
    if (fatal) {
      text = fatal;
      connBanner.classList.add("conn-fatal");
    } else if (!connected && busy) {
      text = "The study is busy right now. Reconnecting by itself" + (state ? "; your answers so far are saved." : ".");
      connBanner.classList.add("conn-lost");
    } else if (!connected && state) {
      text = "Connection lost. Your answers so far are saved.";
      connBanner.classList.add("conn-lost");
    } else if (!connected) {
      text = "Connecting…";
    }
    connBanner.hidden = !text;
    connBanner.replaceChildren();
    if (!text) return;
    connBanner.appendChild(h("span", { class: "conn-dot", "aria-hidden": "true" }));
    connBanner.appendChild(h("span", null, text));
    if (!fatal && !connected && retryAt) {
      var wait = h("span", { class: "conn-wait" });
      connBanner.appendChild(wait);
      connBanner.appendChild(h("button", { type: "button", class: "btn btn-small", onclick: reconnectNow }, "Reconnect now"));
      connBanner._wait = wait;
    } else {
      connBanner._wait = null;
    }
  }

  function tickBanner() {
    var wait = connBanner._wait;
    if (!wait) return;
    var text = ws ? " Reconnecting…" : " Trying again in " + Math.max(1, Math.ceil((retryAt - Date.now()) / 1000)) + " s.";
    if (wait.textContent !== text) wait.textContent = text;
  }

  window.addEventListener("online", reconnectNow);
  document.addEventListener("visibilitychange", function () {
    if (document.visibilityState === "visible") reconnectNow();
  });

  function send(message) {
    if (!ws || !connected) return false;
    ws.send(JSON.stringify(message));
    return true;
  }

  /** Send a decision on behalf of one form; the form stays disabled until the ack or error. */
  function submit(formKey, message) {
    delete ui.errors[formKey];
    if (!connected) {
      ui.errors[formKey] = { code: "offline", message: "You are offline, so this was not sent. Please try again once the connection is back." };
      render(true);
      return;
    }
    var ref = "m" + (++refCounter);
    message.ref = ref;
    refs[ref] = formKey;
    ui.pending[formKey] = ref;
    send(message);
    setTimeout(function () {
      if (ui.pending[formKey] !== ref) return;
      delete ui.pending[formKey];
      ui.errors[formKey] = { code: "no_answer", message: "The server did not answer. Please try again." };
      render(true);
    }, ACK_TIMEOUT_MS);
    render(true);
  }

  function receive(event) {
    if (event.type === "state") {
      attempt = 0; // the server is back for us: the next loss starts the backoff afresh
      busy = false;
      var t = parseTime(event.server_time);
      if (t !== null) clockOffset = t - Date.now();
      state = applyEvent(state, event);
      fatal = null;
      updateBanner();
      render(false);
    } else if (event.type === "progress") {
      if (!state) return;
      state = applyEvent(state, event);
      render(false);
    } else if (event.type === "ack") {
      if (event.ref === "ping") return;
      var key = refs[event.ref];
      if (key === undefined) return;
      delete refs[event.ref];
      delete ui.pending[key];
      if (event.action === "quiz.submit" && event.result) {
        ui.quizResult = event.result;
        if (event.result.correct) ui.acked[key] = true;
      } else {
        ui.acked[key] = true;
      }
      render(true);
    } else if (event.type === "error") {
      var formKey = event.ref !== null && event.ref !== undefined ? refs[event.ref] : undefined;
      var err = { code: event.code, message: event.message };
      if (formKey !== undefined) {
        delete refs[event.ref];
        delete ui.pending[formKey];
        ui.errors[formKey] = err;
      } else {
        ui.notice = err;
      }
      render(true);
    }
  }

  // ---- rendering ----------------------------------------------------------------------------------------

  var lastSignature = null;

  /** What the screen depends on, minus what the live updaters refresh in place. */
  function signature() {
    var s = state && Object.assign({}, state, { server_time: null, version: null });
    if (s && s.game) s.game = Object.assign({}, s.game, { progress: null });
    return JSON.stringify([s, fatal, connected, ui.pending, ui.acked, ui.errors, ui.notice, ui.quizResult, ui.confirmDecline]);
  }

  function render(force) {
    var scope = scopeOf(state);
    var newStep = scope !== ui.scope;
    if (newStep) enterScope(scope);
    var sig = signature();
    if (!force && !newStep && sig === lastSignature) {
      tick();
      return;
    }
    lastSignature = sig;

    var active = document.activeElement;
    var focusId = active && app.contains(active) ? active.id : null;
    var selection = null;
    if (focusId && typeof active.selectionStart === "number") {
      try { selection = [active.selectionStart, active.selectionEnd]; } catch (err) { selection = null; }
    }

    liveUpdaters = [];
    var view = buildView();
    app.replaceChildren(view);
    markWhere();
    tick();
    document.title = titleOf();

    if (newStep && state) {
      window.scrollTo(0, 0);
      focusHeading();
    } else if (focusId) {
      var again = document.getElementById(focusId);
      if (again && !again.disabled) {
        again.focus({ preventScroll: true });
        if (selection) { try { again.setSelectionRange(selection[0], selection[1]); } catch (err) { /* not a text field */ } }
      } else if (again && again.closest("form, section")) {
        // A disabled control cannot hold focus: keep it nearby so Tab goes on from the same place.
        var holder = again.closest("form, section");
        holder.setAttribute("tabindex", "-1");
        holder.focus({ preventScroll: true });
      } else {
        focusHeading();
      }
    }
  }

  /** Where the page is, as attributes of #app: a stable hook for browser tests and support tools. */
  function markWhere() {
    var g = state && state.stage === "playing" ? state.game : null;
    var marks = { "data-stage": state ? state.stage : "connecting", "data-round": g ? g.round : null, "data-phase": g ? g.phase : null,
      "data-role": state && state.me && state.me.role ? state.me.role : null, "data-seat": state && state.me && state.me.seat ? state.me.seat : null };
    Object.keys(marks).forEach(function (name) {
      if (marks[name] === null) app.removeAttribute(name);
      else app.setAttribute(name, String(marks[name]));
    });
  }

  function focusHeading() {
    var heading = document.getElementById("main-heading");
    if (heading) heading.focus({ preventScroll: true });
  }

  function titleOf() {
    if (!state) return "PartnerLab study";
    var g = state.game;
    if (state.stage === "playing" && g) {
      return (g.todo ? "● Your turn · " : "") + "Round " + g.round + " of " + g.rounds + " · " + (PHASE_NAMES[g.phase] || g.phase);
    }
    return "PartnerLab study";
  }

  function buildView() {
    if (!state) {
      return h("main", { class: "page" }, h("section", { class: "card center" },
        fatal ? h("p", null, fatal) : [h("div", { class: "spinner", "aria-hidden": "true" }), h("p", null, "Connecting to the study…")]));
    }
    var stage = state.stage;
    var content;
    if (stage === "consent") content = viewConsent();
    else if (stage === "instructions") content = viewInstructions();
    else if (stage === "quiz") content = viewQuiz();
    else if (stage === "lobby") content = viewLobby();
    else if (stage === "playing" && state.game) return viewGame();
    else if (stage === "questionnaire") content = viewQuestionnaire();
    else content = viewEnd();
    return h("main", { class: "page" }, notice(), content);
  }

  function heading(text, level) {
    return h(level || "h1", { id: "main-heading", tabindex: "-1" }, text);
  }

  function notice() {
    if (!ui.notice) return null;
    return h("div", { class: "alert", role: "alert" }, ui.notice.message);
  }

  function formError(key) {
    var err = ui.errors[key];
    // The code is kept on the element for support and tests; participants read the sentence.
    return h("p", { class: "form-error", role: "alert", id: key + "-error", "data-code": err ? err.code : null }, err ? err.message : null);
  }

  /** Inputs lock once sent; the submit button also waits for a connection and a running clock. */
  function isLocked(key) { return ui.pending[key] !== undefined || ui.acked[key] === true; }
  function isBusy(key) { return !connected || isPaused() || isLocked(key); }

  /** While staff pause a group its clock stops: the state then has no deadline. */
  function isPaused() {
    var g = state && state.stage === "playing" && state.game;
    return !!g && (g.paused === true || !g.deadline);
  }

  function submitButton(key, label, opts) {
    opts = opts || {};
    var waiting = ui.pending[key] !== undefined;
    var text = waiting ? "Sending…" : !connected ? "Offline – waiting for connection" : isPaused() ? "Paused – please wait" : label;
    return h("button", {
      type: "submit", class: "btn btn-primary" + (opts.wide ? " btn-wide" : ""), id: key + "-submit",
      disabled: isBusy(key) || opts.disabled === true, "aria-describedby": key + "-error",
    }, text);
  }

  function bindDraft(el, key, read) {
    var save = function () { ui.drafts[key] = read ? read(el) : el.value; };
    el.addEventListener("input", save);
    el.addEventListener("change", save);
    return el;
  }

  function draft(key, fallback) { return Object.prototype.hasOwnProperty.call(ui.drafts, key) ? ui.drafts[key] : fallback; }

  /** A radio group whose choice is kept as a draft. ``options``: [{value, label, describedby?}]. */
  function radios(name, key, options, opts) {
    opts = opts || {};
    var current = draft(key, undefined);
    return options.map(function (o, i) {
      var id = name + "-" + i;
      var input = h("input", { type: "radio", name: name, id: id, value: o.value, checked: current === o.value,
        disabled: opts.disabled, "aria-describedby": o.describedby });
      input.addEventListener("change", function () { if (input.checked) { ui.drafts[key] = o.value; if (opts.onchange) opts.onchange(); } });
      return h("label", { class: "option" + (opts.pill ? " pill" : ""), for: id }, input, h("span", null, o.label));
    });
  }

  /**
   * A whole-number field with a slider, both editing one draft. Without a draft the field is empty and
   * the slider is marked unset: the page never suggests an amount. ``label`` is the field's accessible
   * name; ``shortLabel`` (optional) is what the label shows, where the card around it says the rest.
   */
  function amountField(opts) {
    var key = opts.key, min = opts.min, max = opts.max;
    var value = draft(key, "");
    var number = h("input", { type: "number", id: opts.id, class: "amount-number", min: min, max: max, step: 1,
      inputmode: "numeric", value: value, placeholder: min + "–" + max, disabled: opts.disabled,
      "aria-label": opts.shortLabel ? opts.label : null,
      "aria-describedby": opts.id + "-hint", required: true });
    var slider = h("input", { type: "range", id: opts.id + "-range", class: "amount-range" + (value === "" ? " unset" : ""),
      min: min, max: max, step: 1, value: value === "" ? min : value, disabled: opts.disabled,
      "aria-label": opts.label + " (slider)" });
    var changed = function () { if (opts.onchange) opts.onchange(); };
    number.addEventListener("input", function () {
      ui.drafts[key] = number.value;
      var n = wholeNumber(number.value);
      if (n !== null && n >= min && n <= max) { slider.value = n; slider.classList.remove("unset"); }
      changed();
    });
    var fromSlider = function () {
      ui.drafts[key] = slider.value;
      number.value = slider.value;
      slider.classList.remove("unset");
      changed();
    };
    slider.addEventListener("input", fromSlider);
    slider.addEventListener("change", fromSlider);
    slider.addEventListener("pointerup", fromSlider); // a click on the untouched thumb also sets the value
    slider.addEventListener("keydown", function (e) {
      // An arrow key at the end of the range fires no input event but is a choice all the same.
      if (/^(Arrow|Home|End|Page)/.test(e.key)) setTimeout(fromSlider);
    });
    return h("div", { class: "field amount" },
      h("label", { for: opts.id }, opts.shortLabel || opts.label),
      h("div", { class: "amount-row" }, slider, number, opts.unit ? h("span", { class: "unit" }, opts.unit) : null),
      h("p", { class: "hint", id: opts.id + "-hint" }, opts.hint || ("A whole number from " + min + " to " + max + ".")));
  }

  function amountValue(key, min, max) {
    var n = wholeNumber(draft(key, ""));
    return n !== null && n >= min && n <= max ? n : null;
  }

  // ---- pre-game stages ------------------------------------------------------------------------------------

  function viewConsent() {
    var key = "consent";
    var actions;
    if (ui.confirmDecline) {
      actions = h("div", { class: "confirm", role: "group", "aria-labelledby": "decline-q" },
        h("p", { id: "decline-q" }, h("strong", null, "Are you sure?"), " Without your consent you cannot take part, and this cannot be undone."),
        h("div", { class: "actions" },
          h("button", { type: "button", class: "btn btn-danger", id: "decline-confirm", disabled: isBusy(key),
            onclick: function () { submit(key, { type: "consent", accept: false }); } }, "Yes, I do not consent"),
          h("button", { type: "button", class: "btn", id: "decline-back",
            onclick: function () { ui.confirmDecline = false; render(true); } }, "Go back")));
    } else {
      actions = h("div", { class: "actions" },
        h("button", { type: "button", class: "btn btn-primary", id: "consent-accept", disabled: isBusy(key),
          onclick: function () { submit(key, { type: "consent", accept: true }); } },
          ui.pending[key] !== undefined ? "Sending…" : "I agree to take part"),
        h("button", { type: "button", class: "btn btn-quiet", id: "consent-decline", disabled: isBusy(key),
          onclick: function () { ui.confirmDecline = true; render(true); setTimeout(function () { var b = document.getElementById("decline-back"); if (b) b.focus(); }); } },
          "I do not agree"));
    }
    return h("section", { class: "card prose" }, h("p", { class: "eyebrow" }, "Step 1 of 4"), heading("Consent to take part"),
      paragraphs(state.consent && state.consent.text), formError(key), actions);
  }

  function viewInstructions() {
    var key = "instructions";
    var e = state.experiment || {};
    return h("section", { class: "card prose" }, h("p", { class: "eyebrow" }, "Step 2 of 4"), heading("How the game works"),
      h("ul", { class: "facts", "aria-label": "Key numbers" },
        h("li", null, h("strong", null, e.rounds), " ", plural(e.rounds, "round", "rounds")),
        h("li", null, h("strong", null, e.endowment), " points per selector per round"),
        h("li", null, "amounts sent are multiplied by ", h("strong", null, "×" + e.multiplier))),
      paragraphs(state.instructions && state.instructions.text),
      formError(key),
      h("div", { class: "actions" }, h("button", { type: "button", class: "btn btn-primary", id: "instructions-done", disabled: isBusy(key),
        onclick: function () { submit(key, { type: "instructions.done" }); } },
        ui.pending[key] !== undefined ? "Sending…" : "I have read the instructions")));
  }

  function viewQuiz() {
    var key = "quiz";
    var quiz = state.quiz || { questions: [], attempts: 0 };
    var result = ui.quizResult;
    var wrong = result && !result.correct ? result.wrong.map(String) : [];
    var questions = quiz.questions.map(function (q, i) {
      var isWrong = wrong.indexOf(String(q.id)) >= 0;
      var opts = q.options.map(function (o) { return { value: String(o), label: String(o) }; });
      return h("fieldset", { class: "question" + (isWrong ? " wrong" : ""), "aria-describedby": isWrong ? "quiz-wrong-" + q.id : null },
        h("legend", null, h("span", { class: "qnum" }, (i + 1) + "."), " ", q.question),
        isWrong ? h("p", { class: "wrong-note", id: "quiz-wrong-" + q.id }, "Not right yet – please look at this one again.") : null,
        h("div", { class: "options" }, radios("quiz-" + q.id, "quiz." + q.id, opts, { onchange: function () { refreshQuiz(); } })));
    });
    var summary = h("p", { class: "hint", id: "quiz-summary" });
    var button = submitButton(key, "Check my answers");
    function refreshQuiz() {
      var missing = quiz.questions.filter(function (q) { return draft("quiz." + q.id, undefined) === undefined; }).length;
      summary.textContent = missing ? "Answer every question (" + missing + " left)." : "";
      button.disabled = isBusy(key) || missing > 0;
    }
    var form = h("form", { class: "card prose", novalidate: true, onsubmit: function (e) {
      e.preventDefault();
      var answers = {};
      quiz.questions.forEach(function (q) { answers[q.id] = draft("quiz." + q.id, ""); });
      submit(key, { type: "quiz.submit", answers: answers });
    } },
      h("p", { class: "eyebrow" }, "Step 3 of 4"), heading("Check your understanding"),
      h("p", null, "Please answer these questions about the game. You can try again if something is not right."),
      wrong.length ? h("div", { class: "alert", role: "alert" },
        wrong.length === 1 ? "One answer is not right yet." : wrong.length + " answers are not right yet.",
        " The questions are marked below; change your answers and check again.") : null,
      questions, formError(key), h("div", { class: "actions" }, button, summary),
      quiz.attempts ? h("p", { class: "muted small" }, "Attempts so far: " + quiz.attempts) : null);
    refreshQuiz();
    return form;
  }

  function viewLobby() {
    var lobby = state.lobby || {};
    var size = lobby.group_size || 0;
    var here = Math.max(0, size - (lobby.missing || 0));
    var dots = [];
    for (var i = 0; i < size; i++) dots.push(h("span", { class: "seat-dot" + (i < here ? " here" : "") }));
    var fill = null;
    if (lobby.fill_at) {
      fill = h("p", { class: "muted" });
      var fillAt = lobby.fill_at;
      live(function () {
        var left = secondsUntil(fillAt);
        var text = left !== null && left > 0
          ? "If nobody else arrives, automated participants will fill the empty seats in " + formatSeconds(left) + "."
          : "Filling the empty seats with automated participants…";
        if (fill.textContent !== text) fill.textContent = text;
      });
    }
    var missing = lobby.missing || 0;
    return h("section", { class: "card center lobby" },
      h("p", { class: "eyebrow" }, "Step 4 of 4"), heading("Waiting for other participants"),
      h("div", { class: "spinner", "aria-hidden": "true" }),
      h("div", { class: "seat-dots", "aria-hidden": "true" }, dots),
      h("p", { class: "lead", role: "status" }, missing > 0
        ? "We need " + missing + " more " + plural(missing, "participant", "participants") + " to start (" + here + " of " + size + " are here)."
        : "Everyone is here. The game is about to start."),
      fill,
      lobby.timeout_at ? h("p", { class: "muted" }, "Longest wait: ", countdown(lobby.timeout_at, { onZero: "any moment now" }),
        ". If no group forms by then, you will get a completion code.") : null,
      h("p", { class: "muted small" }, "Please keep this page open. It will move on by itself."));
  }

  // ---- the game -----------------------------------------------------------------------------------------------

  function viewGame() {
    var g = state.game;
    var me = state.me || {};
    var body;
    var isSelector = me.role === "selector";
    if (g.phase === "pitch") body = isSelector ? waitingOnly("Candidates are writing their messages.", "You will read them in a moment.") : viewPitch();
    else if (g.phase === "choice") body = isSelector ? viewChoice() : viewCandidateWaitChoice();
    else if (g.phase === "return") body = isSelector ? viewSelectorWaitReturn() : viewReturn();
    else if (g.phase === "feedback") body = viewFeedback(isSelector);
    else if (g.phase === "belief") body = isSelector ? viewBelief() : waitingOnly("Selectors are giving their guesses about the candidates.", null);
    else body = waitingOnly("Please wait.", null);
    var paused = isPaused() ? h("div", { class: "alert", role: "status" }, h("strong", null, "The game is paused."),
      " The researchers have stopped the clock for a moment. You can prepare your answer; it can be sent once the game goes on.") : null;
    return h("div", { class: "game" }, gameBar(), h("main", { class: "page" }, paused, notice(), whoAmI(), body));
  }

  function gameBar() {
    var g = state.game;
    var steps = ROUND_PHASES.slice();
    if (g.phase === "belief") steps.push("belief");
    var timer = h("div", { class: "timer", role: "timer", "aria-label": "Time left in this step" });
    if (isPaused()) {
      timer.appendChild(h("span", { class: "countdown" }, "Paused"));
    } else {
      // Red means "decide now": only when this seat still owes a decision, not while it just waits.
      timer.appendChild(countdown(g.deadline, { onZero: "0:00", urgent: g.todo ? 10 : 0 }));
    }
    return h("header", { class: "gamebar" },
      h("div", { class: "gamebar-inner" },
        h("div", { class: "where" },
          h("div", { class: "round" }, "Round " + g.round + " of " + g.rounds),
          h("div", { class: "phase-name" }, PHASE_NAMES[g.phase] || g.phase)),
        timer,
        h("div", { class: "bar-total" }, h("span", { class: "total-label" }, "Total"), " ",
          h("strong", null, g.payoff_total), " ", h("span", { class: "total-label" }, "points"))),
      h("ol", { class: "steps", "aria-label": "Steps of this round" }, steps.map(function (p) {
        var index = steps.indexOf(g.phase), mine = steps.indexOf(p);
        return h("li", { class: mine < index ? "done" : mine === index ? "current" : "", "aria-current": mine === index ? "step" : null },
          PHASE_NAMES[p]);
      })));
  }

  function whoAmI() {
    var me = state.me || {};
    if (me.role === "candidate") {
      return h("p", { class: "whoami" }, "You are ", h("span", { class: "chip", style: { "--c": me.colour || "#555" } },
        h("span", { class: "avatar small", "aria-hidden": "true" }, (me.seat || "?").charAt(0)), me.name), ", a candidate.");
    }
    return h("p", { class: "whoami" }, "You are ", h("strong", null, me.name), ", a selector.");
  }

  var PROGRESS_TEXT = {
    pitch: function (p) { return p.done + " of " + p.of + " candidates have sent their message"; },
    choice: function (p) { return p.done + " of " + p.of + " selectors have chosen"; },
    return: function (p) { return p.done + " of " + p.of + " returns decided"; },
    belief: function (p) { return p.done + " of " + p.of + " selectors have given their guesses"; },
  };

  /** The "nothing to do now" panel with the live progress counter. */
  function waiting(title, detail) {
    var text = h("p", { class: "progress-text" });
    var bar = h("div", { class: "bar", "aria-hidden": "true" }, h("span"));
    live(function () {
      var g = state && state.game;
      var p = g && g.progress;
      var fmt = g && PROGRESS_TEXT[g.phase];
      var show = p && fmt && p.of > 0;
      text.textContent = show ? fmt(p) + "." : "";
      bar.hidden = !show;
      if (show) bar.firstChild.style.width = Math.round(100 * p.done / p.of) + "%";
    });
    return h("section", { class: "card waiting", role: "status" },
      h("div", { class: "spinner", "aria-hidden": "true" }),
      h("div", null, h("p", { class: "lead" }, title), detail ? h("p", { class: "muted" }, detail) : null, text, bar));
  }

  function waitingOnly(title, detail) {
    return [h("h1", { id: "main-heading", tabindex: "-1", class: "sr-only" }, PHASE_NAMES[state.game.phase]), waiting(title, detail)];
  }

  function avatar(card, small) {
    return h("span", { class: "avatar" + (small ? " small" : ""), "aria-hidden": "true", style: { "--c": card.colour || "#555" } },
      String(card.seat || "?").charAt(0));
  }

  function labelTag(card) {
    return card.label ? h("span", { class: "tag" }, card.label) : null;
  }

  function messageBlock(card, id) {
    if (card.message === null || card.message === undefined) return null;
    if (!card.message) return h("p", { class: "msg empty", id: id }, "No message this round.");
    return h("blockquote", { class: "msg", id: id }, card.message);
  }

  function historyText(hist) {
    if (!hist || !hist.rounds || !hist.rounds.length) return "You have not chosen this candidate before.";
    var rounds = hist.rounds.length === 1 ? "round " + hist.rounds[0] : "rounds " + hist.rounds.join(", ");
    return "You chose them in " + rounds + ": sent " + points(hist.sent) + ", got back " + points(hist.returned) + ".";
  }

  function candidateCard(card, extra) {
    return h("article", { class: "cand", style: { "--c": card.colour || "#555" } },
      h("div", { class: "cand-head" }, avatar(card), h("h3", { class: "cand-name" }, card.name), labelTag(card)),
      messageBlock(card), extra || null);
  }

  function viewPitch() {
    var g = state.game, e = state.experiment, key = "pitch";
    if (!g.todo) {
      var mine = g.my_message;
      return [heading("Your message"),
        mine ? (mine.timed_out
          ? h("div", { class: "card" }, h("p", null, "Time ran out before you sent a message. Selectors will see no message from you this round."))
          : h("section", { class: "card" }, h("p", { class: "muted" }, "Selectors will read:"),
            mine.text ? h("blockquote", { class: "msg own" }, mine.text) : h("p", { class: "msg empty" }, "(an empty message)")))
          : null,
        waiting("Waiting for the other candidates.", null)];
    }
    var limit = e.message_max_chars;
    var text = draft(key, "");
    var area = h("textarea", { id: "pitch-text", rows: 4, "aria-describedby": "pitch-count pitch-help " + key + "-error",
      disabled: isLocked(key), value: text });
    var counter = h("p", { class: "counter", id: "pitch-count", "aria-live": "polite" });
    var button = submitButton(key, "Send message");
    function refresh() {
      var value = area.value;
      var n = charCount(value.trim());
      counter.textContent = n + " / " + limit + (n > limit ? " – " + (n - limit) + " too many" : "");
      counter.classList.toggle("over", n > limit);
      button.disabled = isBusy(key) || n > limit;
      if (!isBusy(key) && ui.pending[key] === undefined) button.textContent = n === 0 ? "Send an empty message" : "Send message";
    }
    area.addEventListener("input", function () { ui.drafts[key] = area.value; refresh(); });
    refresh();
    return [heading("Write your message"),
      h("form", { class: "card", novalidate: true, onsubmit: function (ev) {
        ev.preventDefault();
        if (charCount(area.value.trim()) > limit) return;
        submit(key, { type: "pitch.submit", round: g.round, text: area.value });
      } },
      h("label", { for: "pitch-text", class: "label" }, "Your message to the selectors"),
      h("p", { class: "hint", id: "pitch-help" }, "Selectors see it next to your name, " + state.me.name + ", when they choose a partner. At most " + limit + " characters."),
      area, counter, formError(key), h("div", { class: "actions" }, button)),
      h("p", { class: "muted small" }, "You can send one message per round.")];
  }

  function viewChoice() {
    var g = state.game, e = state.experiment, key = "choice";
    if (!g.todo) {
      var c = g.my_choice;
      var chosen = c && g.candidates.filter(function (x) { return x.seat === c.candidate; })[0];
      return [heading("Your choice"),
        h("section", { class: "card" }, !c ? h("p", null, "Your choice was not recorded.")
          : c.timed_out ? h("p", null, chosen ? "Time ran out: " + chosen.name + " was chosen for you and 0 points were sent." : "Time ran out: no candidate was chosen this round.")
          : h("p", { class: "choice-summary" }, chosen ? avatar(chosen, true) : null, "You chose ", h("strong", null, chosen ? chosen.name : c.candidate),
            " and sent ", h("strong", null, points(c.sent)), ".")),
        waiting("Waiting for the other selectors.", null)];
    }
    var fixed = e.fixed_send;
    var summary = h("p", { class: "summary", id: "choice-summary", "aria-live": "polite" });
    var button = submitButton(key, "Confirm my choice");
    function refresh() {
      var seat = draft("choice.candidate", undefined);
      var card = g.candidates.filter(function (x) { return x.seat === seat; })[0];
      var amount = fixed ? e.endowment : amountValue("choice.amount", 0, e.endowment);
      var text;
      if (!card) text = "Choose a candidate.";
      else if (amount === null) text = "Choose how many points to send to " + card.name + ".";
      else text = "You send " + points(amount) + " to " + card.name + ", who receives " + points(amount * e.multiplier) +
        ". You keep " + points(e.endowment - amount) + " plus whatever they return.";
      summary.textContent = text;
      button.disabled = isBusy(key) || !card || amount === null;
    }
    var cards = g.candidates.map(function (card) {
      var id = "pick-" + card.seat;
      var input = h("input", { type: "radio", name: "candidate", id: id, value: card.seat, class: "pick-input",
        checked: draft("choice.candidate", undefined) === card.seat, disabled: isLocked(key),
        "aria-labelledby": id + "-name", "aria-describedby": id + "-label " + id + "-msg " + id + "-hist" });
      input.addEventListener("change", function () { if (input.checked) { ui.drafts["choice.candidate"] = card.seat; refresh(); } });
      return h("label", { class: "cand pick", for: id, style: { "--c": card.colour || "#555" } },
        h("div", { class: "cand-head" }, input, avatar(card), h("span", { class: "cand-name", id: id + "-name" }, card.name),
          card.label ? h("span", { class: "tag", id: id + "-label" }, card.label) : null),
        messageBlock(card, id + "-msg"),
        h("p", { class: "hist", id: id + "-hist" }, historyText(card.history)));
    });
    var amount = fixed
      ? h("p", { class: "fixed-send" }, "In this game you always send all ", h("strong", null, points(e.endowment)), ".")
      : amountField({ id: "amount", key: "choice.amount", min: 0, max: e.endowment, label: "How many of your " + e.endowment + " points do you send?",
        unit: "points", disabled: isLocked(key), onchange: refresh,
        hint: "What you send is multiplied by " + e.multiplier + ". The candidate then decides how much to return to you." });
    var form = h("form", { class: "choice-form", novalidate: true, onsubmit: function (ev) {
      ev.preventDefault();
      var seat = draft("choice.candidate", undefined);
      var value = fixed ? e.endowment : amountValue("choice.amount", 0, e.endowment);
      if (!seat || value === null) return;
      submit(key, { type: "choice.submit", round: g.round, candidate: seat, amount: value });
    } },
    h("fieldset", { class: "plain" }, h("legend", { class: "label" }, "Choose one candidate as your partner"),
      h("div", { class: "cands" }, cards)),
    h("section", { class: "card" }, amount, summary, formError(key), h("div", { class: "actions" }, button)));
    refresh();
    return [heading("Choose a partner"), form];
  }

  function viewCandidateWaitChoice() {
    var g = state.game;
    return [heading("Selectors are choosing"),
      waiting("Selectors are reading the messages and choosing a partner.", null),
      h("h2", { class: "section-title" }, "This round’s messages"),
      h("div", { class: "cands" }, g.candidates.map(function (c) { return candidateCard(c, c.seat === state.me.seat ? h("p", { class: "hist" }, "Your message") : null); }))];
  }

  function candidateBySeat(seat) {
    return (state.game.candidates || []).filter(function (c) { return c.seat === seat; })[0] || null;
  }

  function viewSelectorWaitReturn() {
    var g = state.game, e = state.experiment, c = g.my_choice;
    var card = c && candidateBySeat(c.candidate);
    if (!card) return [heading("Returns"), waiting("You did not choose a candidate this round.", "Waiting for the candidates to decide their returns.")];
    return [heading("Waiting for the return"),
      h("section", { class: "card" }, h("p", { class: "choice-summary" }, avatar(card, true), "You sent ", h("strong", null, points(c.sent)),
        " to ", h("strong", null, card.name), ", who received ", h("strong", null, points(c.sent * e.multiplier)), ".")),
      waiting(card.name + " is deciding how much to return to you.", null)];
  }

  function viewReturn() {
    var g = state.game, e = state.experiment;
    var items = g.to_return || [];
    if (!items.length) return [heading("Returns"), waiting("No selector chose you this round.", "Waiting for the other candidates to decide their returns.")];
    var forms = items.map(function (t) {
      var key = "return-" + t.selector;
      if (t.returned !== null && t.returned !== undefined) {
        return h("section", { class: "card ret done" }, h("h2", { class: "card-title" }, t.name),
          h("p", null, "Sent you " + points(t.sent) + ", which became " + points(t.multiplied) + ". You returned ",
            h("strong", null, points(t.returned)), " and keep " + points(t.multiplied - t.returned) + "."));
      }
      var draftKey = "return." + t.selector;
      var summary = h("p", { class: "summary", id: key + "-summary", "aria-live": "polite" });
      var button = submitButton(key, "Return these points");
      function refresh() {
        var amount = amountValue(draftKey, 0, t.multiplied);
        summary.textContent = amount === null ? "Choose how many points to return." :
          t.name + " gets " + points(amount) + " back; you keep " + points(t.multiplied - amount) + ".";
        button.disabled = isBusy(key) || amount === null;
        if (amount !== null && ui.pending[key] === undefined && connected) button.textContent = "Return " + points(amount);
      }
      var form = h("form", { class: "card ret", novalidate: true, "aria-labelledby": key + "-title", onsubmit: function (ev) {
        ev.preventDefault();
        var amount = amountValue(draftKey, 0, t.multiplied);
        if (amount === null) return;
        submit(key, { type: "return.submit", round: g.round, selector: t.selector, amount: amount });
      } },
      h("h2", { class: "card-title", id: key + "-title" }, t.name + " chose you"),
      h("div", { class: "flow", "aria-label": "What happened" },
        h("div", { class: "flow-step" }, h("span", { class: "flow-n" }, t.sent), h("span", { class: "flow-l" }, "sent")),
        h("span", { class: "flow-arrow", "aria-hidden": "true" }, "×" + e.multiplier + " →"),
        h("div", { class: "flow-step strong" }, h("span", { class: "flow-n" }, t.multiplied), h("span", { class: "flow-l" }, "you received"))),
      amountField({ id: key + "-amount", key: draftKey, min: 0, max: t.multiplied, label: "How many points do you return to " + t.name + "?",
        unit: "points", disabled: isLocked(key), onchange: refresh }),
      summary, formError(key), h("div", { class: "actions" }, button));
      refresh();
      return form;
    });
    var open = items.filter(function (t) { return t.returned === null || t.returned === undefined; }).length;
    return [heading(open ? "Decide your " + plural(items.length, "return", "returns") : "Your returns"),
      items.length > 1 ? h("p", { class: "muted" }, items.length + " selectors chose you." + (open ? " Decide each return separately." : "")) : null,
      forms, g.todo ? null : waiting("Waiting for the other candidates.", null)];
  }

  function ledgerRow(label, value, cls) {
    return h("div", { class: "ledger-row" + (cls ? " " + cls : "") }, h("dt", null, label), h("dd", null, value));
  }

  function tallyView() {
    var g = state.game;
    if (!g.tally) return null;
    var max = 0;
    Object.keys(g.tally).forEach(function (k) { max = Math.max(max, g.tally[k]); });
    return h("section", { class: "card" }, h("h2", { class: "card-title" }, "How many selectors chose each candidate"),
      h("ul", { class: "tally" }, Object.keys(g.tally).sort().map(function (seat) {
        var card = candidateBySeat(seat) || { seat: seat, name: "Candidate " + seat };
        var n = g.tally[seat];
        return h("li", { style: { "--c": card.colour || "#555" } }, avatar(card, true), h("span", { class: "tally-name" }, card.name),
          h("span", { class: "tally-bar", "aria-hidden": "true" }, h("span", { style: { width: (max ? Math.round(100 * n / max) : 0) + "%" } })),
          h("span", { class: "tally-n" }, String(n)));
      })));
  }

  function viewFeedback(isSelector) {
    var g = state.game, e = state.experiment, f = g.feedback || {};
    // The state does not say whether a belief phase follows, so name no specific next step.
    var next = "The next step starts when the timer runs out.";
    var box;
    if (isSelector) {
      var card = f.candidate ? candidateBySeat(f.candidate) : null;
      box = h("section", { class: "card result" },
        card ? h("p", { class: "choice-summary" }, avatar(card, true), "You chose ", h("strong", null, card.name), ".")
          : h("p", null, "You did not choose a candidate this round."),
        h("dl", { class: "ledger" },
          ledgerRow("Your points this round", points(e.endowment)),
          ledgerRow("You sent", "− " + (f.sent || 0)),
          card ? ledgerRow(card.name + " received", points(f.multiplied || 0), "muted") : null,
          ledgerRow(card ? card.name + " returned" : "Returned", "+ " + (f.returned || 0)),
          ledgerRow("Your payoff this round", points(f.round_payoff !== null && f.round_payoff !== undefined ? f.round_payoff : f.payoff), "total")));
    } else {
      var rows = (g.to_return || []).map(function (t) {
        return ledgerRow(t.name + ": you received " + t.multiplied + " and returned " + (t.returned || 0),
          "+ " + (t.multiplied - (t.returned || 0)));
      });
      box = h("section", { class: "card result" },
        h("p", null, rows.length ? (rows.length === 1 ? "One selector" : rows.length + " selectors") + " chose you this round."
          : "No selector chose you this round."),
        h("dl", { class: "ledger" }, rows,
          ledgerRow("Your earnings this round", points(f.round_payoff !== null && f.round_payoff !== undefined ? f.round_payoff : (f.earned || 0)), "total")));
    }
    return [heading("Round " + g.round + " results"), box, tallyView(),
      h("p", { class: "muted center-text" }, next, " Your total so far: ", h("strong", null, points(g.payoff_total)), ".")];
  }

  function viewBelief() {
    var g = state.game, key = "belief";
    var given = g.beliefs || {};
    if (!g.todo) {
      return [heading("Your guesses"),
        h("section", { class: "card" }, h("ul", { class: "guesses" }, g.candidates.map(function (c) {
          var b = given[c.seat];
          return h("li", null, avatar(c, true), h("span", null, c.name), h("strong", null,
            b && b.guess ? (b.guess === "bot" ? "Bot" : "Human") + ", " + b.confidence + " % sure" : "no guess"));
        }))),
        waiting("Waiting for the other selectors.", null)];
    }
    var button = submitButton(key, "Submit my guesses");
    var summary = h("p", { class: "hint", id: "belief-summary" });
    function complete() {
      return g.candidates.every(function (c) {
        return draft("belief." + c.seat + ".guess", undefined) !== undefined && amountValue("belief." + c.seat + ".conf", 50, 100) !== null;
      });
    }
    function refresh() {
      var left = g.candidates.filter(function (c) {
        return draft("belief." + c.seat + ".guess", undefined) === undefined || amountValue("belief." + c.seat + ".conf", 50, 100) === null;
      }).length;
      summary.textContent = left ? "Give a guess and a confidence for every candidate (" + left + " left)." : "";
      button.disabled = isBusy(key) || left > 0;
    }
    var cards = g.candidates.map(function (c) {
      var name = "belief-" + c.seat;
      return h("fieldset", { class: "cand belief", style: { "--c": c.colour || "#555" } },
        h("legend", { class: "sr-only" }, c.name),
        h("div", { class: "cand-head" }, avatar(c), h("span", { class: "cand-name", "aria-hidden": "true" }, c.name), labelTag(c)),
        messageBlock(c),
        h("div", { class: "belief-q", role: "radiogroup", "aria-label": "Is " + c.name + " a human or a bot?" },
          h("span", { class: "label", "aria-hidden": "true" }, "Human or bot?"),
          h("div", { class: "options row" }, radios(name, "belief." + c.seat + ".guess",
            [{ value: "human", label: "Human" }, { value: "bot", label: "Bot" }], { pill: true, disabled: isLocked(key), onchange: refresh }))),
        amountField({ id: name + "-conf", key: "belief." + c.seat + ".conf", min: 50, max: 100, unit: "%", disabled: isLocked(key),
          label: "How sure are you about " + c.name + "?",
          shortLabel: "How sure are you?", hint: "50 % = just guessing, 100 % = completely sure.", onchange: refresh }));
    });
    var form = h("form", { novalidate: true, onsubmit: function (ev) {
      ev.preventDefault();
      if (!complete()) return;
      var beliefs = {};
      g.candidates.forEach(function (c) {
        beliefs[c.seat] = { guess: draft("belief." + c.seat + ".guess"), confidence: amountValue("belief." + c.seat + ".conf", 50, 100) };
      });
      submit(key, { type: "belief.submit", round: g.round, beliefs: beliefs });
    } },
    h("p", null, "For each candidate: do you think a human or a computer program (bot) wrote their messages and made their decisions?"),
    h("div", { class: "cands" }, cards),
    h("section", { class: "card" }, formError(key), h("div", { class: "actions" }, button, summary)));
    refresh();
    return [heading("Human or bot?"), form];
  }

  // ---- after the game ------------------------------------------------------------------------------------------

  function viewQuestionnaire() {
    var key = "questionnaire";
    var questions = (state.questionnaire && state.questionnaire.questions) || [];
    var button = submitButton(key, "Submit and finish", { wide: true });
    var problems = {};
    function answerOf(q) {
      var v = draft("q." + q.id, undefined);
      if (q.kind === "number" || q.kind === "scale") {
        var n = wholeNumber(v);
        return n !== null && n >= q.min && n <= q.max ? n : null;
      }
      if (q.kind === "choice") return v === undefined ? null : v;
      return v === undefined ? "" : String(v);
    }
    var fields = questions.map(function (q) {
      var id = "q-" + q.id;
      var optional = q.optional && !/optional/i.test(q.text) ? h("span", { class: "muted" }, " (optional)") : null;
      var problem = h("p", { class: "field-error", id: id + "-problem" });
      problems[q.id] = problem;
      if (q.kind === "choice" || q.kind === "scale") {
        var opts = q.kind === "choice" ? q.options.map(function (o) { return { value: String(o), label: String(o) }; }) : [];
        if (q.kind === "scale") for (var v = q.min; v <= q.max; v++) opts.push({ value: String(v), label: String(v) });
        return h("fieldset", { class: "question" + (q.kind === "scale" ? " scale" : ""), "aria-describedby": id + "-problem" },
          h("legend", null, q.text, optional),
          h("div", { class: "options" + (q.kind === "scale" ? " scale-row" : "") }, radios(id, "q." + q.id, opts, { pill: q.kind === "scale" })),
          problem);
      }
      var input;
      if (q.kind === "number") {
        input = bindDraft(h("input", { type: "number", id: id, min: q.min, max: q.max, step: 1, inputmode: "numeric", class: "short",
          value: draft("q." + q.id, ""), "aria-describedby": id + "-problem" }), "q." + q.id);
      } else {
        var counter = h("p", { class: "counter" });
        input = h("textarea", { id: id, rows: 3, value: draft("q." + q.id, ""), "aria-describedby": id + "-problem" });
        var max = q.max_length || 1000;
        var refreshCount = function () {
          var n = charCount(input.value);
          counter.textContent = n + " / " + max;
          counter.classList.toggle("over", n > max);
        };
        input.addEventListener("input", function () { ui.drafts["q." + q.id] = input.value; refreshCount(); });
        refreshCount();
        return h("div", { class: "field question" }, h("label", { for: id, class: "legend" }, q.text, optional), input, counter, problem);
      }
      return h("div", { class: "field question" }, h("label", { for: id, class: "legend" }, q.text, optional), input, problem);
    });
    var form = h("form", { class: "card prose", novalidate: true, onsubmit: function (ev) {
      ev.preventDefault();
      var answers = {}, firstBad = null;
      questions.forEach(function (q) {
        var a = answerOf(q);
        var bad = null;
        if ((a === null || a === "") && !q.optional) bad = q.kind === "number" ? "Please enter a whole number from " + q.min + " to " + q.max + "." : "Please answer this question.";
        if (q.kind === "text" && a.length > (q.max_length || 1000)) bad = "Please shorten this to at most " + q.max_length + " characters.";
        problems[q.id].textContent = bad || "";
        if (bad && !firstBad) firstBad = q;
        answers[q.id] = a === null ? "" : a;
      });
      if (firstBad) {
        var el = document.getElementById("q-" + firstBad.id) || document.getElementById("q-" + firstBad.id + "-0");
        if (el) el.focus();
        return;
      }
      submit(key, { type: "questionnaire.submit", answers: answers });
    } },
    heading("A few last questions"), h("p", null, "The game is over. Please answer these questions to finish."),
    fields, formError(key), h("div", { class: "actions" }, button));
    return form;
  }

  function money(amount, currency) {
    var value = Number(amount);
    try {
      return new Intl.NumberFormat(undefined, { style: "currency", currency: currency }).format(value);
    } catch (err) {
      return amount + " " + currency;
    }
  }

  function copyButton(text) {
    var button = h("button", { type: "button", class: "btn btn-small", id: "copy-code" }, "Copy");
    button.addEventListener("click", function () {
      var done = function () { button.textContent = "Copied"; };
      if (navigator.clipboard && window.isSecureContext) {
        navigator.clipboard.writeText(text).then(done, function () { selectCode(); });
      } else {
        selectCode();
      }
    });
    return button;
  }

  function selectCode() {
    var el = document.getElementById("completion-code");
    if (!el) return;
    var range = document.createRange();
    range.selectNodeContents(el);
    var sel = window.getSelection();
    sel.removeAllRanges();
    sel.addRange(range);
  }

  var END_TEXT = {
    finished: ["Thank you!", "You have completed the study."],
    lobby_timeout: ["Sorry, no group could be formed", "Not enough participants arrived in time to start a game. Thank you for waiting."],
    dropped: ["Your part in the game has ended", "The game went on without you. This happens after several missed decisions in a row, or when the researchers end a participation."],
    declined: ["You did not consent", "You chose not to take part in this study. Thank you for your time. You can close this page now."],
  };

  function viewEnd() {
    var end = state.end || {};
    var text = END_TEXT[end.reason] || END_TEXT[state.stage] || ["The study has ended", ""];
    var played = end.reason !== "declined";
    return h("section", { class: "card prose end" }, heading(text[0]), h("p", { class: "lead" }, text[1]),
      played ? h("dl", { class: "ledger" },
        ledgerRow("Points earned", points(end.payoff || 0)),
        ledgerRow("Your bonus", money(end.bonus, end.currency), "total"),
        end.participation_fee ? ledgerRow("Participation fee (paid separately)", money(end.participation_fee, end.currency), "muted") : null) : null,
      end.completion_code ? h("div", { class: "code-box" },
        h("p", { class: "label", id: "code-label" }, "Your completion code"),
        h("div", { class: "code-row" }, h("code", { id: "completion-code", "aria-labelledby": "code-label" }, end.completion_code), copyButton(end.completion_code)),
        h("p", { class: "hint" }, "Enter this code on the recruitment platform so that we can pay you.")) : null,
      end.redirect_url ? h("div", { class: "actions" },
        h("a", { class: "btn btn-primary", href: end.redirect_url, rel: "noreferrer" }, "Continue to the recruitment platform")) : null);
  }

  // ---- start -----------------------------------------------------------------------------------------------------

  setInterval(function () { tick(); tickBanner(); }, 250);
  updateBanner();
  render(true);
  connect();
})();
