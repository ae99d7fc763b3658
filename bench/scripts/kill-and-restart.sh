#!/usr/bin/env bash
# kill -9 of the embedded `dataflow all` with imports in progress, then a restart: how long
# until every batch completes, and how many attempts and takeovers each spent. While it
# runs, `sqlite3` polls the ledger from another process, as an operator might.
#   BIN (default target/release/dataflow), N imports (12) of ROWS records (100000).
# Needs curl, sqlite3 and python3; uses port 18088.
set -euo pipefail
BIN=$(realpath "${BIN:-target/release/dataflow}")
N=${N:-12}; ROWS=${ROWS:-100000}
dir=$(mktemp -d); cd "$dir"
export DATAFLOW_DATA_DIR=$dir/data DATAFLOW_LISTEN=127.0.0.1:18088 DATAFLOW_LOG=warn
export DATAFLOW_API__MAX_BODY_BYTES=67108864
"$BIN" clients create acme > client.json
CLIENT=$(grep -o 'cli_[0-9A-Za-z]*' client.json | head -1)
KEY=$("$BIN" keys create "$CLIENT" 2>/dev/null | grep -o 'dfk_[0-9a-f_]*' | head -1)
python3 - "$N" "$ROWS" <<'PY'
import sys
n, rows = int(sys.argv[1]), int(sys.argv[2])
for i in range(n):
    with open(f"imp{i}.csv", "w") as f:
        f.write("id,email,name\n")
        for r in range(rows):
            f.write(f"{i}-{r},u{r}@example.com,name {r}\n")
PY
"$BIN" all > run1.log 2>&1 & pid=$!
for _ in $(seq 100); do curl -s localhost:18088/healthz >/dev/null && break; sleep 0.2; done
for i in $(seq 0 $((N-1))); do
  curl -s -o /dev/null -w '%{http_code} ' -X POST localhost:18088/v1/imports -H "Authorization: Bearer $KEY" -H 'content-type: text/csv' --data-binary @imp$i.csv
done; echo
count() { sqlite3 data/dataflow.db "SELECT status, count(*) FROM batches GROUP BY status" | tr '\n' ' '; }
for _ in $(seq 600); do
  p=$(sqlite3 data/dataflow.db "SELECT count(*) FROM batches WHERE status='processing' AND checkpoint > 0")
  [ "$p" -ge 8 ] && break; sleep 0.1
done
echo "before kill: $(count)"
kill -9 $pid; wait $pid 2>/dev/null || true
start=$(date +%s.%N)
"$BIN" all > run2.log 2>&1 & pid=$!
while [ "$(sqlite3 data/dataflow.db "SELECT count(*) FROM batches WHERE status='completed'" 2>/dev/null || echo 0)" -lt "$N" ]; do sleep 0.2; [ $(($(date +%s)-${start%.*})) -gt 240 ] && { echo TIMEOUT; break; }; done
end=$(date +%s.%N)
echo "after restart: all $N completed in $(python3 -c "print(round($end-$start,1))") s"
echo "attempts|takeovers|batches"
sqlite3 data/dataflow.db "SELECT attempts, takeovers, count(*) FROM batches GROUP BY attempts, takeovers"
kill $pid; wait $pid 2>/dev/null || true
echo "integrity: $(sqlite3 data/dataflow.db "PRAGMA integrity_check" | head -3)"
rm -rf "$dir"
