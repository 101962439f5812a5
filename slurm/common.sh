#!/bin/bash
# Shared shell helpers for the megatron_spo sbatch scripts (train.sbatch, rollout.sbatch, combined.sbatch).
#
# Two ways in:
#   * sourced by a batch script (runs on the first node of the job): logging, host lists, waiting for
#     /health and files, the rollout URL file, the preemption trap, and the two phases
#     `start_rollout_phase` and `run_training_phase` that the three scripts combine;
#   * executed by `srun` on every node as `bash common.sh node_<role> [args...]`. The batch script
#     itself is a spooled copy that only the first node can read, while this file lives in the shared
#     checkout, so the per-node code lives here.
#
# Every variable the phases read is listed in slurm/README.md. Nothing here binds 0.0.0.0: the
# sandbox binds 127.0.0.1 (one per trainer node, used only by that node), and rollout servers bind the
# node's own address so that trainers on OTHER nodes reach them.

# ------------------------------------------------------------------------------------------------
# Logging
# ------------------------------------------------------------------------------------------------

log() {
    printf '[mspo %s %s] %s\n' "$(date -u +%H:%M:%S)" "${SLURMD_NODENAME:-$(hostname -s)}" "$*" >&2
}

die() {
    log "ERROR: $*"
    exit 1
}

# ------------------------------------------------------------------------------------------------
# Hosts and addresses
# ------------------------------------------------------------------------------------------------

# Hostnames of the job, one per line, in Slurm's order (the order --relative counts in).
job_hosts() {
    [[ -n "${SLURM_JOB_NODELIST:-}" ]] || die "SLURM_JOB_NODELIST is not set: submit with sbatch (or set it for a dry run)"
    scontrol show hostnames "$SLURM_JOB_NODELIST"
}

# The address servers on this node bind to and advertise: reachable from the other nodes, unlike
# 127.0.0.1. MSPO_BIND_IFACE picks the interface (e.g. ib0) on nodes with several networks;
# otherwise the first address of `hostname -I`, otherwise the FQDN.
node_addr() {
    local addr=""
    if [[ -n "${MSPO_BIND_IFACE:-}" ]]; then
        addr=$(ip -4 -o addr show dev "$MSPO_BIND_IFACE" 2>/dev/null | awk '{split($4, a, "/"); print a[1]; exit}')
        [[ -n "$addr" ]] || die "MSPO_BIND_IFACE=$MSPO_BIND_IFACE has no IPv4 address on $(hostname -s)"
    else
        addr=$(hostname -I 2>/dev/null | awk '{print $1}')
        [[ -n "$addr" ]] || addr=$(hostname -f)
    fi
    printf '%s\n' "$addr"
}

# ------------------------------------------------------------------------------------------------
# Waiting
# ------------------------------------------------------------------------------------------------

# http_ok URL: 0 when URL answers 2xx within 5 s.
http_ok() {
    if command -v curl >/dev/null 2>&1; then
        curl -fsS -o /dev/null --max-time 5 "$1" 2>/dev/null
    else
        "${PYTHON:-python3}" -c 'import sys, urllib.request
try:
    sys.exit(0 if 200 <= urllib.request.urlopen(sys.argv[1], timeout=5).status < 300 else 1)
except Exception:
    sys.exit(1)' "$1"
    fi
}

# wait_for_health BASE_URL TIMEOUT_S [PID]: poll BASE_URL/health; fail when the timeout passes or
# when PID (the server process) exits first, so a crashed server fails in seconds, not after the timeout.
wait_for_health() {
    local url=${1%/} timeout=$2 pid=${3:-} start=$SECONDS
    until http_ok "$url/health"; do
        if [[ -n "$pid" ]] && ! kill -0 "$pid" 2>/dev/null; then
            log "the server for $url (pid $pid) exited before answering /health"
            return 1
        fi
        if (( SECONDS - start >= timeout )); then
            log "$url/health did not answer within ${timeout}s"
            return 1
        fi
        sleep "${MSPO_POLL_S:-5}"
    done
    log "$url is healthy (after $(( SECONDS - start ))s)"
}

