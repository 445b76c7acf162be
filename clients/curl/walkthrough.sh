#!/usr/bin/env bash
# A curl walkthrough of tokenservice's REST paths, checked step by step:
# scopes, create (api-tokens and the api-keys alias), list, get, authenticate, use of a
# token without api_token:manage, rotation with a grace period, a rename, the
# state filter, revoke (twice), authenticate after revoke, a validation error and
# a missing header.
#
#   clients/curl/walkthrough.sh [BASE_URL] [BOOTSTRAP_TOKEN]
#   TOKENSERVICE_URL=http://localhost:8080 TOKENSERVICE_TOKEN=tks_... clients/curl/walkthrough.sh
#
# The bootstrap token needs api_token:manage and the scopes in SCOPES (default
# pass:read). Prints each request and its status; exits 1 at the first mismatch.
# Needs curl, and jq or python3 to read JSON (JSON_TOOL=python3 skips jq).
# Over https with your own CA: TOKENSERVICE_CA_FILE=ca.crt; for mTLS also
# TOKENSERVICE_CERT_FILE and TOKENSERVICE_KEY_FILE (the client certificate and key).
set -euo pipefail

BASE_URL="${1:-${TOKENSERVICE_URL:-http://localhost:8080}}"
BASE_URL="${BASE_URL%/}"
TOKEN="${2:-${TOKENSERVICE_TOKEN:-}}"
SCOPES="${SCOPES:-pass:read}"
[ -n "$TOKEN" ] || { echo "usage: $0 BASE_URL BOOTSTRAP_TOKEN (or set TOKENSERVICE_TOKEN)" >&2; exit 2; }

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
passed=0

json() {  # json FILE EXPR: a field of a JSON file, EXPR in jq syntax (.a.b, .a[0].b)
  if [ "${JSON_TOOL:-jq}" = jq ] && command -v jq >/dev/null; then
    jq -r "$2 // empty" "$1"
  else
    python3 - "$1" "$2" <<'PY'
import json, re, sys
value = json.load(open(sys.argv[1]))
for part in re.findall(r"\.(\w+)|\[(\d+)\]", sys.argv[2]):
    value = value[part[0]] if part[0] else value[int(part[1])]
print("" if value is None else value if isinstance(value, str) else json.dumps(value))
PY
  fi
}

# call EXPECTED_STATUS METHOD PATH [TOKEN] [JSON_BODY]: the body lands in $WORK/body.
call() {
  local expected="$1" method="$2" path="$3" token="${4:-}" body="${5:-}" status
  local args=(-sS -o "$WORK/body" -D "$WORK/headers" -w '%{http_code}' -X "$method")
  [ -n "${TOKENSERVICE_CA_FILE:-}" ] && args+=(--cacert "$TOKENSERVICE_CA_FILE")
  [ -n "${TOKENSERVICE_CERT_FILE:-}" ] && args+=(--cert "$TOKENSERVICE_CERT_FILE")
  [ -n "${TOKENSERVICE_KEY_FILE:-}" ] && args+=(--key "$TOKENSERVICE_KEY_FILE")
  [ -n "$token" ] && args+=(-H "Authorization: Bearer $token")
  [ -n "$body" ] && args+=(-H "Content-Type: application/json" --data "$body")
  status="$(curl "${args[@]}" "$BASE_URL$path")" || status="curl-failed"
  if [ "$status" != "$expected" ]; then
    echo "FAIL $method $path: expected $expected, got $status" >&2
    cat "$WORK/body" >&2 2>/dev/null || true
    echo >&2
    exit 1
  fi
  passed=$((passed + 1))
  echo "ok   $status $method $path"
}

check() {  # check DESCRIPTION TEST...: fails the walkthrough unless TEST succeeds
  local what="$1"
  shift
  if ! "$@"; then
    echo "FAIL $what" >&2
    cat "$WORK/body" >&2
    echo >&2
    exit 1
  fi
  passed=$((passed + 1))
  echo "ok   $what"
}

scopes_json="$(printf '"%s",' ${SCOPES//,/ })"
scopes_json="[${scopes_json%,}]"
expires="$(date -u -d '+30 days' +%Y-%m-%dT%H:%M:%SZ 2>/dev/null || date -u -v+30d +%Y-%m-%dT%H:%M:%SZ)"

# 1. The scope catalog needs no credentials.
call 200 GET /api/v1/scopes
check "catalog lists api_token:manage" grep -q '"api_token:manage"' "$WORK/body"

# 2. Create a token (storno's path), then one through stemp's api-keys alias.
call 201 POST /api/v1/api-tokens "$TOKEN" \
  "{\"name\": \"CI/CD Pipeline\", \"scopes\": $scopes_json, \"expiresAt\": \"$expires\"}"
