#!/usr/bin/env bash
# Build .devdata/ for benchmarks/gpu_session.sh: a copy of ../shared/data (without the
# pseudopotentials) and the processed-CSV cache, since the GPU image has no pymatgen to
# process the CSVs itself. Run in the repository root with the package installed; the
# folder is kept out of git through .git/info/exclude and travels with the lease as a
# carried path (about 30 MB):
#
#   bash benchmarks/prepare_gpu_data.sh
#   (then, with the device tool: run "bash benchmarks/gpu_session.sh 500", carry .devdata)
set -euo pipefail
SRC=${1:-../shared/data}
[ -d "$SRC" ] || { echo "no data folder at $SRC" >&2; exit 1; }
mkdir -p .git/info
grep -qx '/.devdata/' .git/info/exclude 2>/dev/null || echo '/.devdata/' >> .git/info/exclude
rm -rf .devdata
mkdir -p .devdata/shared/data .devdata/cache
for d in "$SRC"/*/; do
  name=$(basename "$d")
  [ "$name" = pseudo ] && continue
  cp -r "$d" .devdata/shared/data/
done
cp "$SRC"/README.md "$SRC"/SHA256SUMS .devdata/shared/data/ 2>/dev/null || true
chmod -R u+w .devdata
# Fill the cache for every CSV the benchmarks and `dao train` read.
DAO_CACHE_DIR="$PWD/.devdata/cache" "${PYTHON:-python}" - "$SRC" <<'EOF'
import sys
from pathlib import Path

from dao.data.csv import load_csv

for path in sorted(Path(sys.argv[1]).glob("*/*.csv.gz")):
    if path.parent.name in ("3dsc_mp", "cspbench"):
        continue  # not crystal CSVs of the CDVAE format
    try:
        print(path, len(load_csv(path, workers=0, progress=False).num_atoms), flush=True)
    except Exception as exc:  # noqa: BLE001  (reported; the others still get cached)
        print(f"{path}: skipped ({exc})", flush=True)
EOF
du -sh .devdata