# wait_for_file PATH TIMEOUT_S [PID]: wait until PATH exists (and PID, if given, is still alive).
wait_for_file() {
    local path=$1 timeout=$2 pid=${3:-} start=$SECONDS
    until [[ -e "$path" ]]; do
        if [[ -n "$pid" ]] && ! kill -0 "$pid" 2>/dev/null; then
            log "process $pid exited before $path appeared"
            return 1
        fi
        if (( SECONDS - start >= timeout )); then
            log "$path did not appear within ${timeout}s"
            return 1
        fi
        sleep "${MSPO_POLL_S:-5}"
    done
}

# ------------------------------------------------------------------------------------------------
# URL file: one URL per line; written with a rename so a reader never sees half a file.
# ------------------------------------------------------------------------------------------------

write_lines_atomic() {
    local file=$1
    shift
    mkdir -p "$(dirname "$file")"
    printf '%s\n' "$@" >"$file.tmp.$$"
    mv -f "$file.tmp.$$" "$file"
}

# read_urls FILE: the URLs in FILE joined with commas (blank lines and # comments ignored).
read_urls() {
    grep -v -e '^[[:space:]]*#' -e '^[[:space:]]*$' "$1" | paste -sd, -
}

# urls_override "u1,u2": the --set value for rollout.urls, as a quoted YAML flow list.
urls_override() {
    local out="" url
    local -a list
    IFS=, read -r -a list <<<"$1"
    for url in "${list[@]}"; do
        [[ -n "$url" ]] || continue
        [[ "$url" == http://* || "$url" == https://* ]] || die "rollout URL '$url' must start with http:// or https://"
        out+="${out:+,}\"$url\""
    done
    [[ -n "$out" ]] || die "no rollout URL in '$1'"
    printf 'rollout.urls=[%s]\n' "$out"
}

# ------------------------------------------------------------------------------------------------
# Preemption: Slurm signals only the batch shell (#SBATCH --signal=B:USR1@300). The shell writes
# $RUN_DIR/STOP; every trainer rank sees it at the end of its step, checkpoints, writes
# $RUN_DIR/PREEMPTED and exits 0; the shell then requeues the job. A signal sent to the job step
# instead would also reach the torchrun agents, which kill their workers after a short grace period
# (see megatron_spo/trainer/preemption.py).
# ------------------------------------------------------------------------------------------------

MSPO_STOP_REQUESTED=0
MSPO_TRAPPED=0

on_preempt_signal() {
    MSPO_TRAPPED=1
    MSPO_STOP_REQUESTED=1
    log "received $1: asking the trainer to checkpoint and stop ($RUN_DIR/STOP)"
    touch "$RUN_DIR/STOP"
}

install_preempt_traps() {
    trap 'on_preempt_signal USR1' USR1
    trap 'on_preempt_signal TERM' TERM
}

# wait_step PID: wait for a background step, resuming the wait when a trapped signal interrupts it.
# Returns the step's exit code.
wait_step() {
    local pid=$1 rc=0
    while :; do
        MSPO_TRAPPED=0
        wait "$pid" && rc=0 || rc=$?
        (( MSPO_TRAPPED )) || break
        # `wait` returned because of the trap; wait again unless the step is already gone.
        kill -0 "$pid" 2>/dev/null || { wait "$pid" && rc=0 || rc=$?; break; }
    done
    return "$rc"
}

# mspo_init ARGS...: common start of every sbatch script. ARGS (the script's own arguments) are extra
# `--set key=value` pairs for the trainer, passed through verbatim.
MSPO_EXTRA_SETS=()
mspo_init() {
    MSPO_EXTRA_SETS=("$@")
    if [[ -n "${MSPO_VENV:-}" ]]; then
        # shellcheck disable=SC1091  # the venv is the user's
        source "$MSPO_VENV/bin/activate" || die "cannot activate MSPO_VENV=$MSPO_VENV"
    fi
    trap cleanup_bg EXIT
    # Each step runs ONE task per node (torchrun, or a node's servers) that needs all of the node's
    # cores; srun's default of 1 CPU per task would pin 8 trainer processes to one core. srun no longer
    # inherits --cpus-per-task from sbatch (Slurm >= 22.05), so pass it on explicitly (nodes of a job
    # are assumed alike).
    if [[ -z "${SRUN_CPUS_PER_TASK:-}" ]]; then
        if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then
            export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK
        elif [[ -n "${SLURM_CPUS_ON_NODE:-}" ]]; then
            export SRUN_CPUS_PER_TASK=$SLURM_CPUS_ON_NODE
        fi
    fi
    log "job ${SLURM_JOB_ID:-?} on ${SLURM_JOB_NODELIST:-?} (${SLURM_JOB_NUM_NODES:-?} node(s)), restart count ${SLURM_RESTART_COUNT:-0}"
}

# Kill background steps registered in MSPO_BG_PIDS (sandbox, rollout servers) when the script ends.
MSPO_BG_PIDS=()
cleanup_bg() {
    local pid
    for pid in "${MSPO_BG_PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
}

# ------------------------------------------------------------------------------------------------
# Rollout phase (batch shell): start servers on job nodes [offset, offset + n) and publish their URLs
# ------------------------------------------------------------------------------------------------

# start_rollout_phase OFFSET NNODES: one srun task per node runs `node_rollout`; each node writes its
# healthy URLs to $RUN_DIR/rollout_urls.d/<host>.txt; once all NNODES did, the merged list goes to
# $URL_FILE. With ROLLOUT_ENGINE=ray the nodes form a Ray cluster instead and the head writes
# $RUN_DIR/ray_address.txt. Sets MSPO_ROLLOUT_PID (the background step).
start_rollout_phase() {
    local offset=$1 nnodes=$2
    : "${RUN_DIR:?RUN_DIR must be set (a directory on the shared filesystem)}"
    export RUN_DIR
    export URL_FILE=${URL_FILE:-$RUN_DIR/rollout_urls.txt}
    export URL_DIR=$RUN_DIR/rollout_urls.d
    export RAY_ADDRESS_FILE=${RAY_ADDRESS_FILE:-$RUN_DIR/ray_address.txt}
    # Stale URLs from an earlier job would point trainers at dead servers.
    rm -rf "$URL_DIR" "$URL_FILE" "$RAY_ADDRESS_FILE" "$RUN_DIR/ray_gcs_address.txt"
    mkdir -p "$URL_DIR" "$RUN_DIR/logs"
    log "starting rollout (${ROLLOUT_ENGINE:?ROLLOUT_ENGINE must be sglang, vllm, embedded or ray}) on $nnodes node(s) from node index $offset"
    srun --nodes="$nnodes" --ntasks="$nnodes" --ntasks-per-node=1 --relative="$offset" --kill-on-bad-exit=1 \
        bash "$MSPO_SLURM_DIR/common.sh" node_rollout &
    MSPO_ROLLOUT_PID=$!
    MSPO_BG_PIDS+=("$MSPO_ROLLOUT_PID")
    local timeout=$(( ${HEALTH_TIMEOUT:-1800} + 120 )) start=$SECONDS
    if [[ "$ROLLOUT_ENGINE" == ray ]]; then
        wait_for_file "$RAY_ADDRESS_FILE" "$timeout" "$MSPO_ROLLOUT_PID" || die "the Ray cluster did not come up; see $RUN_DIR/logs/"
        log "Ray cluster up at $(cat "$RAY_ADDRESS_FILE")"
        return 0
    fi
    local -a parts
    while :; do
        parts=("$URL_DIR"/*.txt)
        [[ -e "${parts[0]}" ]] || parts=()
        (( ${#parts[@]} >= nnodes )) && break
        kill -0 "$MSPO_ROLLOUT_PID" 2>/dev/null || die "the rollout step ended before all servers were healthy; see $RUN_DIR/logs/"
        (( SECONDS - start < timeout )) || die "only ${#parts[@]} of $nnodes rollout nodes were healthy within ${timeout}s"
        sleep "${MSPO_POLL_S:-5}"
    done
    local -a urls
    mapfile -t urls < <(cat "${parts[@]}")
    write_lines_atomic "$URL_FILE" "${urls[@]}"
    log "${#urls[@]} rollout server(s) healthy; URLs in $URL_FILE"
}

# ------------------------------------------------------------------------------------------------
# Training phase (batch shell): sandbox + preflight on every trainer node, then torchrun
# ------------------------------------------------------------------------------------------------

# build_overrides: fill MSPO_SETS with the --set pairs every trainer node gets.
build_overrides() {
    MSPO_SETS=(--set "io.run_dir=$RUN_DIR")
    case "${ROLLOUT_ENGINE:-}" in
        sglang | vllm) MSPO_SETS+=(--set "rollout.engine=$ROLLOUT_ENGINE") ;;
        # megatron_spo.rollout.embedded.server speaks SGLang's native /generate, so the SGLang client talks to it.
        embedded) MSPO_SETS+=(--set "rollout.engine=sglang") ;;
        ray | "") ;;  # the config's engine (sglang / vllm) stays; Ray places its servers
        *) die "ROLLOUT_ENGINE must be sglang, vllm, embedded or ray, got '$ROLLOUT_ENGINE'" ;;
    esac
    local default_mode=urls
    [[ "${ROLLOUT_ENGINE:-}" != ray ]] || default_mode=ray
    ROLLOUT_MODE=${ROLLOUT_MODE:-$default_mode}
    case "$ROLLOUT_MODE" in
        urls)
            local url_list=${ROLLOUT_URLS:-}
            if [[ -z "$url_list" ]]; then
                local file=${URL_FILE:-$RUN_DIR/rollout_urls.txt}
                [[ -f "$file" ]] || log "waiting up to ${URL_WAIT_S:-3600}s for the rollout URL file $file (written by slurm/rollout.sbatch)"
                wait_for_file "$file" "${URL_WAIT_S:-3600}" || die "no rollout URLs: set ROLLOUT_URLS, or start slurm/rollout.sbatch with the same RUN_DIR"
                url_list=$(read_urls "$file")
            fi
            local urls_set
            urls_set=$(urls_override "$url_list") || exit 1
            MSPO_SETS+=(--set "$urls_set")
            ;;
        ray)
            if [[ -z "${RAY_ADDRESS:-}" ]]; then
                local file=${RAY_ADDRESS_FILE:-$RUN_DIR/ray_address.txt}
                wait_for_file "$file" "${URL_WAIT_S:-3600}" || die "no Ray cluster: set RAY_ADDRESS, or start slurm/rollout.sbatch with ROLLOUT_ENGINE=ray"
                RAY_ADDRESS=$(cat "$file")
            fi
            export RAY_ADDRESS
            # No URLs: Ray places the servers (and preflight must not probe the config's placeholder URL).
            MSPO_SETS+=(--set "rollout.urls=[]"
                --set "rollout.ray_servers=${RAY_SERVERS:?ROLLOUT_MODE=ray needs RAY_SERVERS (servers Ray places)}")
            ;;
        config) ;;  # use the config's rollout section as it is (e.g. the embedded engine)
        *) die "ROLLOUT_MODE must be urls, ray or config, got '$ROLLOUT_MODE'" ;;
    esac
    if [[ "${START_SANDBOX:-1}" == 1 ]]; then
        MSPO_SETS+=(--set "rollout.sandbox_url=http://127.0.0.1:${SANDBOX_PORT:-8080}")
    fi
    MSPO_SETS+=("${MSPO_EXTRA_SETS[@]}")
}

# run_training_phase OFFSET NNODES: train on job nodes [offset, offset + nnodes). Exits the script.
run_training_phase() {
    local offset=$1 nnodes=$2
    : "${CONFIG:?CONFIG must name the YAML config (e.g. examples/qwen3_8b_spo.yaml)}"
    : "${RUN_DIR:?RUN_DIR must be set (a directory on the shared filesystem)}"
    [[ -f "$CONFIG" ]] || die "CONFIG=$CONFIG does not exist (relative paths are relative to $PWD)"
    local gpus=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
    local -a hosts
    mapfile -t hosts < <(job_hosts)
    (( ${#hosts[@]} >= offset + nnodes )) || die "the job has ${#hosts[@]} node(s), the trainer needs nodes $offset..$(( offset + nnodes - 1 ))"
    export HEAD_HOST=${hosts[$offset]} NNODES=$nnodes GPUS_PER_NODE=$gpus RDZV_PORT=${RDZV_PORT:-29500} CONFIG RUN_DIR
    mkdir -p "$RUN_DIR/logs"
    # Markers left by a job that was killed before the trainer consumed them would stop or requeue this one.
    rm -f "$RUN_DIR/STOP" "$RUN_DIR/PREEMPTED" "$RUN_DIR/TRAIN_FINISHED"
    install_preempt_traps
    build_overrides
    local -a step=(--nodes="$nnodes" --ntasks="$nnodes" --ntasks-per-node=1 --relative="$offset" --kill-on-bad-exit=1)

    if [[ "${START_SANDBOX:-1}" == 1 ]]; then
        log "starting one code sandbox per trainer node on 127.0.0.1:${SANDBOX_PORT:-8080}"
        # --overlap: the sandbox shares the nodes' CPUs, memory and GPUs with the training step.
        srun "${step[@]}" --overlap bash "$MSPO_SLURM_DIR/common.sh" node_sandbox &
        MSPO_BG_PIDS+=("$!")
    fi

    log "preflight on $nnodes node(s): $CONFIG ${MSPO_SETS[*]}"
    if ! srun "${step[@]}" bash "$MSPO_SLURM_DIR/common.sh" node_preflight "${MSPO_SETS[@]}"; then
        die "preflight failed on at least one node (the [FAIL] lines above name the check); torchrun was not started"
    fi

    local -a cmd=("${TORCHRUN:-torchrun}" --nnodes "$nnodes" --nproc-per-node "$gpus"
        --rdzv-backend c10d --rdzv-endpoint "$HEAD_HOST:$RDZV_PORT" --rdzv-id "${SLURM_JOB_ID:-mspo}")
    local -a extra_torchrun=()
    read -r -a extra_torchrun <<<"${TORCHRUN_ARGS:-}"
    cmd+=("${extra_torchrun[@]}" -m megatron_spo.train --config "$CONFIG" "${MSPO_SETS[@]}" --resume auto)
    log "launching: ${cmd[*]}"
    srun "${step[@]}" "${cmd[@]}" &
    local rc=0
    wait_step "$!" || rc=$?

    if (( rc == 0 )) && [[ -f "$RUN_DIR/PREEMPTED" ]]; then
        rm -f "$RUN_DIR/PREEMPTED"
        if [[ "${REQUEUE:-1}" == 1 && -n "${SLURM_JOB_ID:-}" ]]; then
            log "the trainer checkpointed and stopped: requeueing job $SLURM_JOB_ID (it resumes with --resume auto)"
            scontrol requeue "$SLURM_JOB_ID" || die "scontrol requeue $SLURM_JOB_ID failed; resubmit by hand, the checkpoint is in $RUN_DIR"
        else
            log "the trainer checkpointed and stopped; REQUEUE=0, so resubmit to continue from $RUN_DIR"
        fi
        exit 0
    fi
    if (( rc != 0 )); then
        die "the training step failed with exit code $rc; logs above, checkpoints in $RUN_DIR"
    fi
    if (( MSPO_STOP_REQUESTED )); then
        log "a stop was requested but the trainer finished without $RUN_DIR/PREEMPTED: training is complete"
    fi
    touch "$RUN_DIR/TRAIN_FINISHED"
    log "training finished"
    exit 0
}

# ------------------------------------------------------------------------------------------------
# Per-node roles (run by srun as `bash common.sh node_<role>`)
# ------------------------------------------------------------------------------------------------

# The code sandbox for this node's trainer ranks: loopback only, no other node needs it.
node_sandbox() {
    local -a extra=()
    read -r -a extra <<<"${SANDBOX_ARGS:-}"
    exec "${MSPO_CLI:-megatron-spo}" sandbox serve --host 127.0.0.1 --port "${SANDBOX_PORT:-8080}" \
        --concurrency "${SANDBOX_CONCURRENCY:-32}" "${extra[@]}"
}

# Preflight with the rank variables torchrun will set, so the layout check sees the real world size.
node_preflight() {
    local index=${SLURM_PROCID:-0}
    export WORLD_SIZE=$(( NNODES * GPUS_PER_NODE )) RANK=$(( index * GPUS_PER_NODE )) LOCAL_RANK=0
    export MASTER_ADDR=$HEAD_HOST MASTER_PORT=$RDZV_PORT
    if [[ "${START_SANDBOX:-1}" == 1 ]]; then
        wait_for_health "http://127.0.0.1:${SANDBOX_PORT:-8080}" "${SANDBOX_WAIT_S:-120}" \
            || die "the sandbox on this node did not start (see the sandbox step's output)"
    fi
    if ! "${MSPO_CLI:-megatron-spo}" preflight --config "$CONFIG" "$@"; then
        die "preflight FAILED on ${SLURMD_NODENAME:-$(hostname -s)} (node $index of $NNODES)"
    fi
}

# Start this node's rollout servers (one per ROLLOUT_TP GPUs), wait for /health, publish the URLs,
# then live as long as all of them do.
node_rollout() {
    if [[ "${ROLLOUT_ENGINE:-}" == ray ]]; then
        node_ray
        return
    fi
    : "${MODEL:?MODEL must name the HF model directory the rollout servers load}"
    local host addr gpus=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}} tp=${ROLLOUT_TP:-1}
    host=${SLURMD_NODENAME:-$(hostname -s)}
    addr=$(node_addr)
    (( gpus % tp == 0 )) || die "GPUS_PER_NODE=$gpus is not divisible by ROLLOUT_TP=$tp"
    local n=$(( gpus / tp )) i port devices
    [[ "$ROLLOUT_ENGINE" != embedded ]] || n=${EMBEDDED_SERVERS_PER_NODE:-1}
    local -a pids=() urls=() extra=() cmd=()
    read -r -a extra <<<"${ROLLOUT_ENGINE_ARGS:-}"
    for (( i = 0; i < n; i++ )); do
        port=$(( ${ROLLOUT_BASE_PORT:-30000} + i * ${ROLLOUT_PORT_STRIDE:-10} ))
        devices=$(seq -s, $(( i * tp )) $(( i * tp + tp - 1 )))
        # Bind the node's address, not 127.0.0.1: the trainers run on other nodes. `env` execs the
        # server, so $! is the server's own pid (a subshell pid would leave the server behind on kill).
        case "$ROLLOUT_ENGINE" in
            sglang)
                cmd=(env CUDA_VISIBLE_DEVICES="$devices" "${PYTHON:-python}" -m sglang.launch_server
                    --model-path "$MODEL" --host "$addr" --port "$port" --tp "$tp") ;;
            vllm)
                cmd=(env CUDA_VISIBLE_DEVICES="$devices" VLLM_SERVER_DEV_MODE=1 "${PYTHON:-python}"
                    -m vllm.entrypoints.openai.api_server --model "$MODEL" --host "$addr" --port "$port"
                    --tensor-parallel-size "$tp"
                    --worker-extension-cls megatron_spo.rollout.vllm_worker_ext.WorkerExtension) ;;
            embedded)
                cmd=("${PYTHON:-python}" -m megatron_spo.rollout.embedded.server --model "$MODEL"
                    --host "$addr" --port "$port") ;;
            *) die "ROLLOUT_ENGINE must be sglang, vllm, embedded or ray, got '$ROLLOUT_ENGINE'" ;;
        esac
        "${cmd[@]}" "${extra[@]}" >"$RUN_DIR/logs/rollout-$host-$i.log" 2>&1 &
        pids+=("$!")
        urls+=("http://$addr:$port")
        log "started $ROLLOUT_ENGINE server $i on GPUs $devices at http://$addr:$port (log: $RUN_DIR/logs/rollout-$host-$i.log)"
    done
    local stopping=0
    trap 'kill "${pids[@]}" 2>/dev/null' EXIT
    trap 'stopping=1; kill "${pids[@]}" 2>/dev/null' TERM
    for (( i = 0; i < n; i++ )); do
        wait_for_health "${urls[$i]}" "${HEALTH_TIMEOUT:-1800}" "${pids[$i]}" \
            || die "rollout server $i on $host did not become healthy; see $RUN_DIR/logs/rollout-$host-$i.log"
    done
    write_lines_atomic "$URL_DIR/$host.txt" "${urls[@]}"
    # If one server dies, end the step so the job fails visibly instead of serving with a hole.
    local rc=0
    wait -n "${pids[@]}" || rc=$?
    if (( stopping )); then
        log "rollout servers on $host stopped"
        exit 0
    fi
    die "a rollout server on $host exited (exit code $rc); see $RUN_DIR/logs/rollout-$host-*.log"
}

# One Ray node per task: the first one is the head and publishes the Ray Client address.
node_ray() {
    local addr gpus=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}} port=${RAY_PORT:-6379}
    local client_port=${RAY_CLIENT_PORT:-10001} ray=${RAY:-ray}
    addr=$(node_addr)
    if [[ "${SLURM_PROCID:-0}" == 0 ]]; then
        # The head binds the node address so the other nodes and the trainers can join / connect.
        "$ray" start --head --node-ip-address="$addr" --port="$port" --ray-client-server-port="$client_port" \
            --num-gpus="$gpus" --block &
        local pid=$! start=$SECONDS
        trap 'kill "$pid" 2>/dev/null; "$ray" stop --force >/dev/null 2>&1' EXIT TERM
        until "$ray" status --address="$addr:$port" >/dev/null 2>&1; do
            kill -0 "$pid" 2>/dev/null || die "ray start --head exited"
            (( SECONDS - start < ${HEALTH_TIMEOUT:-1800} )) || die "the Ray head did not answer within ${HEALTH_TIMEOUT:-1800}s"
            sleep "${MSPO_POLL_S:-5}"
        done
        write_lines_atomic "$RAY_ADDRESS_FILE" "ray://$addr:$client_port"
        echo "$addr:$port" >"$RUN_DIR/ray_gcs_address.txt"
        wait "$pid"
    else
        wait_for_file "$RUN_DIR/ray_gcs_address.txt" "${HEALTH_TIMEOUT:-1800}" || die "the Ray head did not start"
        exec "$ray" start --address="$(cat "$RUN_DIR/ray_gcs_address.txt")" --node-ip-address="$addr" \
            --num-gpus="$gpus" --block
    fi
}

# `bash common.sh node_<role> args...` runs one per-node role; sourcing defines the helpers only.
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    set -euo pipefail
    case "${1:-}" in
        node_sandbox | node_preflight | node_rollout) "$@" ;;
        *) die "usage: bash common.sh node_sandbox|node_preflight|node_rollout [args...]" ;;
    esac
fi