NEW_TOKEN="$(json "$WORK/body" .token)"
TOKEN_ID="$(json "$WORK/body" .apiToken.id)"
check "create returns the raw token once" test -n "$NEW_TOKEN"
check "create answers Cache-Control: no-store" grep -qi '^cache-control: *no-store' "$WORK/headers"
check "tokenPrefix is the token's first 12 characters" \
  test "$(json "$WORK/body" .apiToken.tokenPrefix)" = "${NEW_TOKEN:0:12}"
call 201 POST /api/v1/api-keys "$TOKEN" "{\"name\": \"POS Integration\", \"scopes\": $scopes_json}"
ALIAS_ID="$(json "$WORK/body" .apiToken.id)"

# 3. List: metadata, never the raw token.
call 200 GET "/api/v1/api-tokens?pageSize=100" "$TOKEN"
check "list includes the new token" grep -q "\"$TOKEN_ID\"" "$WORK/body"
check "list never shows the raw token" bash -c "! grep -q '$NEW_TOKEN' '$WORK/body'"
call 200 GET /api/v1/api-keys "$TOKEN"

# 4. Get one token.
call 200 GET "/api/v1/api-tokens/$TOKEN_ID" "$TOKEN"
check "get returns its name" test "$(json "$WORK/body" .name)" = "CI/CD Pipeline"

# 5. Authenticate the new token: who it is and what it may do.
call 200 POST /api/v1/authenticate "" "{\"token\": \"$NEW_TOKEN\"}"
check "authenticate names the token" test "$(json "$WORK/body" .tokenId)" = "$TOKEN_ID"

# 6. The new token lacks api_token:manage, so it cannot manage tokens.
call 403 GET /api/v1/api-tokens "$NEW_TOKEN"

# 7. Rotate a token with an hour's grace: both secrets work meanwhile, and a
#    second rotation of the same token is a conflict.
call 201 POST /api/v1/api-keys "$TOKEN" "{\"name\": \"Rotated\", \"scopes\": $scopes_json}"
OLD_SECRET="$(json "$WORK/body" .token)"
OLD_ID="$(json "$WORK/body" .apiToken.id)"
call 200 POST "/api/v1/api-tokens/$OLD_ID:rotate" "$TOKEN" '{"gracePeriod": "3600s"}'
ROTATED_SECRET="$(json "$WORK/body" .token)"
ROTATED_ID="$(json "$WORK/body" .apiToken.id)"
check "the old token names its replacement" \
  test "$(json "$WORK/body" .previous.replacedById)" = "$ROTATED_ID"
check "the new token names the one it replaced" \
  test "$(json "$WORK/body" .apiToken.rotatedFromId)" = "$OLD_ID"
call 200 POST /api/v1/authenticate "" "{\"token\": \"$OLD_SECRET\"}"
call 200 POST /api/v1/authenticate "" "{\"token\": \"$ROTATED_SECRET\"}"
call 409 POST "/api/v1/api-tokens/$OLD_ID:rotate" "$TOKEN" '{"gracePeriod": "0s"}'
check "a second rotation is a conflict" test "$(json "$WORK/body" .error.code)" = "conflict"
call 200 PATCH "/api/v1/api-tokens/$ROTATED_ID" "$TOKEN" '{"name": "Rotated (2)"}'
check "PATCH changes the name only" test "$(json "$WORK/body" .name)" = "Rotated (2)"
call 200 DELETE "/api/v1/api-tokens/$OLD_ID" "$TOKEN"
call 200 GET "/api/v1/api-tokens?state=REVOKED&pageSize=100" "$TOKEN"
check "the state filter finds the revoked token" grep -q "\"$OLD_ID\"" "$WORK/body"
call 200 DELETE "/api/v1/api-tokens/$ROTATED_ID" "$TOKEN"

# 8. Revoke: immediate, and idempotent.
call 200 DELETE "/api/v1/api-tokens/$TOKEN_ID" "$TOKEN"
REVOKED_AT="$(json "$WORK/body" .revokedAt)"
check "revoke sets revokedAt" test -n "$REVOKED_AT"
call 401 POST /api/v1/authenticate "" "{\"token\": \"$NEW_TOKEN\"}"
call 200 DELETE "/api/v1/api-tokens/$TOKEN_ID" "$TOKEN"
check "revoking again changes nothing" test "$(json "$WORK/body" .revokedAt)" = "$REVOKED_AT"
call 200 DELETE "/api/v1/api-keys/$ALIAS_ID" "$TOKEN"

# 9. Errors: a validation error names its fields; no credentials is 401.
call 422 POST /api/v1/api-tokens "$TOKEN" '{"name": "", "scopes": ["no:such-scope"]}'
check "validation error has code validation_error" \
  test "$(json "$WORK/body" .error.code)" = "validation_error"
call 401 GET /api/v1/api-tokens
call 404 GET "/api/v1/api-tokens/00000000-0000-0000-0000-000000000000" "$TOKEN"

echo "walkthrough: $passed passed, 0 failed"
