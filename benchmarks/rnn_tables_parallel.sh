#!/usr/bin/env bash
# Run the accuracy runs of benchmarks.rnn_tables as independent processes, several at a time (e.g. on one GPU
# with many CPU cores), each run saving into its own results folder; merge them afterwards with
#   python -m benchmarks.rnn_tables --report-only --merge OUT_DIR/*/rnn_tables.json
#
# Usage: benchmarks/rnn_tables_parallel.sh OUT_DIR WORKERS SECONDS [rnn_tables options...]
#   OUT_DIR   where the per-run results (<table>_<dataset>_<column>_<seed>/rnn_tables.json) and logs go
#   WORKERS   processes at a time
#   SECONDS   stop starting and kill runs after this many seconds (unfinished runs are simply absent)
# Environment: TABLES, DATASETS, COLUMNS, SEEDS (space-separated) pick the runs; the order is table, seed,
# dataset, column, so that a time limit leaves whole seeds of the first tables rather than scattered runs.
set -euo pipefail
out=$1 workers=$2 seconds=$3
shift 3
mkdir -p "$out"
tables=${TABLES:-"5 8 7"} seeds=${SEEDS:-"0 1 2"}
datasets=${DATASETS:-"rows pixels twitter eeg"} columns=${COLUMNS:-"l1 drtp random_rnn bp random"}
jobs=()
for t in $tables; do for s in $seeds; do for d in $datasets; do for c in $columns; do
  jobs+=("$t $d $c $s")
done; done; done; done
export RNN_OUT=$out RNN_ARGS="$*" PYTHON=${PYTHON:-python3}
printf '%s\n' "${jobs[@]}" | timeout "$seconds" xargs -P "$workers" -L 1 sh -c '
  $PYTHON -m benchmarks.rnn_tables accuracy --no-report --tables "$1" --datasets "$2" --columns "$3" \
    --seed-ids "$4" --out "$RNN_OUT/$1_$2_$3_$4" $RNN_ARGS >"$RNN_OUT/$1_$2_$3_$4.log" 2>&1 || true
' run || true
ls "$out"/*/rnn_tables.json 2>/dev/null | wc -l
