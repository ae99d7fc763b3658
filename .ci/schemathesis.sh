#!/usr/bin/env bash
# Schemathesis against a real `dataflow` process: its own scratch SQLite ledger, a client
# with an API key, the operator token; it reads the schema from /openapi.json and checks
# that no answer is a 5xx and every answer conforms to the document (status, content type,
# headers, body). Bounded: a few minutes on a small machine.
#   ST_MAX_EXAMPLES (default 25) cases per operation and phase; ST_SEED to replay a run.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v st >/dev/null 2>&1; then
  pip install --quiet schemathesis
fi

cargo build --quiet --bin dataflow
scratch=$(mktemp -d)
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
base="http://127.0.0.1:$port"
token="schemathesis-operator-token-$RANDOM$RANDOM"

# Generated requests fail authentication on purpose (schemathesis checks that credentials
# are enforced); lock-outs and the anonymous limit would then refuse everything after them.
export DATAFLOW_DATA_DIR="$scratch" \
  DATAFLOW_LISTEN="127.0.0.1:$port" \
  DATAFLOW_ADMIN_TOKEN="$token" \
  DATAFLOW_API__AUTH_MAX_FAILURES=1000000 \
  DATAFLOW_API__ANONYMOUS_RATE_PER_MINUTE=1000000 \
  DATAFLOW_API__ANONYMOUS_RATE_BURST=1000000 \
  RUST_LOG="${RUST_LOG:-warn}"
target/debug/dataflow migrate >"$scratch/migrate.log" 2>&1
# The API and a worker as two processes on one ledger: schemathesis finds the worker in
# GET /admin/workers and drains it, which ends that process (and would end an `all` one,
# API included); the API goes on answering.
target/debug/dataflow serve >"$scratch/api.log" 2>&1 &
api=$!
target/debug/dataflow worker >"$scratch/worker.log" 2>&1 &
worker=$!
cleanup() {
  for pid in "$api" "$worker"; do
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$scratch"
}
trap cleanup EXIT

for _ in $(seq 60); do
  curl -fsS "$base/readyz" >/dev/null 2>&1 && break
  sleep 0.5
done
curl -fsS "$base/readyz" >/dev/null || { cat "$scratch/api.log"; exit 1; }

field() { python3 -c "import json, sys; print(json.load(sys.stdin)[sys.argv[1]])" "$1"; }
client=$(curl -fsS -X POST "$base/admin/clients" -H "Authorization: Bearer $token" \
  -H 'content-type: application/json' \
  -d '{"name": "schemathesis", "policy": {"rate_per_minute": 1000000, "rate_burst": 1000000}}' |
  field id)
key=$(curl -fsS -X POST "$base/admin/clients/$client/keys" -H "Authorization: Bearer $token" |
  field api_key)
# Something for the reads to find: one completed import.
curl -fsS -X POST "$base/v1/imports" -H "Authorization: Bearer $key" -H 'content-type: text/csv' \
  --data-binary $'id,name\n1,Ann\n2,Bob\n' >/dev/null

export DATAFLOW_ST_API_KEY="$key" DATAFLOW_ST_OPERATOR_TOKEN="$token"
export PYTHONPATH=.ci SCHEMATHESIS_HOOKS=schemathesis_hooks
# A crash inside schemathesis itself (its own "Runtime Error" with no failed check) exits 3,
# so that .ci/run can run it once more: CPython 3.11.7 sometimes raises "AST constructor
# recursion depth mismatch" while hypothesis parses a lambda's source (seen 2026-12-02; the
# same seed passed when run again). A failed check is never retried.
st_out="$scratch/st.log"
st --config-file .ci/schemathesis.toml run "$base/openapi.json" \
  --checks not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance,negative_data_rejection,missing_required_header,unsupported_method,ignored_auth \
  --max-examples "${ST_MAX_EXAMPLES:-25}" \
  ${ST_SEED:+--seed "$ST_SEED"} \
  --workers 2 \
  --max-time 240 \
  --request-timeout 10 \
  2>&1 | tee "$st_out" || {
  if grep -q 'Runtime Error' "$st_out" && ! grep -q 'FAILURES' "$st_out"; then
    echo "schemathesis crashed (no check failed)" >&2
    exit 3
  fi
  echo "== the API's log"
  tail -50 "$scratch/api.log"
  exit 1
}
if grep -E ' ERROR | panicked ' "$scratch/api.log" "$scratch/worker.log"; then
  echo "DataFlow logged errors during the run" >&2
  exit 1
fi
