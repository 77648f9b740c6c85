#!/bin/sh
# Download a base model and its LoRA adapters from the Hugging Face Hub into
# MODELS_DIR, one folder per repository (MODELS_DIR/<owner>/<name>), with the
# Hugging Face CLI (hf). Used by the compose service "models" and by the
# Kubernetes Job in vllm-deploy/base/.
#
# Usage: download-models.sh [--check] BASE_REPO[@REVISION] ADAPTER_REPO[@REVISION]...
#
# A repository whose folder holds a .download-complete file for the same
# revision is skipped without network access. Each adapter's LoRA rank is read
# from its adapter_config.json and must not exceed MAX_LORA_RANK, the value
# given to vLLM as --max-lora-rank; vLLM would refuse to load it otherwise.
# With --check nothing is downloaded: the exit status is 0 only when every
# repository is complete and every adapter fits MAX_LORA_RANK.
#
# Environment: MODELS_DIR (default /models), MAX_LORA_RANK (required),
# HF_TOKEN (optional, read by hf itself), DOWNLOAD_ATTEMPTS (default 3).
set -eu

MODELS_DIR="${MODELS_DIR:-/models}"
DOWNLOAD_ATTEMPTS="${DOWNLOAD_ATTEMPTS:-3}"
MARKER=.download-complete

log() {
    printf '%s\n' "download-models: $*" >&2
}

fail() {
    log "error: $*"
    exit 1
}

if [ -z "${MAX_LORA_RANK:-}" ]; then
    fail "MAX_LORA_RANK is not set; set it to the value of vLLM's --max-lora-rank"
fi
case "$MAX_LORA_RANK" in
    '' | *[!0-9]*) fail "MAX_LORA_RANK must be a whole number, got '$MAX_LORA_RANK'" ;;
esac

check_only=0
if [ "${1:-}" = "--check" ]; then
    check_only=1
    shift
fi
if [ "$#" -lt 1 ]; then
    fail "usage: download-models.sh [--check] BASE_REPO[@REVISION] ADAPTER_REPO[@REVISION]..."
fi

# Print the largest LoRA rank in an adapter_config.json: its "r" and any
# per-module override in "rank_pattern".
adapter_rank() {
    python3 - "$1" <<'PY'
import json
import sys

with open(sys.argv[1], encoding="utf-8") as file:
    config = json.load(file)
ranks = [config.get("r") or 0]
ranks += list((config.get("rank_pattern") or {}).values())
print(max(int(rank) for rank in ranks))
PY
}

# Check that a downloaded folder has what vLLM loads.
verify_files() {
    dir=$1
    kind=$2
    if [ "$kind" = base ]; then
        [ -f "$dir/config.json" ] || fail "$dir has no config.json"
        ls "$dir"/*.safetensors > /dev/null 2>&1 \
            || fail "$dir has no *.safetensors weights"
        return 0
    fi

    [ -f "$dir/adapter_config.json" ] || fail "$dir has no adapter_config.json"
    if [ ! -f "$dir/adapter_model.safetensors" ] && [ ! -f "$dir/adapter_model.bin" ]; then
        fail "$dir has neither adapter_model.safetensors nor adapter_model.bin"
    fi
    rank=$(adapter_rank "$dir/adapter_config.json") \
        || fail "cannot read the LoRA rank from $dir/adapter_config.json"
    if [ "$rank" -gt "$MAX_LORA_RANK" ]; then
        fail "adapter $dir has LoRA rank $rank, above MAX_LORA_RANK $MAX_LORA_RANK;" \
            "raise --max-lora-rank and MAX_LORA_RANK together to a rank vLLM" \
            "accepts (8, 16, 32, 64, 128, 256, 320 or 512)"
    fi
    log "$dir: LoRA rank $rank fits --max-lora-rank $MAX_LORA_RANK"
}

# Download one repository with retries; hf itself skips files it already has.
download() {
    repo=$1
    revision=$2
    dir=$3
    kind=$4
    if [ "$kind" = base ]; then
        set -- --include '*.json' --include '*.safetensors' --include '*.txt'
    else
        set -- --include 'adapter_*' --include '*.json' --include '*.txt'
    fi

    attempt=1
    while :; do
        log "downloading $repo@$revision into $dir (attempt $attempt of $DOWNLOAD_ATTEMPTS)"
        if hf download "$repo" --revision "$revision" --local-dir "$dir" "$@"; then
            return 0
        fi
        if [ "$attempt" -ge "$DOWNLOAD_ATTEMPTS" ]; then
            fail "hf download $repo failed $attempt times; check the network," \
                "the repository name and, for a gated repository, HF_TOKEN"
        fi
        sleep $((attempt * 10))
        attempt=$((attempt + 1))
    done
}

kind=base
for spec in "$@"; do
    repo=${spec%@*}
    revision=main
    case "$spec" in
        *@*) revision=${spec##*@} ;;
    esac
    case "$repo" in
        */* ) ;;
        *) fail "'$repo' is not a Hugging Face repository name (owner/name)" ;;
    esac
    dir="$MODELS_DIR/$repo"

    if [ -f "$dir/$MARKER" ] && [ "$(cat "$dir/$MARKER")" = "$repo@$revision" ]; then
        log "$repo@$revision is already in $dir; skipping the download"
        verify_files "$dir" "$kind"
    elif [ "$check_only" -eq 1 ]; then
        fail "$repo@$revision is not downloaded into $dir yet"
    else
        mkdir -p "$dir"
        download "$repo" "$revision" "$dir" "$kind"
        verify_files "$dir" "$kind"
        printf '%s\n' "$repo@$revision" > "$dir/$MARKER"
        log "$repo@$revision is complete"
    fi
    kind=adapter
done

log "all models are in $MODELS_DIR"
