#!/usr/bin/env bash
# Set up what the end-to-end tests need besides the test venv: Open WebUI in a
# venv of its own, and Debian's Chromium for Playwright to drive.
#
#   tests/e2e/setup.sh        # tests/run calls it before pytest
#
# Builds, or reuses from the cache, $CACHE/openwebui-venv from
# tests/requirements-e2e.txt (~2 min and ~3 GB on the first run). The venv is
# reused only if it was built completely from the same requirements file,
# recipe and Python; otherwise it is rebuilt from scratch. Installs the Debian
# package chromium with apt-get when /usr/bin/chromium is missing, which needs
# root (or sudo). Playwright's own browser download (`playwright install`) is
# never used: it cannot reach its download host here.
#
# Environment (the same as tests/run):
#   SLR_CACHE_DIR  cache folder (default: ~/.cache/semantic-lora-router)
#   SLR_PYTHON     Python 3.11 or 3.12 that creates the venv (default: python3)
#
# Afterwards the tests need SLR_OPENWEBUI_BIN=$CACHE/openwebui-venv/bin/open-webui
# and SLR_CHROMIUM=/usr/bin/chromium in their environment.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
REQUIREMENTS=$REPO/tests/requirements-e2e.txt
FUNCTION_REQUIREMENTS=$REPO/tests/requirements-e2e-function.txt
CACHE=${SLR_CACHE_DIR:-${HOME:?HOME is not set; set SLR_CACHE_DIR}/.cache/semantic-lora-router}
PYTHON=${SLR_PYTHON:-python3}
CHROMIUM=/usr/bin/chromium

# Bump when the steps in build_openwebui_venv change, so that venvs built by
# the old steps are rebuilt.
OPENWEBUI_VENV_RECIPE=1

START=$SECONDS

log() {
    printf 'tests/e2e/setup.sh [%3ds] %s\n' "$((SECONDS - START))" "$*"
}

die() {
    printf 'tests/e2e/setup.sh: error: %s\n' "$*" >&2
    exit 1
}

# Print a SHA-256 over the given strings and the contents of the given files
# (the same key scheme as tests/run).
hash_of() {
    local item
    for item in "$@"; do
        if [[ -f $item ]]; then
            printf 'file %s\n' "$(basename "$item")"
            cat "$item"
        else
            printf 'text %s\n' "$item"
        fi
    done | sha256sum | cut -c1-16
}

# build_cached NAME KEY BUILDER: make sure $CACHE/NAME was built by BUILDER with
# this KEY. The folder is reused only if its .slr-key matches and .complete
# exists, so an interrupted build is rebuilt from scratch on the next run.
build_cached() {
    local name=$1 key=$2 builder=$3
    local dir=$CACHE/$name
    if [[ -f $dir/.complete && $(cat "$dir/.slr-key" 2>/dev/null) == "$key" ]]; then
        log "reusing $name ($key)"
        return
    fi

    log "building $name ($key), log in $CACHE/$name.log"
    local start=$SECONDS
    rm -rf "$dir"
    mkdir -p "$dir"
    printf '%s\n' "$key" >"$dir/.slr-key"
    if ! "$builder" "$dir" >"$CACHE/$name.log" 2>&1; then
        tail -n 40 "$CACHE/$name.log" >&2
        die "building $name failed; full log in $CACHE/$name.log"
    fi
    touch "$dir/.complete"
    log "built $name in $((SECONDS - start)) s"
}

build_openwebui_venv() {
    local dir=$1
    "$PYTHON" -m venv "$dir"
    "$dir/bin/python" -m pip install --disable-pip-version-check -r "$REQUIREMENTS"
    "$dir/bin/python" -m pip install --disable-pip-version-check \
        -r "$FUNCTION_REQUIREMENTS"
    # Back to open-webui 0.12.4's own pin; see requirements-e2e-function.txt.
    "$dir/bin/python" -m pip install --disable-pip-version-check aiofiles==25.1.0
    "$dir/bin/python" -c 'import semantic_router, fastembed, prometheus_client, greenlet'
    "$dir/bin/python" -c 'import torch, open_webui; assert torch.version.cuda is None, torch.__version__'
    "$dir/bin/open-webui" --help >/dev/null
}

# Install Debian's chromium (and a font family, so screenshots show text) as
# root, or through sudo when this user is not root.
install_chromium() {
    local run_as_root=()
    if [[ $EUID -ne 0 ]]; then
        command -v sudo >/dev/null ||
            die "$CHROMIUM is missing; install the Debian package chromium as root"
        run_as_root=(sudo)
    fi
    command -v apt-get >/dev/null ||
        die "$CHROMIUM is missing and apt-get is not available; install Chromium so that $CHROMIUM exists"

    log "installing Debian's chromium with apt-get"
    local start=$SECONDS
    # Another apt-get on this machine may hold the dpkg lock for a while.
    "${run_as_root[@]}" apt-get -o DPkg::Lock::Timeout=300 update -qq
    DEBIAN_FRONTEND=noninteractive "${run_as_root[@]}" apt-get \
        -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends \
        chromium fonts-liberation >/dev/null
    log "installed chromium in $((SECONDS - start)) s"
}

# --- checks --------------------------------------------------------------------

command -v "$PYTHON" >/dev/null || die "$PYTHON not found; set SLR_PYTHON to a Python 3.11 or 3.12"
PYTHON_ID=$("$PYTHON" -c 'import platform, sys; print(sys.version.split()[0], platform.machine(), sys.executable)')
"$PYTHON" -c 'import sys; sys.exit(not (3, 11) <= sys.version_info[:2] <= (3, 12))' ||
    die "open-webui 0.12.4 needs Python 3.11 or 3.12, but $PYTHON is $PYTHON_ID; set SLR_PYTHON"
[[ -f $REQUIREMENTS ]] || die "$REQUIREMENTS not found"

mkdir -p "$CACHE"

# Two runs at once would build into the same folder: the second one waits. The
# lock file is not tests/run's, so that tests/run can call this while it holds
# its own lock.
exec 8>"$CACHE/.openwebui-setup.lock"
flock 8

# --- builds --------------------------------------------------------------------

OPENWEBUI_VENV_KEY=$(hash_of "$PYTHON_ID" "recipe $OPENWEBUI_VENV_RECIPE" \
    "$REQUIREMENTS" "$FUNCTION_REQUIREMENTS")
build_cached openwebui-venv "$OPENWEBUI_VENV_KEY" build_openwebui_venv

if [[ ! -x $CHROMIUM ]]; then
    install_chromium
fi
CHROMIUM_VERSION=$("$CHROMIUM" --headless --no-sandbox --version 2>/dev/null) ||
    die "$CHROMIUM is installed but does not run; try: $CHROMIUM --headless --no-sandbox --version"
log "browser: $CHROMIUM_VERSION"

flock -u 8
exec 8>&-
