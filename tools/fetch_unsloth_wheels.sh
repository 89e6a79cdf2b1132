#!/usr/bin/env bash
# Re-create .whl-unsloth/ (the offline wheel set of the `unsloth` bench system) from tools/unsloth_wheels.txt,
# for the H200's Python 3.12 / manylinux x86_64, and copy the shards' tokenizer beside it (Unsloth's
# FastLanguageModel.from_pretrained loads a tokenizer from the model folder; the H200 has no network).
# unsloth's wheel carries studio/, an 82 MB web UI the trainer never imports: it is stripped so the carried
# folder stays small. Usage: bash tools/fetch_unsloth_wheels.sh [DEST] [TOKENIZER_DIR]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dest=${1:-$root/.whl-unsloth}
tok=${2:-$root/../shared/data/tokenizers/qwen3-4b-thinking-2507}
mkdir -p "$dest"
grep -oE '^[A-Za-z0-9_.-]+==[^ #]+' "$root/tools/unsloth_wheels.txt" | while read -r req; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d "$dest" "$req"
done
python3 - "$dest" <<'PY'
"""Strip studio/ from the unsloth wheel (and its RECORD lines), in place."""
import pathlib, sys, zipfile

for whl in pathlib.Path(sys.argv[1]).glob("unsloth-*-py3-none-any.whl"):
    with zipfile.ZipFile(whl) as zin:
        names = zin.namelist()
        if not any(n.startswith("studio/") for n in names):
            continue
        tmp = whl.with_suffix(".tmp")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
            for info in zin.infolist():
                if info.filename.startswith("studio/"):
                    continue
                data = zin.read(info)
                if info.filename.endswith(".dist-info/RECORD"):
                    data = b"".join(l for l in data.splitlines(True) if not l.startswith(b"studio/"))
                zout.writestr(info, data)
    tmp.replace(whl)
    print(f"stripped studio/ from {whl.name}: {whl.stat().st_size / 2**20:.1f} MB")
PY
if [ -d "$tok" ]; then
  mkdir -p "$dest/tokenizer"
  rm -rf "$dest/tokenizer/$(basename "$tok")"
  cp -r "$tok" "$dest/tokenizer/"
  chmod -R u+w "$dest/tokenizer"
fi
du -sh "$dest"
