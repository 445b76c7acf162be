// tokenservice console: Settings → API Keys over the public REST API.
//
// The sign-in token lives in sessionStorage only (never localStorage, never a
// cookie). A raw token returned by Create or Rotate is shown once in its dialog
// and dropped from the page when the dialog closes. Everything from the API is
// put on the page as text (textContent), never as markup.
"use strict";

(function () {
  const API = "/api/v1";
  const SESSION_KEY = "tokenservice.console.token";
  const MANAGE = "api_token:manage";
  const ADMIN = "api_token:admin";
  const PAGE_SIZE = 20;
  const CREATE_FIELDS = ["name", "scopes", "expiresAt", "rateLimit"];
  const UNUSED_DAYS = 90;
  // Counting what a token minted reads the whole list, at most this many pages
  // of the largest size the API serves (so 10,000 tokens) before it says "at least".
  const COUNT_PAGE_SIZE = 1000;
  const COUNT_MAX_PAGES = 10;
  const STATE_WORDS = { ACTIVE: "Active", EXPIRED: "Expired", REVOKED: "Revoked" };

  const $ = (id) => document.getElementById(id);

  const state = {
    token: null, // the sign-in token
    who: null, // the AuthenticateResponse for it
    catalog: null, // [{name, description, apiOnly}]
    tokens: [], // ApiToken JSON, as listed so far
    nextPageToken: "",
    // The list's filters. `since` is fixed when a listing starts, so every
    // page of it asks with the same filters (the API binds page tokens to them).
    filters: { state: "", unused: false, since: "" },
    listing: 0, // increases with every list request; older answers are dropped
    editing: null, // the ApiToken the create dialog edits; null to create one
    rotating: null, // the ApiToken the rotate dialog is about
    revoking: null, // the ApiToken the revoke dialog is about
    minted: null, // what the revoking token minted: {ids, active, complete}, or null
    opener: null, // the element focused before a dialog opened
  };

  // -- the API ---------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, code, message, details, retryAfter) {
      super(message);
      this.status = status;
      this.code = code;
      this.details = details || [];
      this.retryAfter = retryAfter;
    }
  }

  async function api(method, path, body, token) {
    const headers = { Accept: "application/json" };
    if (token !== undefined) headers.Authorization = "Bearer " + token;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    let response;
    try {
      response = await fetch(API + path, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        cache: "no-store",
        credentials: "omit",
        redirect: "error",
      });
    } catch (err) {
      throw new ApiError(0, "network_error",
        "Could not reach tokenservice. Check your connection and try again.");
    }
    let data = null;
    try {
      data = await response.json();
    } catch (err) {
      data = null;
    }
    if (response.ok) return data;
    const error = (data && data.error) || {};
    throw new ApiError(
      response.status,
      error.code || "http_" + response.status,
      error.message || "The service answered " + response.status + " " + response.statusText + ".",
      Array.isArray(error.details) ? error.details : [],
      response.headers.get("Retry-After"),
    );
  }

  // Calls that need the sign-in token. A 401 ends the session: the token was
  // revoked, expired or its user disabled since it was checked.
  async function authed(method, path, body) {
    try {
      return await api(method, path, body, state.token);
    } catch (err) {
      if (err.status === 401) {
        signOut("Your sign-in token is no longer accepted: it has expired or been revoked, " +
          "or its user was disabled. Sign in with a valid token.", true);
      }
      throw err;
    }
  }

  // Words for an error, whatever its source.
  function describe(err) {
    switch (err.status) {
      case 0:
        return err.message;
      case 403:
        return "Not allowed: " + err.message;
      case 404:
        return "Not found: it may have been deleted, or it is outside what your token can reach.";
      case 409:
        return "Not possible in the API key's current state: " + err.message +
          ". Refresh the list to see where it stands.";
      case 429: {
        const wait = err.retryAfter ? " Try again in " + err.retryAfter + " seconds." : " Try again shortly.";
        return "Too many requests." + wait;
      }
      case 503:
        return "The service is unavailable right now. Try again later.";
      default:
        if (err.status >= 500) return "The service failed to answer (" + err.status + "). Try again later.";
        return err.message;
    }
  }

  // -- small DOM helpers -----------------------------------------------------

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else node.setAttribute(key, value === true ? "" : value);
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function show(node, visible) {
    node.hidden = !visible;
  }

  function alertBox(node, message) {
    node.textContent = message || "";
    show(node, Boolean(message));
  }

  let statusTimer = null;
  function announce(message) {
    const status = $("status");
    status.textContent = message;
    clearTimeout(statusTimer);
    if (message) statusTimer = setTimeout(() => { status.textContent = ""; }, 8000);
  }

  // "2026-12-31T23:59:59Z" -> <time>2026-12-31 23:59 UTC</time> (two lines in the table)
  function timeCell(iso, empty) {
    if (!iso) return el("span", { class: "muted", text: empty });
    return el("time", { datetime: iso, title: iso },
      el("span", { class: "date", text: iso.slice(0, 10) }), " ",
      el("span", { class: "tod", text: iso.slice(11, 16) + " UTC" }));
  }

  function scopeChips(scopes) {
    const list = el("ul", { class: "chips" });
    for (const scope of scopes) list.append(el("li", { class: "chip", text: scope }));
    return list;
  }

  function isExpired(t) {
    return Boolean(t.expiresAt) && Date.parse(t.expiresAt) <= Date.now();
  }

  // The state the API computed when it listed the token; an expiry that has
  // passed since then counts too.
  function stateOf(t) {
    const listed = t.state || (t.revokedAt ? "REVOKED" : "ACTIVE");
    return listed === "ACTIVE" && isExpired(t) ? "EXPIRED" : listed;
  }

  // RFC 3339 in UTC, whole seconds: what the API reads as a Timestamp.
  function rfc3339(ms) {
    return new Date(ms).toISOString().replace(/\.\d+Z$/, "Z");
  }

  // A google.protobuf.Duration in JSON ("60s", "0.5s") -> seconds.
  function durationSeconds(text) {
    const match = /^(\d+(?:\.\d+)?)s$/.exec(String(text || ""));
    return match ? Number(match[1]) : NaN;
  }

  const UNITS = [[86400, "day"], [3600, "hour"], [60, "minute"], [1, "second"]];

  // 60 -> "minute", 7200 -> "2 hours", 90 -> "90 seconds".
  function periodWords(seconds) {
    for (const [size, unit] of UNITS) {
      if (seconds >= size && seconds % size === 0) {
        const n = seconds / size;
        return n === 1 ? unit : n + " " + unit + "s";
      }
    }
    return seconds + " seconds";
  }

  // {requests: 600, period: "60s"} -> "600 per minute".
  function rateWords(limit) {
    return limit.requests + " per " + periodWords(durationSeconds(limit.period));
  }

  function plural(n, one, many) {
    return n + " " + (n === 1 ? one : many);
  }

  // The listed tokens by id, rebuilt with every drawing of the list.
  let listedById = new Map();

  function prefixOf(id) {
    const t = listedById.get(id);
    return t ? t.tokenPrefix + "…" : null;
  }

  // -- dialogs ---------------------------------------------------------------

  function openDialog(dialog, focusTarget) {
    state.opener = document.activeElement;
    dialog.showModal();
    (focusTarget || dialog.querySelector("input, button")).focus();
  }

  // The secret goes at once: a dialog's "close" event (which also clears it, for
  // Escape) comes a task later, and the page should not hold the token meanwhile.
  function closeDialog(dialog) {
    hideSecret();
    if (dialog.open) dialog.close();
  }

  // Focus goes back to where it was, or to a sensible place if that is gone.
  function restoreFocus(fallback) {
    let opener = state.opener;
    state.opener = null;
    if (!state.token) return; // signed out meanwhile: the sign-in form has the focus
    if (opener && !opener.isConnected && opener.dataset && opener.dataset.action) {
      // The list was drawn again meanwhile: the same button of the same row.
      opener = document.querySelector('#tokens-body button[data-action="' + opener.dataset.action +
        '"][data-id="' + CSS.escape(opener.dataset.id) + '"]');
    }
    if (opener && opener.isConnected && !opener.disabled && !opener.hidden) opener.focus();
    else if (fallback && fallback.isConnected) fallback.focus();
  }

  for (const button of document.querySelectorAll("dialog [data-close]")) {
    button.addEventListener("click", () => closeDialog(button.closest("dialog")));
  }

  // -- sign in and out -------------------------------------------------------

  function showView(name) {
    show($("signin-view"), name === "signin");
    show($("keys-view"), name === "keys");
    show($("whoami"), name === "keys");
  }

  function signOut(message, isError) {
    sessionStorage.removeItem(SESSION_KEY);
    state.token = null;
    state.who = null;
    state.tokens = [];
    state.nextPageToken = "";
    state.filters = { state: "", unused: false, since: "" };
    $("filters").reset();
    for (const dialog of document.querySelectorAll("dialog")) closeDialog(dialog);
    $("tokens-body").replaceChildren();
    showView("signin");
    alertBox($("signin-alert"), isError ? message : "");
    announce(isError ? "" : message || "");
    $("signin-token").value = "";
    $("signin-token").focus();
  }

  function rejected(message) {
    const error = new Error(message);
    error.rejected = true; // the token itself will not do, as opposed to the service failing
    return error;
  }

  // Checks a token with POST /authenticate; resolves to the answer or throws
  // an Error whose message says why the console cannot use it.
  async function verify(token) {
    let who;
    try {
      who = await api("POST", "/authenticate", { token });
    } catch (err) {
      if (err.status === 401 || err.status === 422) {
        throw rejected("This token was not accepted. Check that you pasted all of it; " +
          "it may also have expired or been revoked.");
      }
      throw new Error(describe(err));
    }
    if (!who.scopes.includes(MANAGE)) {
      throw rejected("This token does not hold the " + MANAGE + " scope, which the console " +
        "needs to list, create, rotate and revoke API keys.");
    }
    return who;
  }

  function fieldError(input, errorNode, message) {
    errorNode.textContent = message || "";
    show(errorNode, Boolean(message));
    if (message) input.setAttribute("aria-invalid", "true");
    else input.removeAttribute("aria-invalid");
  }

  $("signin-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const input = $("signin-token");
    const token = input.value.trim();
    alertBox($("signin-alert"), "");
    if (!token) {
      fieldError(input, $("signin-token-error"), "Paste an API token to sign in.");
      input.focus();
      return;
    }
    fieldError(input, $("signin-token-error"), "");
    const submit = $("signin-submit");
    submit.disabled = true;
    submit.textContent = "Signing in…";
    try {
      const who = await verify(token);
      sessionStorage.setItem(SESSION_KEY, token);
      input.value = "";
      await enter(token, who);
    } catch (err) {
      fieldError(input, $("signin-token-error"), err.message);
      input.focus();
    } finally {
      submit.disabled = false;
      submit.textContent = "Sign in";
    }
  });

  $("sign-out").addEventListener("click", () => signOut("You are signed out.", false));

  async function enter(token, who) {
    state.token = token;
    state.who = who;
    renderSession();
    showView("keys");
    $("keys-title").focus({ preventScroll: true });
    announce("Signed in as " + who.userEmail + ".");
    await Promise.all([loadCatalog(), loadTokens(true)]);
  }

  function renderSession() {
    const who = state.who;
    $("who-email").textContent = who.userEmail;
    $("who-org").textContent = who.orgId;
    $("session-email").textContent = who.userEmail;
    $("session-prefix").textContent = "token " + state.token.slice(0, 12) + "…";
    $("session-email-full").textContent = who.userEmail;
    $("session-org").textContent = who.orgId;
    $("session-scopes").replaceChildren(scopeChips(who.scopes));
    $("session-expires").replaceChildren(timeCell(who.expiresAt, "never"));
    const admin = who.scopes.includes(ADMIN);
    const note = $("admin-note");
    note.textContent = admin
      ? "You hold " + ADMIN + ": this list shows every API token in the organization " +
        who.orgId + ", whoever created it."
      : "";
    show(note, admin);
    document.body.classList.toggle("is-admin", admin);
  }

  // -- the list --------------------------------------------------------------

  // One page of the list, with the filters in force. A listing from the start
  // fixes "unused since" anew; its later pages repeat the same value.
  async function loadTokens(fromStart) {
    if (!state.token) return null;
    const filters = state.filters;
    if (fromStart) {
      filters.since = filters.unused ? rfc3339(Date.now() - UNUSED_DAYS * 86400 * 1000) : "";
    }
    const more = $("load-more");
    const query = new URLSearchParams({ pageSize: String(PAGE_SIZE) });
    if (filters.state) query.set("state", filters.state);
    if (filters.since) query.set("notUsedSince", filters.since);
    if (!fromStart && state.nextPageToken) query.set("pageToken", state.nextPageToken);
    const listing = ++state.listing;
    more.disabled = true;
    $("tokens-table").setAttribute("aria-busy", "true");
    try {
      const page = await authed("GET", "/api-tokens?" + query.toString());
      if (listing !== state.listing) return null; // a newer listing has started
      state.tokens = fromStart ? page.tokens : state.tokens.concat(page.tokens);
      state.nextPageToken = page.nextPageToken || "";
      alertBox($("list-alert"), "");
      renderTokens();
      return page;
    } catch (err) {
      if (listing !== state.listing) return null;
      if (err.status !== 401) alertBox($("list-alert"), "Could not load API keys. " + describe(err));
      return null;
    } finally {
      if (listing === state.listing) {
        more.disabled = false;
        $("tokens-table").removeAttribute("aria-busy");
      }
    }
  }

  // A rotation link: "Replaced by tks_…" / "Replaces tks_…" (or "a key not listed here").
  function link(words, id) {
    if (!id) return null;
    const prefix = prefixOf(id);
    return el("span", { class: "link" }, words + " ",
      prefix ? el("code", { class: "prefix", text: prefix }) : el("span", { text: "a key not listed here" }));
  }

  function stateCell(t) {
    const now = stateOf(t);
    return el("span", { class: "state" },
      el("span", { class: "badge badge-" + now.toLowerCase(), text: STATE_WORDS[now] || now }),
      now === "REVOKED" ? " " : null, now === "REVOKED" ? timeCell(t.revokedAt, "") : null,
      link("Replaced by", t.replacedById),
      link("Replaces", t.rotatedFromId));
  }

  function actionButton(action, t, words, style) {
    return el("button", {
      type: "button", class: "button button-small " + style,
      "data-action": action, "data-id": t.id, "aria-label": words + " " + t.name,
    }, words);
  }

  // Edit and Rotate while the token is in use and not replaced (the API refuses
  // both afterwards: 409); Revoke until it is revoked. Rotate only your own tokens:
  // the API lets nobody else have a working secret of yours (403).
  function actionsOf(t) {
    const now = stateOf(t);
    const current = !t.replacedById && now !== "REVOKED";
    const own = state.who && t.createdByEmail === state.who.userEmail;
    return el("div", { class: "row-actions" },
      current ? actionButton("edit", t, "Edit", "") : null,
      current && own && now === "ACTIVE" ? actionButton("rotate", t, "Rotate", "") : null,
      now !== "REVOKED" ? actionButton("revoke", t, "Revoke", "button-danger-quiet") : null);
  }

  function renderRow(t) {
    const current = state.who && t.id === state.who.tokenId;
    const nameCell = el("th", { scope: "row", class: "name", tabindex: "-1", "data-id": t.id },
      el("span", { class: "name-text", text: t.name }),
      current ? " " : null, current ? el("span", { class: "tag", text: "this session" }) : null);
    return el("tr", { "data-id": t.id, class: stateOf(t) !== "ACTIVE" ? "inactive" : null },
      nameCell,
      el("td", {}, el("code", { class: "prefix", text: t.tokenPrefix + "…" })),
      el("td", {}, scopeChips(t.scopes)),
      el("td", { class: "col-owner", text: t.createdByEmail }),
      el("td", {}, timeCell(t.createdAt, "")),
      el("td", {}, timeCell(t.lastUsedAt, "never")),
      el("td", {}, timeCell(t.expiresAt, "never")),
      el("td", {}, t.rateLimit ? el("span", { class: "rate", text: rateWords(t.rateLimit) })
        : el("span", { class: "muted", text: "default" })),
      el("td", {}, stateCell(t)),
      el("td", { class: "actions" }, actionsOf(t)));
  }

  function filtered() {
    return Boolean(state.filters.state || state.filters.unused);
  }

  function renderTokens() {
    listedById = new Map(state.tokens.map((t) => [t.id, t]));
    $("tokens-body").replaceChildren(...state.tokens.map(renderRow));
    const none = state.tokens.length === 0;
    show($("empty"), none && !filtered());
    show($("empty-filtered"), none && filtered());
    show($("tokens-table"), !none);
    show($("load-more"), Boolean(state.nextPageToken));
  }

  function replaceListed(token) {
    state.tokens = state.tokens.map((t) => (t.id === token.id ? token : t));
    renderTokens();
  }

  // The filters apply at once; the list starts again from its first page.
  async function applyFilters() {
    state.filters.state = $("filter-state").value;
    state.filters.unused = $("filter-unused").checked;
    const page = await loadTokens(true);
    if (page) {
      const shown = state.tokens.length + (state.nextPageToken ? " or more" : "");
      announce(filtered() ? "Showing " + shown + " matching API keys." : "Showing all API keys.");
    }
  }

  $("filter-state").addEventListener("change", applyFilters);
  $("filter-unused").addEventListener("change", applyFilters);
  $("filters").addEventListener("submit", (event) => event.preventDefault());

  $("refresh").addEventListener("click", async () => {
    if (await loadTokens(true)) announce("API keys refreshed.");
  });

  $("load-more").addEventListener("click", async () => {
    const before = state.tokens.length;
    const page = await loadTokens(false);
    if (page) {
      announce("Loaded " + page.tokens.length + " more API keys.");
      // Keep the keyboard where the new rows start.
      const first = $("tokens-body").rows[before];
      if (first) first.querySelector("th").focus();
      else $("keys-title").focus();
    }
  });

  $("tokens-body").addEventListener("click", (event) => {
    const button = event.target.closest("button[data-action]");
    if (!button) return;
    const token = state.tokens.find((t) => t.id === button.dataset.id);
    if (!token) return;
    if (button.dataset.action === "edit") openEdit(token);
    else if (button.dataset.action === "rotate") openRotate(token);
    else if (button.dataset.action === "revoke") openRevoke(token);
  });

  // -- create and edit -------------------------------------------------------

  async function loadCatalog() {
    try {
      const answer = await api("GET", "/scopes");
      state.catalog = answer.scopes;
    } catch (err) {
      state.catalog = null;
      alertBox($("list-alert"), "Could not load the scope catalog. " + describe(err));
    }
  }

  // The catalog's order and descriptions, limited to what the sign-in token
  // holds; a held scope the catalog no longer lists is left out. When editing,
  // the token's own scopes are shown checked too; one the sign-in token does
  // not hold cannot be granted again, so it cannot be ticked or unticked.
  function renderScopeChoices(carried) {
    const list = $("create-scopes-list");
    const held = new Set(state.who.scopes);
    const has = new Set(carried || []);
    const catalog = state.catalog || [];
    const choices = catalog.filter((s) => held.has(s.name) || has.has(s.name));
    for (const name of has) {
      if (!catalog.some((s) => s.name === name)) choices.push({ name, description: "", apiOnly: false });
    }
    list.replaceChildren(...choices.map((s, i) => {
      const id = "scope-" + i;
      const mine = held.has(s.name);
      return el("div", { class: "scope" },
        el("input", { type: "checkbox", id, name: "scopes", value: s.name,
          checked: has.has(s.name), disabled: !mine }),
        el("label", { for: id },
          el("code", { class: "scope-name", text: s.name }),
          s.apiOnly ? el("span", { class: "tag", text: "API only" }) : null,
          mine ? null : el("span", { class: "tag", text: "not held by your sign-in token" }),
          el("span", { class: "scope-desc", text: s.description })));
    }));
    if (choices.length === 0) {
      list.append(el("p", { class: "muted", text: "No scopes available: the scope catalog could not be loaded." }));
    }
  }

  function clearCreateErrors() {
    alertBox($("create-alert"), "");
    fieldError($("create-name"), $("create-name-error"), "");
    fieldError($("create-scopes"), $("create-scopes-error"), "");
    fieldError($("create-expires"), $("create-expires-error"), "");
    fieldError($("create-rate-requests"), $("create-rate-error"), "");
  }

  const FIELD_NODES = {
    name: ["create-name", "create-name-error"],
    scopes: ["create-scopes", "create-scopes-error"],
    expiresAt: ["create-expires", "create-expires-error"],
    rateLimit: ["create-rate-requests", "create-rate-error"],
  };

  const FIELD_LABELS = {
    name: "Name", scopes: "Scopes", expiresAt: "The expiry date", rateLimit: "The rate limit",
  };

  // "is required" -> "Name is required."; "at least one scope ..." -> "At least one scope ...".
  function sentence(label, description) {
    let text = String(description || "").trim();
    if (/^(is|are|must|may|can|has|have|should|contains?)\b/.test(text)) text = label + " " + text;
    text = text.charAt(0).toUpperCase() + text.slice(1);
    return /[.!?]$/.test(text) ? text : text + ".";
  }

  // Puts each validation detail beside its field (`scopes[1]` is `scopes`);
  // details about anything else go to the dialog's alert. Returns the first
  // field with an error, to move focus there.
  function showCreateErrors(err) {
    const failed = state.editing ? "The changes were not saved" : "The API key was not created";
    const messages = {};
    const other = [];
    for (const detail of err.details) {
      const field = String(detail.field || "").split(/[.[]/)[0];
      if (CREATE_FIELDS.includes(field)) (messages[field] = messages[field] || []).push(detail.description);
      else other.push((detail.field ? detail.field + ": " : "") + detail.description);
    }
    let first = null;
    for (const field of CREATE_FIELDS) {
      if (!messages[field]) continue;
      const [inputId, errorId] = FIELD_NODES[field];
      const text = messages[field].map((m) => sentence(FIELD_LABELS[field], m)).join(" ");
      fieldError($(inputId), $(errorId), text);
      first = first || $(inputId);
    }
    if (other.length || !first) {
      alertBox($("create-alert"), [failed + ". " + describe(err)].concat(other).join(" "));
    } else {
      alertBox($("create-alert"), failed + ": correct the fields marked below.");
    }
    return first;
  }

  // Picks the period in the list, adding it when the token has one the list lacks.
  function choosePeriod(period) {
    const select = $("create-rate-period");
    const seconds = durationSeconds(period);
    let option = Array.from(select.options).find((o) => durationSeconds(o.value) === seconds);
    if (!option) {
      option = el("option", { value: period, text: periodWords(seconds), "data-added": true });
      select.append(option);
    }
    select.value = option.value;
  }

  // Opens the form empty to create a token, or filled with `token` to edit it.
  function openTokenForm(token) {
    state.editing = token;
    $("create-form").reset();
    for (const added of $("create-rate-period").querySelectorAll("[data-added]")) added.remove();
    clearCreateErrors();
    renderScopeChoices(token ? token.scopes : null);
    $("create-title").textContent = token ? "Edit API key" : "Create API Key";
    $("create-submit").textContent = token ? "Save changes" : "Create";
    $("create-expires").min = new Date().toISOString().slice(0, 10);
    if (token) {
      $("create-name").value = token.name;
      $("create-expires").value = token.expiresAt ? token.expiresAt.slice(0, 10) : "";
      if (token.rateLimit) {
        $("create-rate-requests").value = String(token.rateLimit.requests);
        choosePeriod(token.rateLimit.period);
      }
    }
    show($("create-form"), true);
    hideSecret();
    openDialog($("create-dialog"), $("create-name"));
  }

  function openEdit(token) {
    openTokenForm(token);
  }

  $("open-create").addEventListener("click", async () => {
    if (!state.catalog) await loadCatalog();
    openTokenForm(null);
  });

  // The form as a CreateToken body; null (after marking the field) if a value
  // cannot be sent at all. The API checks everything else.
  function readTokenForm() {
    const expires = $("create-expires");
    if (expires.validity.badInput) {
      fieldError(expires, $("create-expires-error"), "Enter a complete date, or leave it empty.");
      expires.focus();
      return null;
    }
    const requests = $("create-rate-requests");
    const count = requests.value.trim();
    if (requests.validity.badInput || (count && !/^-?\d+$/.test(count))) {
      fieldError(requests, $("create-rate-error"),
        "Enter a whole number of requests, or leave it empty for the default limit.");
      requests.focus();
      return null;
    }
    return {
      name: $("create-name").value,
      scopes: Array.from(document.querySelectorAll("#create-scopes-list input:checked"), (i) => i.value),
      expiresAt: expires.value ? expires.value + "T23:59:59Z" : null,
      rateLimit: count ? { requests: Number(count), period: $("create-rate-period").value } : null,
    };
  }

  function sameLimit(a, b) {
    if (!a || !b) return !a && !b;
    return a.requests === b.requests && durationSeconds(a.period) === durationSeconds(b.period);
  }

  // PATCH sends only what changed: the API takes the body's keys as the update mask.
  function changesTo(token, form) {
    const changes = {};
    if (form.name.trim() !== token.name) changes.name = form.name;
    const before = [...token.scopes].sort().join(" ");
    if ([...form.scopes].sort().join(" ") !== before) changes.scopes = form.scopes;
    const day = token.expiresAt ? token.expiresAt.slice(0, 10) : "";
    if ((form.expiresAt || "").slice(0, 10) !== day) changes.expiresAt = form.expiresAt;
    if (!sameLimit(form.rateLimit, token.rateLimit)) changes.rateLimit = form.rateLimit;
    return changes;
  }

  $("create-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    clearCreateErrors();
    const form = readTokenForm();
    if (!form) return;
    const editing = state.editing;
    const submit = $("create-submit");
    const idle = submit.textContent;
    submit.disabled = true;
    submit.textContent = editing ? "Saving…" : "Creating…";
    try {
      if (editing) {
        const changes = changesTo(editing, form);
        if (Object.keys(changes).length === 0) {
          closeDialog($("create-dialog"));
          announce("Nothing to save: no field of " + editing.name + " was changed.");
          return;
        }
        const saved = await authed("PATCH", "/api-tokens/" + encodeURIComponent(editing.id), changes);
        closeDialog($("create-dialog"));
        replaceListed(saved);
        announce("API key " + saved.name + " saved.");
        return;
      }
      const body = { name: form.name, scopes: form.scopes };
      if (form.expiresAt) body.expiresAt = form.expiresAt;
      if (form.rateLimit) body.rateLimit = form.rateLimit;
      const created = await authed("POST", "/api-tokens", body);
      show($("create-form"), false);
      showSecret($("create-dialog"), created, "API key created", null);
      announce("API key " + created.apiToken.name + " created. Copy the token now: it will not be shown again.");
      loadTokens(true);
    } catch (err) {
      if (err.status === 401) return; // signed out, with the reason
      const first = showCreateErrors(err);
      (first && first.id === "create-scopes" ? first.querySelector("input") || first : first || $("create-name")).focus();
    } finally {
      submit.disabled = false;
      submit.textContent = idle;
    }
  });

  // -- the new token, shown once ---------------------------------------------

  // The one panel that shows a raw token, moved into the dialog that has one
  // (Create or Rotate), with its Copy button.
  function showSecret(dialog, answer, title, note) {
    const panel = $("created");
    dialog.append(panel);
    // Closed (Escape) while the call was under way: the token exists now and
    // is never shown again, so the dialog comes back to show it.
    if (!dialog.open) dialog.showModal();
    $("created-title").textContent = title;
    $("created-name").textContent = answer.apiToken.name;
    $("created-note").textContent = note || "";
    show($("created-note"), Boolean(note));
    $("copy-status").textContent = "";
    $("created-token").value = answer.token;
    show(panel, true);
    $("copy-token").focus();
  }

  // The raw token leaves the page with the dialog.
  function hideSecret() {
    $("created-token").value = "";
    $("copy-status").textContent = "";
    show($("created"), false);
  }

  $("create-dialog").addEventListener("close", () => {
    hideSecret();
    show($("create-form"), true);
    state.editing = null;
    restoreFocus($("open-create"));
  });

  $("copy-token").addEventListener("click", async () => {
    const field = $("created-token");
    let copied = false;
    try {
      await navigator.clipboard.writeText(field.value);
      copied = true;
    } catch (err) {
      // No async clipboard (not a secure context, or refused): select the text
      // and fall back to the older copy command.
      field.focus();
      field.select();
      try { copied = document.execCommand("copy"); } catch (e) { copied = false; }
    }
    $("copy-status").textContent = copied
      ? "Copied to the clipboard."
      : "Could not copy automatically: the token is selected, press Ctrl+C (or ⌘C) to copy it.";
    if (!copied) { field.focus(); field.select(); }
  });

  // -- rotate ----------------------------------------------------------------

  function openRotate(token) {
    state.rotating = token;
    $("rotate-form").reset();
    $("rotate-name").textContent = token.name;
    $("rotate-prefix").textContent = token.tokenPrefix + "…";
    alertBox($("rotate-alert"), "");
    show($("rotate-form"), true);
    hideSecret();
    openDialog($("rotate-dialog"), $("rotate-form").querySelector("input[name=grace]:checked"));
  }

  $("rotate-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const token = state.rotating;
    if (!token) return;
    const grace = $("rotate-form").querySelector("input[name=grace]:checked").value;
    const submit = $("rotate-submit");
    submit.disabled = true;
    submit.textContent = "Rotating…";
    alertBox($("rotate-alert"), "");
    try {
      const rotated = await authed("POST", "/api-tokens/" + encodeURIComponent(token.id) + ":rotate",
        { gracePeriod: grace });
      const old = rotated.previous;
      const own = state.who && old.id === state.who.tokenId;
      if (own) {
        // The console signed in with the old token, which stops working: it
        // carries on with the new one, which has the same scopes.
        state.token = rotated.token;
        sessionStorage.setItem(SESSION_KEY, rotated.token);
        state.who = Object.assign({}, state.who,
          { tokenId: rotated.apiToken.id, expiresAt: rotated.apiToken.expiresAt });
        renderSession();
      }
      const until = old.revokedAt
        ? "The old token " + old.tokenPrefix + "… is revoked: it no longer works."
        : "The old token " + old.tokenPrefix + "… keeps working until " +
          old.expiresAt.slice(0, 10) + " " + old.expiresAt.slice(11, 16) + " UTC. " +
          "Replace it everywhere before then.";
      const note = until + (own ? " This console now uses the new token." : "");
      show($("rotate-form"), false);
      showSecret($("rotate-dialog"), rotated, "API key rotated", note);
      announce("API key " + old.name + " rotated. Copy the new token now: it will not be shown again.");
      loadTokens(true);
    } catch (err) {
      if (err.status !== 401) alertBox($("rotate-alert"), "The API key was not rotated. " + describe(err));
    } finally {
      submit.disabled = false;
      submit.textContent = "Rotate";
    }
  });

  $("rotate-dialog").addEventListener("close", () => {
    hideSecret();
    show($("rotate-form"), true);
    const id = state.rotating && state.rotating.id;
    state.rotating = null;
    // A rotated token has no Rotate button any more: focus its row's name.
    const row = id && document.querySelector('#tokens-body th[data-id="' + CSS.escape(id) + '"]');
    restoreFocus(row || $("keys-title"));
  });

  // -- revoke ----------------------------------------------------------------

  // Every token below `id` in the token tree (parentId links), from the whole
  // list rather than the rows on screen: the list may be filtered or partly
  // loaded, and a rotation hangs older tokens under a newer one, so no page
  // boundary says where the children end. The count is exact up to
  // COUNT_MAX_PAGES full pages, and "at least" beyond.
  async function mintedBy(id) {
    const all = [];
    let pageToken = "";
    let pages = 0;
    do {
      const query = new URLSearchParams({ pageSize: String(COUNT_PAGE_SIZE) });
      if (pageToken) query.set("pageToken", pageToken);
      const page = await authed("GET", "/api-tokens?" + query.toString());
      all.push(...page.tokens);
      pageToken = page.nextPageToken || "";
      pages += 1;
    } while (pageToken && pages < COUNT_MAX_PAGES);
    const children = new Map();
    for (const t of all) {
      if (!t.parentId) continue;
      if (!children.has(t.parentId)) children.set(t.parentId, []);
      children.get(t.parentId).push(t);
    }
    const found = new Map();
    const todo = [id];
    while (todo.length) {
      for (const child of children.get(todo.pop()) || []) {
        if (found.has(child.id) || child.id === id) continue;
        found.set(child.id, child);
        todo.push(child.id);
      }
    }
    const minted = [...found.values()];
    return {
      ids: new Set(found.keys()),
      total: minted.length,
      active: minted.filter((t) => stateOf(t) !== "REVOKED").length,
      complete: !pageToken,
    };
  }

  function renderMinted(minted, failure) {
    const count = $("revoke-children-count");
    const field = $("revoke-children-field");
    const label = $("revoke-children-label");
    if (failure) {
      count.textContent = "Could not count the API keys it minted. " + failure +
        " You can still revoke them with it.";
      label.textContent = "Also revoke every API key it minted, directly or through keys they minted";
      show(field, true);
      return;
    }
    const keys = plural(minted.total, "API key", "API keys");
    if (minted.total === 0 && minted.complete) {
      count.textContent = "It has not minted any API keys.";
      show(field, false);
      return;
    }
    const atLeast = minted.complete ? "" : "at least ";
    let text = "It minted " + atLeast + keys + ", directly or through keys they minted";
    if (!minted.complete) {
      text += " (only the first " + (COUNT_PAGE_SIZE * COUNT_MAX_PAGES).toLocaleString("en") +
        " keys of the list were counted)";
    }
    text += minted.active === minted.total
      ? "." : "; " + minted.active + " of them " + (minted.active === 1 ? "is" : "are") + " not revoked.";
    count.textContent = text + " They keep working unless you revoke them too.";
    label.textContent = minted.complete
      ? "Also revoke the " + plural(minted.active, "API key", "API keys") + " it minted"
      : "Also revoke every API key it minted";
    show(field, minted.active > 0 || !minted.complete);
  }

  async function openRevoke(token) {
    state.revoking = token;
    state.minted = null;
    $("revoke-name").textContent = token.name;
    $("revoke-prefix").textContent = token.tokenPrefix + "…";
    $("revoke-children").checked = false;
    show($("revoke-children-field"), false);
    $("revoke-children-count").textContent = "Counting the API keys it minted…";
    alertBox($("revoke-alert"), "");
    openDialog($("revoke-dialog"), $("revoke-cancel"));
    try {
      const minted = await mintedBy(token.id);
      if (state.revoking !== token) return; // closed or reopened meanwhile
      state.minted = minted;
      renderMinted(minted, null);
    } catch (err) {
      if (state.revoking !== token || err.status === 401) return;
      renderMinted(null, describe(err));
    }
  }

  $("revoke-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const token = state.revoking;
    if (!token) return;
    const withChildren = !$("revoke-children-field").hidden && $("revoke-children").checked;
    const minted = state.minted;
    const submit = $("revoke-submit");
    submit.disabled = true;
    try {
      const path = "/api-tokens/" + encodeURIComponent(token.id) + (withChildren ? "?revokeChildren=true" : "");
      const revoked = await authed("DELETE", path);
      const me = state.who && state.who.tokenId;
      const own = revoked.id === me;
      // Uncounted, the sign-in token may still have been below it: then the
      // next call finds it revoked and signs out with the general reason.
      const below = Boolean(withChildren && minted && minted.ids.has(me));
      replaceListed(revoked);
      closeDialog($("revoke-dialog"));
      if (own || below) {
        signOut("You revoked " + revoked.name + (own ? ", the token you signed in with. "
          : " and the API keys it minted, among them the token you signed in with. ") +
          "Sign in with another token.", true);
        return;
      }
      if (withChildren) {
        await loadTokens(true);
        if (!state.token) return;
        announce("API key " + revoked.name + " revoked, with " +
          (minted ? "the " + plural(minted.active, "API key", "API keys") : "every API key") + " it minted.");
        return;
      }
      announce("API key " + revoked.name + " revoked.");
    } catch (err) {
      if (err.status !== 401) alertBox($("revoke-alert"), "The API key was not revoked. " + describe(err));
    } finally {
      submit.disabled = false;
    }
  });

  $("revoke-dialog").addEventListener("close", () => {
    const id = state.revoking && state.revoking.id;
    state.revoking = null;
    state.minted = null;
    // The Revoke button is gone once the token is revoked: focus its row's name.
    const row = id && document.querySelector('#tokens-body th[data-id="' + CSS.escape(id) + '"]');
    restoreFocus(row || $("keys-title"));
  });

  // -- start -----------------------------------------------------------------

  async function start() {
    const saved = sessionStorage.getItem(SESSION_KEY);
    if (!saved) {
      showView("signin");
      return;
    }
    try {
      const who = await verify(saved);
      await enter(saved, who);
    } catch (err) {
      if (err.rejected) {
        signOut("Your saved sign-in is no longer valid. " + err.message, true);
        return;
      }
      // The service failed, not the token: keep it, so that a reload tries again.
      showView("signin");
      alertBox($("signin-alert"), "Could not check your sign-in. " + err.message +
        " Reload the page to try again, or sign in below.");
    }
  }

  start();
})();
