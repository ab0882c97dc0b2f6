/* The live monitor: renders monitor.state, then applies monitor.group / monitor.session updates.
   Actions are CSRF-protected POSTs; the result arrives as an update over the websocket. */
(function () {
  "use strict";
  var root = document.getElementById("monitor");
  var csrf = root.dataset.csrf;
  var groups = {};          // id -> summary
  var skew = 0;             // server clock minus local clock, ms
  var people = {};          // person status -> count (consent, quiz, lobby, playing, finished, …)
  var socket = null, retry = 0;

  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) {
      if (k === "class") node.className = attrs[k];
      else if (k.slice(0, 2) === "on") node.addEventListener(k.slice(2), attrs[k]);
      else node.setAttribute(k, attrs[k]);
    });
    (children || []).forEach(function (c) {
      node.appendChild(typeof c === "string" || typeof c === "number" ? document.createTextNode(String(c)) : c);
    });
    return node;
  }

  function post(url, confirmText) {
    if (confirmText && !window.confirm(confirmText)) return;
    fetch(url, {method: "POST", headers: {"X-CSRFToken": csrf}, credentials: "same-origin"})
      .then(function (r) { return r.json(); })
      .then(function (body) { if (!body.ok) notice(body.message || "The action failed."); })
      .catch(function () { notice("The action could not be sent. Check your connection."); });
  }

  function notice(text) {
    var n = document.getElementById("notice");
    n.textContent = text; n.hidden = false;
    setTimeout(function () { n.hidden = true; }, 6000);
  }

  function countdown(deadline) {
    if (!deadline) return "—";
    var s = Math.max(0, Math.round((Date.parse(deadline) - (Date.now() + skew)) / 1000));
    return Math.floor(s / 60) + ":" + String(s % 60).padStart(2, "0");
  }

  function seatChip(seat) {
    var actions = [];
    if (seat.controller === "person" && ["idle", "offline", "submitted", "waiting", "timed out"].indexOf(seat.status) >= 0) {
      actions.push(el("button", {type: "button", class: "mini", title: "Remove this participant (defaults play the seat)",
        onclick: function () { post("/cockpit/participants/" + seat.id + "/remove/", "Remove this participant from the study?"); }}, ["remove"]));
      actions.push(el("button", {type: "button", class: "mini", title: "Hand this seat to a bot",
        onclick: function () { post("/cockpit/participants/" + seat.id + "/replace/", "Replace this participant with a bot?"); }}, ["→ bot"]));
    }
    return el("li", {class: "seat " + seat.status.replace(/\s+/g, "-")}, [
      el("span", {class: "seat-name"}, [seat.seat]),
      el("span", {class: "seat-status"}, [seat.status + (seat.controller === "person" && seat.connected ? " ●" : "")]),
      el("span", {class: "seat-pay"}, [seat.payoff + " pts"]),
      el("span", {class: "seat-actions"}, actions)
    ]);
  }

  function groupCard(g) {
    var playing = g.status === "playing";
    var buttons = [];
    if (playing) {
      buttons.push(g.paused
        ? el("button", {type: "button", onclick: function () { post("/cockpit/groups/" + g.id + "/resume/"); }}, ["Resume"])
        : el("button", {type: "button", onclick: function () { post("/cockpit/groups/" + g.id + "/pause/"); }}, ["Pause"]));
      buttons.push(el("button", {type: "button", disabled: g.paused ? "disabled" : null,
        onclick: function () { post("/cockpit/groups/" + g.id + "/close-phase/", "Close the current phase now? Missing decisions get their defaults."); }},
        ["Close phase now"]));
    }
    buttons = buttons.map(function (b) { if (b.getAttribute("disabled") === "null") b.removeAttribute("disabled"); return b; });
    var selectors = g.seats.filter(function (s) { return s.role === "selector"; });
    var candidates = g.seats.filter(function (s) { return s.role === "candidate"; });
    return el("article", {class: "group " + (playing ? (g.paused ? "paused" : "playing") : "finished"), id: "group-" + g.id}, [
      el("header", {}, [
        el("strong", {}, ["Group " + g.number]),
        el("span", {class: "pill"}, [g.condition]),
        g.society === "ai_only" ? el("span", {class: "pill ai-only"}, ["AI only"]) : "",
        el("span", {}, [playing ? "Round " + g.round + "/" + g.rounds + " · " + g.phase : "finished"]),
        el("span", {class: "clock", "data-deadline": g.deadline || ""}, [g.paused ? "paused" : (playing ? countdown(g.deadline) : "")])
      ]),
      el("div", {class: "seats"}, [
        el("ul", {"aria-label": "selectors"}, selectors.map(seatChip)),
        el("ul", {"aria-label": "candidates"}, candidates.map(seatChip))
      ]),
      el("footer", {}, buttons)
    ]);
  }

  function renderGroups() {
    var box = document.getElementById("groups");
    var ids = Object.keys(groups).map(Number).sort(function (a, b) { return groups[a].number - groups[b].number; });
    box.replaceChildren.apply(box, ids.map(function (id) { return groupCard(groups[id]); }));
    if (!ids.length) box.appendChild(el("p", {class: "muted"}, ["No group has formed yet."]));
    renderTotals();
  }

  function renderTotals() {
    var list = Object.keys(groups).map(function (k) { return groups[k]; });
    var seats = [].concat.apply([], list.map(function (g) { return g.seats; }));
    var count = function (f) { return seats.filter(f).length; };
    var box = document.getElementById("totals");
    var onboarding = (people.consent || 0) + (people.instructions || 0) + (people.quiz || 0);
    var items = [
      ["people joined", Object.keys(people).reduce(function (a, k) { return a + people[k]; }, 0)],
      ["reading / quiz", onboarding],
      ["finished", people.finished || 0],
      ["groups playing", list.filter(function (g) { return g.status === "playing"; }).length],
      ["groups finished", list.filter(function (g) { return g.status === "finished"; }).length],
      ["people connected", count(function (s) { return s.controller === "person" && s.connected; })],
      ["dropped / replaced", count(function (s) { return s.status === "dropped" || s.status === "bot-replaced"; })],
      ["points paid to humans", seats.filter(function (s) { return s.kind === "human"; }).reduce(function (a, s) { return a + s.payoff; }, 0)]
    ];
    box.replaceChildren.apply(box, items.map(function (it) {
      return el("div", {class: "stat"}, [el("span", {class: "stat-n"}, [it[1]]), el("span", {class: "stat-l"}, [it[0]])]);
    }));
  }

  function renderLobby(lobby) {
    var box = document.getElementById("lobby");
    document.getElementById("lobby-count").textContent = "(" + lobby.length + " waiting)";
    box.replaceChildren.apply(box, lobby.map(function (p) {
      return el("span", {class: "chip"}, [(p.recruitment_id || "#" + p.id) + " · " + p.waiting_seconds + " s" + (p.connected ? " ●" : ""),
        el("button", {type: "button", class: "mini", onclick: function () { post("/cockpit/participants/" + p.id + "/remove/", "Remove from the lobby?"); }}, ["remove"])]);
    }));
    if (!lobby.length) box.appendChild(el("span", {class: "muted"}, ["Nobody is waiting."]));
  }

  // Per bot profile: spend against the session budget, calls, calls in flight, throttled waits (bots.selectors.llm_live).
  function renderBots(rows) {
    if (!rows) return;
    document.getElementById("bots").hidden = !rows.length;
    var body = document.getElementById("bots-rows");
    body.replaceChildren.apply(body, rows.map(function (r) {
      var spent = r.cost + (r.budget ? " / " + r.budget + " (" + Math.round(r.budget_used * 100) + " %)" : "");
      return el("tr", {class: r.budget_stops ? "over-budget" : ""}, [
        el("td", {}, [r.profile]), el("td", {class: "num"}, [spent]), el("td", {class: "num"}, [r.calls]),
        el("td", {class: "num"}, [r.in_flight]), el("td", {class: "num"}, [r.throttled]), el("td", {class: "num"}, [r.budget_stops])
      ]);
    }));
  }

  function renderSession(session) {
    var end = document.getElementById("end-session");
    end.disabled = session.ended;
    end.textContent = session.ended ? "Session ended" : "End session";
  }

  function onMessage(ev) {
    var msg = JSON.parse(ev.data);
    if (msg.type === "monitor.state") {
      skew = Date.parse(msg.server_time) - Date.now();
      people = msg.totals.by_status || {};
      groups = {};
      msg.groups.forEach(function (g) { groups[g.id] = g; });
      renderGroups(); renderLobby(msg.lobby); renderSession(msg.session); renderBots(msg.bots);
    } else if (msg.type === "monitor.group") {
      var before = groups[msg.group.id];
      if (before && (before.round !== msg.group.round || before.status !== msg.group.status)) chartStale();
      groups[msg.group.id] = msg.group;
      var old = document.getElementById("group-" + msg.group.id);
      if (old) { old.replaceWith(groupCard(msg.group)); renderTotals(); } else renderGroups();
    } else if (msg.type === "monitor.session") {
      people = msg.people || people;
      renderLobby(msg.lobby); renderSession(msg.session); renderTotals(); renderBots(msg.bots);
    }
  }

  // The chart is redrawn by the server from the stored choices: reload it after a round ends, at most
  // every 15 s, so 100 groups finishing rounds do not turn into 100 plot renderings.
  var chartTimer = null;
  function chartStale() {
    if (chartTimer) return;
    chartTimer = setTimeout(function () {
      chartTimer = null;
      var img = document.getElementById("shift-chart");
      img.src = img.dataset.src + "?t=" + Date.now();
    }, 15000);
  }

  function connect() {
    var scheme = location.protocol === "https:" ? "wss://" : "ws://";
    socket = new WebSocket(scheme + location.host + root.dataset.wsPath);
    var conn = document.getElementById("conn");
    socket.onopen = function () { retry = 0; conn.textContent = "live"; conn.className = "pill live"; };
    socket.onmessage = onMessage;
    socket.onclose = function () {
      conn.textContent = "reconnecting…"; conn.className = "pill offline";
      retry = Math.min(retry + 1, 6);
      setTimeout(connect, 500 * Math.pow(2, retry - 1));
    };
  }

  var society = document.getElementById("society-form");
  if (society) society.addEventListener("submit", function (event) {
    event.preventDefault();
    var button = society.querySelector("button");
    button.disabled = true;
    fetch(society.action, {method: "POST", headers: {"X-CSRFToken": csrf}, credentials: "same-origin",
                           body: new FormData(society)})
      .then(function (r) { return r.json(); })
      .then(function (body) {
        notice(body.ok ? body.groups.length + " AI-only groups started." : (body.message || "The groups could not be started."));
      })
      .catch(function () { notice("The request could not be sent. Check your connection."); })
      .then(function () { button.disabled = false; });
  });

  document.getElementById("end-session").addEventListener("click", function () {
    post("/cockpit/sessions/" + root.dataset.session + "/end/",
      "End the whole session? Running groups finish with default decisions and everyone is sent to the end page.");
  });
  setInterval(function () {
    document.querySelectorAll(".clock[data-deadline]").forEach(function (c) {
      if (c.dataset.deadline && c.textContent !== "paused") c.textContent = countdown(c.dataset.deadline);
    });
  }, 1000);
  connect();
})();
