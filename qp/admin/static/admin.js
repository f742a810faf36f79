// The operator's page. Everything a chat, an app or a model name holds is put on the page
// as text (textContent), never as markup.
"use strict";

(() => {
  const STORED_KEY = "qpAdminKey";
  const VIEWS = ["spend", "chats", "clients", "health"];
  const OUTCOMES = [
    ["completed", "completed"],
    ["clientLeft", "client left"],
    ["upstreamError", "upstream error"],
    ["timeout", "timeout"],
    ["other", "other"],
  ];
  const OUTCOME_COLOURS = ["#59a14f", "#edc948", "#e15759", "#b07aa1", "#bab0ac"];
  const MAX_SERIES = 9; // the rest of the apps or models are one "other" series

  const $ = (id) => document.getElementById(id);
  const usd = new Intl.NumberFormat(undefined, {
    style: "currency", currency: "USD", minimumFractionDigits: 2, maximumFractionDigits: 4,
  });
  const count = new Intl.NumberFormat();
  const percent = new Intl.NumberFormat(undefined, {style: "percent", maximumFractionDigits: 1});
  const dateTime = new Intl.DateTimeFormat(undefined, {dateStyle: "medium", timeStyle: "short"});
  const dayOnly = new Intl.DateTimeFormat(undefined, {month: "short", day: "numeric",
    timeZone: "UTC"});
  const hourOnly = new Intl.DateTimeFormat(undefined, {hour: "2-digit", minute: "2-digit"});
  const when = (iso) => (iso ? dateTime.format(new Date(iso)) : "");

  // An element with attributes and children; strings become text nodes.
  function el(tag, attributes, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attributes || {})) {
      if (value === true) node.setAttribute(name, "");
      else if (value !== false && value !== null && value !== undefined) {
        node.setAttribute(name, String(value));
      }
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(typeof child === "string" ? document.createTextNode(child) : child);
    }
    return node;
  }

  function showUsd(node, value) {
    node.textContent = usd.format(value);
    node.dataset.usd = String(value);
  }

  // --- talking to the server ----------------------------------------------------------

  class WrongKey extends Error {}

  async function api(path, method = "GET") {
    let response;
    try {
      response = await fetch(path, {
        method,
        headers: {"x-admin-key": sessionStorage.getItem(STORED_KEY) || ""},
        cache: "no-store",
        credentials: "omit",
      });
    } catch (error) {
      // fetch itself refuses a key a header cannot carry: that is not the admin key either.
      if (/header/i.test(String(error && error.message))) throw new WrongKey();
      throw new Error("The server cannot be reached");
    }
    let body = null;
    try {
      body = await response.json();
    } catch {
      body = null;
    }
    if (response.status === 401) throw new WrongKey();
    if (!response.ok) {
      const said = body && (body.message || body.error);
      throw new Error(said ? `${said} (${response.status})` : `The server answered ${response.status}`);
    }
    return body;
  }

  function showProblem(error) {
    if (error instanceof WrongKey) {
      signOut("Wrong admin key");
      return;
    }
    const problem = $("problem");
    problem.textContent = error.message;
    problem.hidden = false;
  }

  function clearProblem() {
    $("problem").hidden = true;
    $("problem").textContent = "";
  }

  // --- signing in and out -------------------------------------------------------------

  function signOut(message) {
    sessionStorage.removeItem(STORED_KEY);
    for (const view of VIEWS) $(`view-${view}`).hidden = true;
    $("tabs").hidden = true;
    $("sign-out").hidden = true;
    clearProblem();
    $("sign-in").hidden = false;
    $("sign-in-error").textContent = message || "";
    $("admin-key").value = "";
    $("admin-key").focus();
  }

  async function signIn(event) {
    event.preventDefault();
    const key = $("admin-key").value;
    $("sign-in-error").textContent = "";
    sessionStorage.setItem(STORED_KEY, key);
    try {
      await api("/api/admin/overview");
    } catch (error) {
      sessionStorage.removeItem(STORED_KEY);
      $("sign-in-error").textContent =
        error instanceof WrongKey ? "Wrong admin key" : error.message;
      return;
    }
    $("admin-key").value = "";
    enter();
  }

  function enter() {
    $("sign-in").hidden = true;
    $("tabs").hidden = false;
    $("sign-out").hidden = false;
    route();
  }

  // --- views --------------------------------------------------------------------------

  function route() {
    if (!sessionStorage.getItem(STORED_KEY)) return;
    const view = VIEWS.includes(location.hash.slice(1)) ? location.hash.slice(1) : "spend";
    for (const name of VIEWS) {
      $(`view-${name}`).hidden = name !== view;
      const tab = $(`tab-${name}`);
      if (name === view) tab.setAttribute("aria-current", "page");
      else tab.removeAttribute("aria-current");
    }
    clearProblem();
    const load = {spend: loadSpend, chats: loadApps, clients: loadClients, health: loadHealth}[view];
    load().catch(showProblem);
  }

  // Spend -------------------------------------------------------------------------------

  async function loadSpend() {
    const days = $("spend-days").value;
    const by = $("spend-by").value;
    const payer = $("spend-payer").value;
    const spend = await api(`/api/admin/spend?days=${days}&by=${by}&payer=${payer}`);
    showUsd($("spend-today"), spend.today);
    showUsd($("spend-month"), spend.month);
    showUsd($("spend-total"), spend.total);
    $("spend-total-label").textContent = `Last ${spend.days} days`;
    drawDaily(spend);
    drawBudgets(spend.budgets);
    drawHourly(spend.hourly);
    drawCostSources(spend.costSource);
    drawCache(spend.cache);
    drawPolicies(await api("/api/admin/policies"));
    $("view-spend").dataset.loaded = "true";
  }

  function drawDaily(spend) {
    const shown = spend.names.slice(0, MAX_SERIES);
    const rest = spend.names.slice(MAX_SERIES);
    const series = shown.map((name, index) => ({
      name: name || "(no app)",
      values: spend.series.map((day) => day.costs[name] || 0),
      color: window.QPCharts.colour(index),
    }));
    if (rest.length) {
      series.push({
        name: `${rest.length} more`,
        values: spend.series.map((day) => rest.reduce((sum, name) => sum + (day.costs[name] || 0), 0)),
        color: "#888888",
      });
    }
    window.QPCharts.stackedBars($("chart-daily"), {
      labels: spend.series.map((day) => day.day),
      series,
      format: (value) => usd.format(value),
      axisLabel: (day) => dayOnly.format(new Date(`${day}T00:00:00Z`)),
      emptyText: "Nothing spent in this range",
    });
    drawLegend($("legend-daily"), series);
  }

  function drawLegend(list, series) {
    list.replaceChildren(...series.map((s) => {
      const swatch = el("span", {class: "swatch", "aria-hidden": "true"});
      swatch.style.backgroundColor = s.color;
      return el("li", {}, swatch, s.name);
    }));
  }

  function drawBudgets(budgets) {
    const box = $("budgets");
    if (!budgets.length) {
      box.replaceChildren(el("p", {class: "hint"},
        "No budget is set. Set them in the policy file's [budgets] (see docs/spend.md in qp-server)."));
      return;
    }
    box.replaceChildren(...budgets.map((budget) => {
      const name = budget.scope === "app"
        ? `App ${budget.app}, ${budget.period === "day" ? "daily" : "monthly"}`
        : `Server, ${budget.period === "day" ? "daily" : "monthly"}`;
      const spent = el("span", {class: "meter-spent"});
      const reserved = el("span", {class: "meter-reserved"});
      const share = (value) => `${Math.min(100, (value / budget.cap) * 100)}%`;
      spent.style.width = share(budget.spent);
      reserved.style.width = share(budget.reserved);
      const used = (budget.spent + budget.reserved) / budget.cap;
      const meter = el("div", {
        class: `meter${used >= 1 ? " meter-full" : used >= 0.8 ? " meter-high" : ""}`,
        role: "meter", "aria-valuemin": "0", "aria-valuemax": String(budget.cap),
        "aria-valuenow": String(budget.spent + budget.reserved), "aria-label": name,
      }, spent, reserved);
      return el("div", {class: "budget"},
        el("div", {class: "budget-head"}, el("strong", {}, name),
          el("span", {}, `${usd.format(budget.spent)} spent + ${usd.format(budget.reserved)} reserved of ${usd.format(budget.cap)}`)),
        meter,
        el("div", {class: "hint"}, `${usd.format(budget.remaining)} left · resets ${when(budget.resetsAt)}`));
    }));
  }

  function drawHourly(hourly) {
    const series = OUTCOMES.map(([key, name], index) => ({
      name, values: hourly.map((hour) => hour[key]), color: OUTCOME_COLOURS[index],
    }));
    window.QPCharts.stackedBars($("chart-hourly"), {
      labels: hourly.map((hour) => hour.hour),
      series,
      format: (value) => count.format(value),
      axisLabel: (hour) => hourOnly.format(new Date(hour)),
      emptyText: "No completions in the last 48 hours",
    });
    drawLegend($("legend-hourly"), series);
  }

  function drawCostSources(sources) {
    const names = {stream: "the stream's usage", generation: "looked up afterwards",
      estimate: "estimated"};
    const total = Object.values(sources).reduce((sum, s) => sum + s.cost, 0);
    $("cost-source").tBodies[0].replaceChildren(...Object.entries(sources).map(([source, s]) =>
      el("tr", {},
        el("th", {scope: "row"}, names[source] || source),
        el("td", {class: "number"}, count.format(s.completions)),
        el("td", {class: "number"}, usd.format(s.cost)),
        el("td", {class: "number"}, total > 0 ? percent.format(s.cost / total) : "–"))));
  }

  const REFUSED_FOR = {unknown_app: "no policy of its own", model: "a model it does not pay for",
    cap: "over its limits", prefix: "a system prompt not its own"};

  function drawPolicies(policies) {
    $("policies-summary").textContent = policies.apps.length
      ? (policies.requireListed ? "Apps without a policy of their own are refused the server's keys." : "")
      : "No app has a policy of its own: every app may use the cheap models. Set them in the policy file's [apps.\"name\"] sections (see docs/spend.md in qp-server).";
    const limits = (p) => [p.maxMessages && `${p.maxMessages} messages`,
      p.maxRequestChars && `${count.format(p.maxRequestChars)} characters`].filter(Boolean).join(", ") || "–";
    $("policies").tBodies[0].replaceChildren(...policies.apps.map((p) =>
      el("tr", {},
        el("th", {scope: "row"}, p.app === "*" ? "every other app" : p.app),
        el("td", {}, p.models ? p.models.join(", ") : "the cheap list"),
        el("td", {class: "number"}, p.maxCompletionTokens ? count.format(p.maxCompletionTokens) : "–"),
        el("td", {}, limits(p)),
        el("td", {}, p.systemPromptPrefixes ? p.systemPromptPrefixes.map((x) => `“${x.slice(0, 60)}${x.length > 60 ? "…" : ""}”`).join(" or ") : "any"),
        el("td", {class: "number"}, p.dailyBudget ? `${usd.format(p.spentToday)} of ${usd.format(p.dailyBudget)}` : usd.format(p.spentToday)))));
    $("policy-refusals").tBodies[0].replaceChildren(...(policies.refusals.length ? policies.refusals.map((r) =>
      el("tr", {},
        el("th", {scope: "row"}, r.app || "(no app)"),
        el("td", {}, REFUSED_FOR[r.reason] || r.reason),
        el("td", {class: "number"}, count.format(r.refusals)))) : [el("tr", {}, el("td", {colspan: "3"}, "Nothing refused since this process started."))]));
  }

  function drawCache(cache) {
    $("cache-summary").textContent = cache.hits
      ? `${count.format(cache.hits)} answers replayed, saving ${usd.format(cache.saved)}.`
      : "No answer replayed in this range. Turn the cache on per app in the policy file's [cache] (see docs/spend.md in qp-server).";
    $("cache-apps").tBodies[0].replaceChildren(...cache.apps.map((app) =>
      el("tr", {},
        el("th", {scope: "row"}, app.app || "(no app)"),
        el("td", {class: "number"}, count.format(app.hits)),
        el("td", {class: "number"}, percent.format(app.hitRate)),
        el("td", {class: "number"}, usd.format(app.saved)))));
  }

  // Chats -------------------------------------------------------------------------------

  let chatsShown = [];
  let appShown = null;
  let chatOpen = null;

  async function loadApps() {
    const {apps} = await api("/api/admin/apps");
    $("apps").replaceChildren(...apps.map((app) => {
      const button = el("button", {type: "button", class: "app",
        "aria-pressed": String(app.app === appShown)}, app.app, " ",
        el("span", {class: "badge"}, count.format(app.chats)));
      button.addEventListener("click", () => loadChats(app.app).catch(showProblem));
      return button;
    }));
    $("chats-hint").textContent = apps.length
      ? "Pick an app to see its newest 100 chats."
      : "No chats are stored yet.";
    if (appShown && apps.some((app) => app.app === appShown)) await loadChats(appShown);
    else if (apps.length === 1) await loadChats(apps[0].app);
  }

  function titleOf(chat) {
    for (const message of chat.messages) {
      if (!message || message.role !== "user") continue;
      const text = textOf(message.content);
      if (text) {
        const line = text.replace(/\s+/g, " ").trim();
        return line.length > 80 ? `${line.slice(0, 79)}…` : line;
      }
    }
    return "(no user message)";
  }

  function textOf(content) {
    if (typeof content === "string") return content;
    if (Array.isArray(content)) {
      return content.filter((part) => part && typeof part.text === "string")
        .map((part) => part.text).join(" ");
    }
    return "";
  }

  async function loadChats(app) {
    appShown = app;
    for (const button of $("apps").children) {
      button.setAttribute("aria-pressed", String(button.firstChild.textContent === app));
    }
    chatsShown = await api(`/api/chats?app=${encodeURIComponent(app)}`);
    $("chats-hint").textContent = chatsShown.length === 100
      ? `The newest 100 chats of ${app}, most recently updated first.`
      : `${count.format(chatsShown.length)} chats of ${app}, most recently updated first.`;
    const table = $("chat-table");
    table.tBodies[0].replaceChildren(...chatsShown.map((chat) => {
      const usage = chat.totalUsage || {};
      const open = el("button", {type: "button", class: "link"}, titleOf(chat));
      open.addEventListener("click", () => openChat(chat));
      return el("tr", {"data-chat-id": chat.chatId},
        el("td", {class: "title"}, open),
        el("td", {}, chat.model),
        el("td", {class: "number"},
          count.format((usage.promptTokens || 0) + (usage.completionTokens || 0))),
        el("td", {class: "number"}, usd.format(usage.estimatedCost || 0)),
        el("td", {}, when(chat.updatedAt)));
    }));
    table.hidden = false;
    $("chat-detail").hidden = true;
  }

  function openChat(chat) {
    chatOpen = chat;
    $("chat-title").textContent = titleOf(chat);
    const usage = chat.totalUsage || {};
    $("chat-meta").textContent = `${chat.app} · ${chat.model} · ${count.format(usage.promptTokens || 0)} prompt + ${count.format(usage.completionTokens || 0)} completion tokens · ${usd.format(usage.estimatedCost || 0)} · created ${when(chat.createdAt)} · updated ${when(chat.updatedAt)}`;
    $("messages").replaceChildren(...chat.messages.map(messageItem));
    $("chat-confirm").hidden = true;
    $("chat-delete").hidden = false;
    $("chat-detail").hidden = false;
    $("chat-close").focus();
  }

  function json(value) {
    return el("pre", {class: "json"}, JSON.stringify(value, null, 2));
  }

  function messageItem(message) {
    const item = el("li", {class: "message"});
    if (!message || typeof message !== "object") {
      item.append(el("div", {class: "role"}, "(not a message)"), json(message));
      return item;
    }
    const role = typeof message.role === "string" ? message.role : "(no role)";
    item.classList.add(`role-${/^[a-z]+$/.test(role) ? role : "other"}`);
    item.append(el("div", {class: "role"}, role));
    const {content} = message;
    if (typeof content === "string") {
      item.append(el("div", {class: "text"}, content));
    } else if (Array.isArray(content)) {
      for (const part of content) {
        if (part && part.type === "text" && typeof part.text === "string") {
          item.append(el("div", {class: "text"}, part.text));
        } else {
          item.append(el("details", {}, el("summary", {},
            (part && typeof part.type === "string" ? part.type : "part")), json(part)));
        }
      }
    } else if (content !== undefined && content !== null) {
      item.append(json(content));
    }
    if (message.tool_calls !== undefined) {
      const calls = Array.isArray(message.tool_calls) ? message.tool_calls.length : 1;
      item.append(el("details", {class: "tool-calls"},
        el("summary", {}, `Tool calls (${calls})`), json(message.tool_calls)));
    }
    const rest = Object.fromEntries(Object.entries(message)
      .filter(([name]) => !["role", "content", "tool_calls"].includes(name)));
    if (Object.keys(rest).length) {
      item.append(el("details", {}, el("summary", {}, "More"), json(rest)));
    }
    return item;
  }

  async function deleteChat() {
    const chat = chatOpen;
    await api(`/api/chats/${encodeURIComponent(chat.chatId)}`, "DELETE");
    chatOpen = null;
    $("chat-detail").hidden = true;
    await loadApps();
  }

  // Clients -----------------------------------------------------------------------------

  function blockRow(block) {
    const lift = el("button", {type: "button"}, "Lift");
    lift.setAttribute("aria-label", `Lift the block on ${block.client.slice(0, 12)}`);
    lift.addEventListener("click", async () => {
      lift.disabled = true;
      try {
        await api(`/api/admin/blocks/${encodeURIComponent(block.client)}`, "DELETE");
        await loadClients();
      } catch (error) {
        lift.disabled = false;
        showProblem(error);
      }
    });
    return el("tr", {"data-client": block.client},
      el("td", {}, el("code", {title: block.client}, `${block.client.slice(0, 12)}…`)),
      el("td", {}, when(block.since)),
      el("td", {}, when(block.until)),
      el("td", {}, lift));
  }

  // The blocks come a page at a time; "More blocks" asks for the page after the last.
  let blocksNext = null;

  async function moreBlocks() {
    const page = await api(`/api/admin/blocks?after=${encodeURIComponent(blocksNext)}`);
    $("blocks-table").tBodies[0].append(...page.blocks.map(blockRow));
    blocksNext = page.next;
    $("blocks-more").hidden = blocksNext === null;
  }

  async function loadClients() {
    const {blocks, refusals, next} = await api("/api/admin/blocks");
    const table = $("blocks-table");
    table.tBodies[0].replaceChildren(...blocks.map(blockRow));
    blocksNext = next;
    $("blocks-more").hidden = next === null;
    table.hidden = blocks.length === 0;
    $("no-blocks").hidden = blocks.length > 0;
    window.QPCharts.stackedBars($("chart-refusals"), {
      labels: refusals.map((hour) => hour.hour),
      series: [{name: "refusals", values: refusals.map((hour) => hour.refusals), color: "#e15759"}],
      format: (value) => count.format(value),
      axisLabel: (hour) => hourOnly.format(new Date(hour)),
      emptyText: "No request was refused",
    });
    $("view-clients").dataset.loaded = "true";
  }

  // Health ------------------------------------------------------------------------------

  function uptime(seconds) {
    const days = Math.floor(seconds / 86400);
    const hours = Math.floor((seconds % 86400) / 3600);
    const minutes = Math.floor((seconds % 3600) / 60);
    return days ? `${days} d ${hours} h` : hours ? `${hours} h ${minutes} min` : `${minutes} min`;
  }

  async function loadHealth() {
    const overview = await api("/api/admin/overview");
    const facts = [
      ["Status", overview.status === "ok" ? "ok" : "unavailable"],
      ...Object.entries(overview.checks).map(([name, state]) => [`Check: ${name}`, state]),
      ["Version", overview.version],
      ["Up since", `${when(overview.startedAt)} (${uptime(overview.uptimeSeconds)})`],
      ["Open streams", count.format(overview.openStreams)],
      ...Object.entries(overview.openBreakers || {}).map(
        ([model, seconds]) => [`Breaker open: ${model}`, `skipped for ${seconds} s more`],
      ),
      ["Database", overview.database],
      ["Blob storage", overview.storage],
    ];
    $("health-facts").replaceChildren(...facts.flatMap(([name, value]) => [
      el("dt", {}, name),
      el("dd", {class: value === "ok" ? "ok" : /^(unavailable|full|read-only|deleted|replaced|damaged)$/.test(value) ? "bad" : ""}, value),
    ]));
    $("settings").textContent = overview.settings;
    $("view-health").dataset.loaded = "true";
  }

  // --- wiring -------------------------------------------------------------------------

  document.addEventListener("DOMContentLoaded", () => {
    $("sign-in-form").addEventListener("submit", signIn);
    $("sign-out").addEventListener("click", () => signOut(""));
    $("spend-days").addEventListener("change", () => loadSpend().catch(showProblem));
    $("spend-by").addEventListener("change", () => loadSpend().catch(showProblem));
    $("spend-payer").addEventListener("change", () => loadSpend().catch(showProblem));
    $("health-refresh").addEventListener("click", () => loadHealth().catch(showProblem));
    $("blocks-more").addEventListener("click", () => moreBlocks().catch(showProblem));
    $("chat-close").addEventListener("click", () => { $("chat-detail").hidden = true; });
    $("chat-delete").addEventListener("click", () => {
      $("chat-delete").hidden = true;
      $("chat-confirm").hidden = false;
      $("chat-delete-no").focus();
    });
    $("chat-delete-no").addEventListener("click", () => {
      $("chat-confirm").hidden = true;
      $("chat-delete").hidden = false;
    });
    $("chat-delete-yes").addEventListener("click", () => deleteChat().catch(showProblem));
    window.addEventListener("hashchange", route);
    if (sessionStorage.getItem(STORED_KEY)) {
      api("/api/admin/overview").then(enter, (error) => {
        if (error instanceof WrongKey) signOut("");
        else enter();
      });
    } else {
      $("admin-key").focus();
    }
  });
})();
