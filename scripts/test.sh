#!/usr/bin/env bash
# Lint, validate the napari manifest, then run the whole test suite on a virtual screen.
set -euo pipefail
cd "$(dirname "$0")/.."
ruff check src tests examples benchmarks
npe2 validate napari-pathology
QT_API=pyqt6 xvfb-run -a -s "-screen 0 1280x1024x24" python3 -m pytest -q "$@"
