#!/usr/bin/env node
// The lease protocol (WatchTokenEvents) in a few dozen lines: a consumer's cache of
// Authenticate's answers that still refuses a token once RevokeToken has returned.
//
//   TOKENSERVICE_VERIFY_TOKEN=tks_... node lease.js [--target localhost:50051]
//
// The verify token needs the scope api_token:verify. Prints {"ready":true} once leased,
// then reads raw tokens on stdin, one per line, and prints one JSON line for each:
// {"ok":true,"tokenId":...,"cached":true|false} or {"ok":false,"code":"UNAUTHENTICATED"}.
// Loopback, plaintext: see index.js for TLS.
"use strict";

const crypto = require("crypto");
const fs = require("fs");
const path = require("path");
const readline = require("readline");
const { parseArgs } = require("util");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const REPO = path.resolve(__dirname, "..", "..");

class LeaseCache {
  constructor(client, verifyToken) {
    this.client = client;
    this.auth = new grpc.Metadata();
    this.auth.set("authorization", `Bearer ${verifyToken}`);
    this.entries = new Map(); // sha256(raw token) -> {who, expires, budget}
    this.uses = new Map(); // token id -> {count, last}: answered from memory, to report
    this.leaseUntil = 0; // monotonic seconds; a lease counts from when its Renew was SENT
    this.generation = 0; // bumped by anything that may make an answer stale
    this.sent = new Map(); // renew id -> when sent
    this.renewId = 0;
    this.onLease = () => {};
    this.connect();
  }

  now() {
    return performance.now() / 1000;
  }

  drop() {
    this.entries.clear();
    this.generation += 1;
  }

  connect() {
    const stream = this.client.WatchTokenEvents(this.auth);
    let every = 0.5; // until the first lease says how long leases are
    let timer = null;
    const renew = () => {
      const id = ++this.renewId;
      this.sent.set(id, this.now());
      stream.write({ renew: { id: String(id) } });
      timer = setTimeout(renew, every * 1000);
    };
    // Uses answered from memory count for last_used_at and the rate limit.
    this.report = () => {
      if (this.uses.size === 0) return;
      const uses = [...this.uses].map(([tokenId, u]) => ({
        tokenId, count: String(u.count), lastUsedAt: { seconds: String(Math.floor(u.last / 1000)) },
      }));
      this.uses.clear();
      for (let i = 0; i < uses.length; i += 500) { // a report stays well under 64 KiB
        stream.write({ usage: { uses: uses.slice(i, i + 500) } });
      }
    };
    const reporter = setInterval(this.report, 1000);
    stream.on("data", (event) => {
      if (event.invalidate) {
        const { tokenIds, userIds } = event.invalidate;
        for (const [key, entry] of this.entries) {
          if (tokenIds.includes(entry.who.tokenId) || userIds.includes(entry.who.userId)) {
            this.entries.delete(key);
          }
        }
        this.generation += 1;
        stream.write({ ack: { sequence: event.sequence } }); // only after applying it
      } else if (event.lease) {
        const sent = this.sent.get(Number(event.lease.renewId));
        const d = event.lease.duration || {};
        // No lease longer than the protocol allows, whatever a server says.
        const seconds = Math.min(5, Number(d.seconds || 0) + (d.nanos || 0) / 1e9);
        if (sent === undefined || seconds <= 0) return;
        if (this.now() >= this.leaseUntil) this.drop(); // lapsed: nothing older is kept
        this.leaseUntil = Math.max(this.leaseUntil, sent + seconds);
        every = Math.max(0.05, seconds / 3);
        this.onLease();
      }
    });
    let lost = false;
    const onLost = () => {
      if (lost) return;
      lost = true;
      clearTimeout(timer);
      clearInterval(reporter);
      this.report = () => {};
      this.leaseUntil = 0;
      this.drop();
      setTimeout(() => this.connect(), 500);
    };
    stream.on("error", onLost);
    stream.on("end", onLost);
    renew();
  }

