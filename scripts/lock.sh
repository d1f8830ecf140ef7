#!/usr/bin/env bash
# Writes constraints.txt, the versions CI installs, from ./.venv (pip freeze, the project itself left out).
# Refresh: rm -rf .venv && A3PO_UNPINNED=1 bash scripts/install.sh dev,launch && bash scripts/lock.sh && bash scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
tmp="constraints.txt.tmp"
{
  echo "# The versions CI installs (scripts/install.sh passes this file to pip with -c): pip freeze of the venv"
  echo "# scripts/install.sh dev,launch made, on Python 3.11 with the CPU torch. Refresh (README, \"Dependencies\"):"
  echo "#   rm -rf .venv && A3PO_UNPINNED=1 bash scripts/install.sh dev,launch && bash scripts/lock.sh && bash scripts/test.sh"
  .venv/bin/pip freeze --exclude-editable --disable-pip-version-check
} > "$tmp"
mv "$tmp" constraints.txt
echo "constraints.txt: $(grep -vc '^#' constraints.txt) pinned packages"
