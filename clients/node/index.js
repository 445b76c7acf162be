#!/usr/bin/env node
// Calls tokenservice from Node: ListScopes, CreateToken, Authenticate, and RevokeToken
// on the token it created, so a run leaves no working token behind.
//
//   TOKENSERVICE_TOKEN=tks_... node index.js [--target localhost:50051] [--scopes pass:read]
//
// The stubs are not generated: @grpc/proto-loader reads protos/ directly. The proto
// imports google/api/annotations.proto, which comes from the googleapis-common-protos
// Python package already in the project's .venv (found automatically) or from the
// directory named by GOOGLEAPIS_PROTO_DIR (any checkout of googleapis works).
//
// TLS with your own CA: TOKENSERVICE_CA_FILE=ca.crt (PEM); for mTLS also
// TOKENSERVICE_CERT_FILE and TOKENSERVICE_KEY_FILE, the client certificate and its key.
//
// Prints one JSON line describing what happened (never the raw token) and exits 0;
// on a gRPC error prints "CODE: message" on stderr and exits 1.
"use strict";

const fs = require("fs");
const path = require("path");
const { parseArgs } = require("util");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const REPO = path.resolve(__dirname, "..", "..");
const PROTOS = path.join(REPO, "protos");
const DEADLINE_MS = 10000;

function googleapisDir() {
  if (process.env.GOOGLEAPIS_PROTO_DIR) return process.env.GOOGLEAPIS_PROTO_DIR;
  const lib = path.join(REPO, ".venv", "lib");
  if (fs.existsSync(lib)) {
    for (const python of fs.readdirSync(lib)) {
      const dir = path.join(lib, python, "site-packages");
      if (fs.existsSync(path.join(dir, "google", "api", "annotations.proto"))) return dir;
    }
  }
  throw new Error(
    "cannot find google/api/annotations.proto: run `make install` or set GOOGLEAPIS_PROTO_DIR"
  );
}

function isLocal(target) {
  const host = target.replace(/^dns:\/\/\//, "").replace(/:\d+$/, "").replace(/^\[|\]$/g, "");
  return host === "localhost" || host === "::1" || /^127\./.test(host);
}

function loadService(target, token) {
  const definition = protoLoader.loadSync("tokenservice/v1/token_service.proto", {
    includeDirs: [PROTOS, googleapisDir()],
    keepCase: false, // fields as in the JSON mapping: tokenId, apiToken, ...
    longs: String,
    enums: String,
    defaults: true,
  });
  const { TokenService } = grpc.loadPackageDefinition(definition).tokenservice.v1;
  const { TOKENSERVICE_CA_FILE: ca, TOKENSERVICE_CERT_FILE: cert, TOKENSERVICE_KEY_FILE: key } =
    process.env;
  if (isLocal(target) && !ca) {
    // grpc-js has no local credentials, and refuses call credentials on an insecure
    // channel; on loopback we attach the header per call instead (see call() below).
    return { client: new TokenService(target, grpc.credentials.createInsecure()), perCall: true };
  }
  // Over TLS the token rides as call credentials on every call.
  const callCreds = grpc.credentials.createFromMetadataGenerator((_params, callback) => {
    const md = new grpc.Metadata();
    md.set("authorization", `Bearer ${token}`);
    callback(null, md);
  });
  const read = (file) => (file ? fs.readFileSync(file) : null);
  const creds = grpc.credentials.combineChannelCredentials(
    grpc.credentials.createSsl(read(ca), read(key), read(cert)),
    callCreds
  );
  return { client: new TokenService(target, creds), perCall: false };
}

function call(service, token, method, request) {
  const md = new grpc.Metadata();
  if (service.perCall && token) md.set("authorization", `Bearer ${token}`);
  const deadline = new Date(Date.now() + DEADLINE_MS);
  return new Promise((resolve, reject) => {
    service.client[method](request, md, { deadline }, (err, reply) =>
      err ? reject(err) : resolve(reply)
    );
  });
}

async function main() {
  const { values } = parseArgs({
    options: {
      target: { type: "string", default: process.env.TOKENSERVICE_TARGET || "localhost:50051" },
      token: { type: "string", default: process.env.TOKENSERVICE_TOKEN || "" },
      scopes: { type: "string", default: process.env.TOKENSERVICE_SCOPES || "pass:read" },
      name: { type: "string", default: "node example" },
    },
  });
  if (!values.token) throw new Error("give --token or set TOKENSERVICE_TOKEN (a bootstrap token)");
  const service = loadService(values.target, values.token);
  try {
    const catalog = await call(service, null, "ListScopes", {});
    const created = await call(service, values.token, "CreateToken", {
      name: values.name,
      scopes: values.scopes.split(",").filter(Boolean),
    });
    // The raw token is created.token: store it now, it is never shown again.
    const who = await call(service, null, "Authenticate", { token: created.token });
    if (who.tokenId !== created.apiToken.id) throw new Error("Authenticate named another token");
    const revoked = await call(service, values.token, "RevokeToken", { id: created.apiToken.id });
    console.log(
      JSON.stringify({
        scopes: catalog.scopes.map((s) => s.name),
        created: {
          id: created.apiToken.id,
          tokenPrefix: created.apiToken.tokenPrefix,
          scopes: created.apiToken.scopes,
        },
        authenticated: { tokenId: who.tokenId, userEmail: who.userEmail, scopes: who.scopes },
        revoked: { id: revoked.id, revoked: Boolean(revoked.revokedAt) },
      })
    );
  } finally {
    service.client.close();
  }
}

main().catch((err) => {
  if (err.code !== undefined && grpc.status[err.code] !== undefined) {
    console.error(`${grpc.status[err.code]}: ${err.details}`);
  } else {
    console.error(err.message || String(err));
  }
  process.exit(1);
});
