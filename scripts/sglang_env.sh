#!/usr/bin/env bash
# SGLang 0.5.23's own virtual environment on a CPU machine: the real server the rollout tests talk to, and
# what `rollout.backend=sglang` starts on CPU. Its pins (torch 2.14.1, transformers 5.19.0) conflict with
# the project's, so it gets its own venv, as it gets its own container on a cluster.
#
#   scripts/sglang_env.sh            build (or reuse) the venv; prints its python on stdout
#   scripts/sglang_env.sh --check    exit 0 and print its python if it is built and current, else 1
#
# Where: $A3PO_SGLANG_VENV, default ./.venv-sglang in the repository root (gitignored); worktrees can share
# one by pointing the variable at it. Idempotent and cached: a stamp file names the hash of the pinned
# requirements and of the kernel stand-in, so a second call returns at once.
# What: scripts/sglang_requirements.txt (every import of SGLang's CPU path, pinned; torch and torchvision
# from the local wheels, the rest from the package registry), then sglang==0.5.23 with --no-deps (its
# CUDA-only dependencies have no CPU wheels and are never reached with SGLANG_USE_CPU_ENGINE=1), then the
# TEST-ONLY stand-in for the kernel package (tests/support/sgl_kernel_standin: implements the one op the
# CPU path reaches, assign_req_to_token_pool_cpu; every other kernel raises when called).
# A failed build leaves its reason in $VENV/.build-failed (the real-SGLang tests skip, naming it) and exits 3.
# Facts behind it: ../shared/spec/sglang_cpu.md of the project.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
SGLANG_VERSION="0.5.23"
VENV="${A3PO_SGLANG_VENV:-$ROOT/.venv-sglang}"
REQ="$ROOT/scripts/sglang_requirements.txt"
STANDIN="$ROOT/tests/support/sgl_kernel_standin/sgl_kernel"
py="${PYTHON:-python3}"

say() { echo "sglang_env: $*" >&2; }
stamp_name() {
  local h
  h="$( { cat "$REQ"; echo "$SGLANG_VERSION"; cat "$STANDIN"/*.py; } | sha1sum | cut -c1-12)"
  echo "$VENV/.built-$h"
}
STAMP="$(stamp_name)"

if [ "${1:-}" = "--check" ]; then
  [ -f "$STAMP" ] && [ -x "$VENV/bin/python" ] || exit 1
  echo "$VENV/bin/python"
  exit 0
fi

if [ -f "$STAMP" ] && [ -x "$VENV/bin/python" ]; then
  echo "$VENV/bin/python"
  exit 0
fi

fail() {
  say "$*"
  mkdir -p "$VENV"
  printf '%s\n' "$*" >"$VENV/.build-failed"
  exit 3
}

# one build at a time per venv (worktrees sharing it, or two test runs)
mkdir -p "$(dirname "$VENV")"
exec 9>"$VENV.lock"
flock 9
if [ -f "$STAMP" ] && [ -x "$VENV/bin/python" ]; then  # built by whoever held the lock
  echo "$VENV/bin/python"
  exit 0
fi
say "building SGLang $SGLANG_VERSION's environment in $VENV (first time: a few minutes, ~6 GB)"
rm -f "$VENV/.build-failed" "$VENV"/.built-*
if [ ! -x "$VENV/bin/python" ]; then
  "$py" -m venv "$VENV" || fail "cannot create a venv at $VENV with $py"
fi
log="$VENV/build.log"
export PIP_DISABLE_PIP_VERSION_CHECK=1
"$VENV/bin/pip" install -q -r "$REQ" >"$log" 2>&1 \
  || fail "pip install -r scripts/sglang_requirements.txt failed (see $log): $(grep -v 'is ignored' "$log" | tail -n 3 | tr '\n' ' ')"
"$VENV/bin/pip" install -q --no-deps "sglang==$SGLANG_VERSION" >>"$log" 2>&1 \
  || fail "pip install --no-deps sglang==$SGLANG_VERSION failed (see $log): $(grep -v 'is ignored' "$log" | tail -n 3 | tr '\n' ' ')"
site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
if [ -e "$site/sgl_kernel" ] && ! grep -qs 'STANDIN = True' "$site/sgl_kernel/__init__.py"; then
  fail "$site/sgl_kernel is a real kernel package, not the test stand-in: not overwriting it"
fi
rm -rf "$site/sgl_kernel.tmp"
cp -r "$STANDIN" "$site/sgl_kernel.tmp" && rm -rf "$site/sgl_kernel" && mv "$site/sgl_kernel.tmp" "$site/sgl_kernel"
# the import SGLang's CPU path makes first (a broken build fails here, not in the middle of a test)
SGLANG_USE_CPU_ENGINE=1 "$VENV/bin/python" -c "import torch, torchvision, sglang.srt.mem_cache.allocation, sglang.launch_server" \
  >>"$log" 2>&1 || fail "SGLang does not import in $VENV (see $log): $(tail -n 3 "$log" | tr '\n' ' ')"
touch "$STAMP"
say "ready: $VENV/bin/python"
echo "$VENV/bin/python"
