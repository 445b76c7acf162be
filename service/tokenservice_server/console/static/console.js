// tokenservice console: Settings → API Keys over the public REST API.
//
// The sign-in token lives in sessionStorage only (never localStorage, never a
// cookie). A raw token returned by Create is shown once in the dialog and
// dropped from the page when the dialog closes. Everything from the API is put
// on the page as text (textContent), never as markup.
"use strict";

(function () {
  const API = "/api/v1";
  const SESSION_KEY = "tokenservice.console.token";
  const MANAGE = "api_token:manage";
  const ADMIN = "api_token:admin";
  const PAGE_SIZE = 20;
  const CREATE_FIELDS = ["name", "scopes", "expiresAt"];

  const $ = (id) => document.getElementById(id);

  const state = {
    token: null, // the sign-in token
    who: null, // the AuthenticateResponse for it
    catalog: null, // [{name, description, apiOnly}]
    tokens: [], // ApiToken JSON, as listed so far
    nextPageToken: "",
    revoking: null, // the ApiToken the revoke dialog is about
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

  // -- dialogs ---------------------------------------------------------------

  function openDialog(dialog, focusTarget) {
    state.opener = document.activeElement;
    dialog.showModal();
    (focusTarget || dialog.querySelector("input, button")).focus();
  }

  function closeDialog(dialog) {
    if (dialog.open) dialog.close();
  }

  // Focus goes back to where it was, or to a sensible place if that is gone.
  function restoreFocus(fallback) {
    const opener = state.opener;
    state.opener = null;
    if (!state.token) return; // signed out meanwhile: the sign-in form has the focus
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
        "needs to list, create and revoke API keys.");
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

  async function loadTokens(fromStart) {
    if (!state.token) return;
    const more = $("load-more");
    const query = new URLSearchParams({ pageSize: String(PAGE_SIZE) });
    if (!fromStart && state.nextPageToken) query.set("pageToken", state.nextPageToken);
    more.disabled = true;
    $("tokens-table").setAttribute("aria-busy", "true");
    try {
      const page = await authed("GET", "/api-tokens?" + query.toString());
      state.tokens = fromStart ? page.tokens : state.tokens.concat(page.tokens);
      state.nextPageToken = page.nextPageToken || "";
      alertBox($("list-alert"), "");
      renderTokens();
      return page;
    } catch (err) {
      if (err.status !== 401) alertBox($("list-alert"), "Could not load API keys. " + describe(err));
      return null;
    } finally {
      more.disabled = false;
      $("tokens-table").removeAttribute("aria-busy");
    }
  }

  function statusOf(t) {
    if (t.revokedAt) {
      return el("span", { class: "state" },
        el("span", { class: "badge badge-revoked", text: "Revoked" }), " ", timeCell(t.revokedAt, ""));
    }
    if (isExpired(t)) return el("span", { class: "badge badge-expired", text: "Expired" });
    return el("span", { class: "badge badge-active", text: "Active" });
  }

  function renderRow(t) {
    const current = state.who && t.id === state.who.tokenId;
    const nameCell = el("th", { scope: "row", class: "name", tabindex: "-1", "data-id": t.id },
      el("span", { class: "name-text", text: t.name }),
      current ? " " : null, current ? el("span", { class: "tag", text: "this session" }) : null);
    let action = null;
    if (!t.revokedAt) {
      action = el("button", {
        type: "button", class: "button button-small button-danger-quiet",
        "data-revoke": t.id, "aria-label": "Revoke " + t.name,
      }, "Revoke");
    }
    return el("tr", { "data-id": t.id, class: t.revokedAt || isExpired(t) ? "inactive" : null },
      nameCell,
      el("td", {}, el("code", { class: "prefix", text: t.tokenPrefix + "…" })),
      el("td", {}, scopeChips(t.scopes)),
      el("td", { class: "col-owner", text: t.createdByEmail }),
      el("td", {}, timeCell(t.createdAt, "")),
      el("td", {}, timeCell(t.lastUsedAt, "never")),
      el("td", {}, timeCell(t.expiresAt, "never")),
      el("td", {}, statusOf(t)),
      el("td", { class: "actions" }, action));
  }

  function renderTokens() {
    $("tokens-body").replaceChildren(...state.tokens.map(renderRow));
    show($("empty"), state.tokens.length === 0);
    show($("tokens-table"), state.tokens.length > 0);
    show($("load-more"), Boolean(state.nextPageToken));
  }

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
    const button = event.target.closest("button[data-revoke]");
    if (!button) return;
    const token = state.tokens.find((t) => t.id === button.dataset.revoke);
    if (token) openRevoke(token);
  });

  // -- create ----------------------------------------------------------------

  async function loadCatalog() {
    try {
      const answer = await api("GET", "/scopes");
      state.catalog = answer.scopes;
    } catch (err) {
      state.catalog = null;
      alertBox($("list-alert"), "Could not load the scope catalog. " + describe(err));
    }
  }

  function renderScopeChoices() {
    const list = $("create-scopes-list");
    const held = new Set(state.who.scopes);
    // The catalog's order and descriptions, limited to what the sign-in token
    // holds; a held scope the catalog no longer lists is left out.
    const choices = (state.catalog || []).filter((s) => held.has(s.name));
    list.replaceChildren(...choices.map((s, i) => {
      const id = "scope-" + i;
      return el("div", { class: "scope" },
        el("input", { type: "checkbox", id, name: "scopes", value: s.name }),
        el("label", { for: id },
          el("code", { class: "scope-name", text: s.name }),
          s.apiOnly ? el("span", { class: "tag", text: "API only" }) : null,
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
  }

  const FIELD_NODES = {
    name: ["create-name", "create-name-error"],
    scopes: ["create-scopes", "create-scopes-error"],
    expiresAt: ["create-expires", "create-expires-error"],
  };

  const FIELD_LABELS = { name: "Name", scopes: "Scopes", expiresAt: "The expiry date" };

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
      alertBox($("create-alert"), [err.status === 422 ? "The API key was not created. " + err.message : describe(err)]
        .concat(other).join(" "));
    } else {
      alertBox($("create-alert"), "The API key was not created: correct the fields marked below.");
    }
    return first;
  }

  function openCreate() {
    $("create-form").reset();
    clearCreateErrors();
    renderScopeChoices();
    const today = new Date().toISOString().slice(0, 10);
    $("create-expires").min = today;
    show($("create-form"), true);
    show($("created"), false);
    $("created-token").value = "";
    openDialog($("create-dialog"), $("create-name"));
  }

  $("open-create").addEventListener("click", async () => {
    if (!state.catalog) await loadCatalog();
    openCreate();
  });

  $("create-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    clearCreateErrors();
    const expires = $("create-expires");
    if (expires.validity.badInput) {
      fieldError(expires, $("create-expires-error"), "Enter a complete date, or leave it empty.");
      expires.focus();
      return;
    }
    const body = {
      name: $("create-name").value,
      scopes: Array.from(document.querySelectorAll("#create-scopes-list input:checked"), (i) => i.value),
    };
    if (expires.value) body.expiresAt = expires.value + "T23:59:59Z";
    const submit = $("create-submit");
    submit.disabled = true;
    submit.textContent = "Creating…";
    try {
      const created = await authed("POST", "/api-tokens", body);
      showCreated(created);
      loadTokens(true);
    } catch (err) {
      if (err.status === 401) return; // signed out, with the reason
      const first = showCreateErrors(err);
      (first && first.id === "create-scopes" ? first.querySelector("input") || first : first || $("create-name")).focus();
    } finally {
      submit.disabled = false;
      submit.textContent = "Create";
    }
  });

  function showCreated(created) {
    show($("create-form"), false);
    show($("created"), true);
    $("created-name").textContent = created.apiToken.name;
    $("copy-status").textContent = "";
    const field = $("created-token");
    field.value = created.token;
    $("copy-token").focus();
    announce("API key " + created.apiToken.name + " created. Copy the token now: it will not be shown again.");
  }

  $("create-dialog").addEventListener("close", () => {
    // The raw token leaves the page with the dialog.
    $("created-token").value = "";
    show($("created"), false);
    show($("create-form"), true);
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

  // -- revoke ----------------------------------------------------------------

  function openRevoke(token) {
    state.revoking = token;
    $("revoke-name").textContent = token.name;
    $("revoke-prefix").textContent = token.tokenPrefix + "…";
    alertBox($("revoke-alert"), "");
    openDialog($("revoke-dialog"), $("revoke-cancel"));
  }

  $("revoke-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const token = state.revoking;
    if (!token) return;
    const submit = $("revoke-submit");
    submit.disabled = true;
    try {
      const revoked = await authed("DELETE", "/api-tokens/" + encodeURIComponent(token.id));
      const own = state.who && revoked.id === state.who.tokenId;
      state.tokens = state.tokens.map((t) => (t.id === revoked.id ? revoked : t));
      renderTokens();
      closeDialog($("revoke-dialog"));
      if (own) {
        signOut("You revoked " + revoked.name + ", the token you signed in with. " +
          "Sign in with another token.", true);
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
