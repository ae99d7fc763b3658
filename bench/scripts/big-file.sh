#!/usr/bin/env bash
# One large CSV through `dataflow import` (a resumable upload) into the embedded `dataflow
# all`: upload throughput, end-to-end records per second, and the peak memory (RSS) of the
# server and of the CLI. Run it at two sizes to see whether memory grows with the file.
#   BIN (default target/release/dataflow), MB (200): the file's size in MB (ten fields a
#   row, about 100 bytes); DATABASE_URL: PostgreSQL instead of SQLite (a fresh database).
# Needs python3 and GNU time (/usr/bin/time); uses port 18089.
set -euo pipefail
BIN=$(realpath "${BIN:-target/release/dataflow}")
MB=${MB:-200}
dir=$(mktemp -d); cd "$dir"
export DATAFLOW_DATA_DIR=$dir/data DATAFLOW_LISTEN=127.0.0.1:18089 DATAFLOW_LOG=warn
[ -n "${DATABASE_URL:-}" ] && export DATAFLOW_DATABASE_URL=$DATABASE_URL
"$BIN" clients create big > client.json
CLIENT=$(grep -o 'cli_[0-9A-Za-z]*' client.json | head -1)
KEY=$("$BIN" keys create "$CLIENT" 2>/dev/null | grep -o 'dfk_[0-9a-f_]*' | head -1)
"$BIN" policy set "$CLIENT" '{"max_records": 1000000000}' > /dev/null
python3 - "$MB" <<'PY'
import sys
limit = int(sys.argv[1]) * 1_000_000
with open("big.csv", "w") as f:
    f.write("id,email,name,city,country,amount,quantity,price,created,note\n")
    i, size = 0, 0
    while size < limit:
        line = f"{i},user{i}@example.com,Name {i},City {i % 977},C{i % 53},{i % 10007}.25,{i % 97},{i % 1009}.5,2026-12-{1 + i % 28:02d},note {i % 31}\n"
        f.write(line); size += len(line); i += 1
print(f"{size / 1e6:.0f} MB, {i} rows", file=sys.stderr)
PY
/usr/bin/time -f "%M" -o server.rss "$BIN" all > server.log 2>&1 & pid=$!
for _ in $(seq 100); do curl -s localhost:18089/healthz >/dev/null && break; sleep 0.2; done
start=$(date +%s.%N)
/usr/bin/time -f "%M" -o cli.rss "$BIN" import big.csv --key "$KEY" --api http://127.0.0.1:18089 > cli.log 2>&1
uploaded=$(date +%s.%N)
BATCH=$(grep -o 'bat_[0-9A-Za-z]*' cli.log | head -1)
while :; do
  status=$(curl -s localhost:18089/v1/batches/$BATCH -H "Authorization: Bearer $KEY" \
    | python3 -c 'import json,sys; b=json.load(sys.stdin); print(b["status"], b["records_written"])')
  case "$status" in completed*|dead*|rejected*) break;; esac
  sleep 0.5
done
end=$(date +%s.%N)
pkill -INT -P $pid; wait $pid 2>/dev/null || true
python3 - "$start" "$uploaded" "$end" "$status" "$(stat -c %s big.csv 2>/dev/null || echo 0)" <<'PY'
import sys
start, uploaded, end = map(float, sys.argv[1:4])
status, rows = sys.argv[4].split()
print(f"upload: {float(sys.argv[5] or 0) / 1e6 / (uploaded - start):.1f} MB/s ({uploaded - start:.1f} s)")
print(f"end to end: {int(rows):,} records {status} in {end - start:.1f} s = {int(rows) / (end - start):,.0f} records/s")
PY
echo "peak RSS: server $(( $(cat server.rss) / 1024 )) MiB, CLI $(( $(cat cli.rss) / 1024 )) MiB"
rm -rf "$dir"