  async authenticate(raw) {
    const key = crypto.createHash("sha256").update(raw).digest("hex");
    const hit = this.entries.get(key);
    if (hit && this.now() < this.leaseUntil && !(hit.expires && Date.now() >= hit.expires)) {
      if (hit.budget > 0 && this.now() < hit.budgetUntil) {
        hit.budget -= 1; // a rate-limited token: only within the slice the server granted
        const use = this.uses.get(hit.who.tokenId) || { count: 0, last: 0 };
        this.uses.set(hit.who.tokenId, { count: use.count + 1, last: Date.now() });
        return { ...hit.who, cached: true };
      }
      this.report(); // slice spent: counted first, then Authenticate decides again
    }
    const ticket = this.now() < this.leaseUntil ? this.generation : null;
    let budget = 0;
    const who = await new Promise((resolve, reject) => {
      const ask = new grpc.Metadata(); // asks for a cache budget with the answer
      ask.set("tokenservice-cache-budget", "1");
      const call = this.client.Authenticate({ token: raw }, ask, { deadline: Date.now() + 10000 },
        (err, r) => (err ? reject(err) : resolve(r)));
      call.on("status", (s) => {
        budget = Number(s.metadata.get("tokenservice-cache-budget")[0] || 0);
      });
    });
    // Kept only if nothing that could change it happened while it was in flight.
    if (ticket !== null && ticket === this.generation && this.now() < this.leaseUntil) {
      const expires = who.expiresAt ? Number(who.expiresAt.seconds) * 1000 : 0;
      // A budget is spent within 2 s, or asked for again (the server's promise holds 4 s).
      const budgetUntil = this.now() + 2;
      this.entries.set(key, { who, expires, budget: who.rateLimit ? budget : Infinity, budgetUntil });
    }
    return { ...who, cached: false };
  }
}

function googleapisDir() {
  // As in index.js: GOOGLEAPIS_PROTO_DIR, or the googleapis-common-protos of the .venv.
  if (process.env.GOOGLEAPIS_PROTO_DIR) return process.env.GOOGLEAPIS_PROTO_DIR;
  const lib = path.join(REPO, ".venv", "lib");
  for (const python of fs.existsSync(lib) ? fs.readdirSync(lib) : []) {
    const dir = path.join(lib, python, "site-packages");
    if (fs.existsSync(path.join(dir, "google", "api", "annotations.proto"))) return dir;
  }
  throw new Error("cannot find google/api/annotations.proto: set GOOGLEAPIS_PROTO_DIR");
}

function main() {
  const { values } = parseArgs({
    options: {
      target: { type: "string", default: process.env.TOKENSERVICE_TARGET || "localhost:50051" },
    },
  });
  const definition = protoLoader.loadSync("tokenservice/v1/token_service.proto", {
    includeDirs: [path.join(REPO, "protos"), googleapisDir()],
    longs: String,
    defaults: true,
  });
  const { TokenService } = grpc.loadPackageDefinition(definition).tokenservice.v1;
  const client = new TokenService(values.target, grpc.credentials.createInsecure());
  const cache = new LeaseCache(client, process.env.TOKENSERVICE_VERIFY_TOKEN || "");
  cache.onLease = () => {
    cache.onLease = () => {};
    console.log(JSON.stringify({ ready: true }));
  };
  const lines = readline.createInterface({ input: process.stdin });
  let queue = Promise.resolve();
  lines.on("line", (raw) => {
    queue = queue.then(async () => {
      try {
        const who = await cache.authenticate(raw.trim());
        console.log(JSON.stringify({ ok: true, tokenId: who.tokenId, cached: who.cached }));
      } catch (err) {
        console.log(JSON.stringify({ ok: false, code: grpc.status[err.code] || String(err) }));
      }
    });
  });
  lines.on("close", () => queue.then(() => process.exit(0)));
}

main();
