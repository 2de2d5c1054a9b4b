#!/usr/bin/env bash
# Refresh the portal's QR decoder from npm: the barcode-detector package (a BarcodeDetector on ZXing-C++ compiled to
# WebAssembly by zxing-wasm), pinned to an exact version and served by the deployment itself from portal/vendor/.
#
#   tools/refresh-qr-decoder.sh 3.2.2     # that exact version of barcode-detector (default: the one vendored now)
#
# It packs barcode-detector@VERSION and the exact zxing-wasm it depends on with `npm pack` (nothing is installed),
# copies the files the portal loads, unchanged (the ES module, the chunk it imports and the reader's .wasm), with
# their licences and zxing-cpp's (from the venv's zxing-cpp, the same decoder gbx verify uses: run make install first),
# into portal/vendor/barcode-detector-VERSION/, writes manifest.json there (versions, tarball integrity, each file's
# sha256; tests/test_pictures.py checks it against the files) and points app.js's QR_DECODER_DIR at the folder.
# The folder's name carries the version, so Hosting may cache its files for a year (firebase.json): a new version is
# a new path. The old folder is removed.
set -euo pipefail

cd "$(dirname "$0")/.."
VENDOR=portal/vendor
APP=portal/app.js
PYTHON=.venv/bin/python

current=$(sed -n 's|^const QR_DECODER_DIR = "./vendor/barcode-detector-\([0-9][0-9.]*\)/";$|\1|p' "$APP")
version=${1:-$current}
if [[ ! "$version" =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]]; then
  echo "refresh-qr-decoder: give an exact version of barcode-detector (x.y.z), not '$version'" >&2
  exit 64
fi
command -v npm >/dev/null || { echo "refresh-qr-decoder: npm is needed (apt-get install npm)" >&2; exit 69; }
[[ -x "$PYTHON" ]] || { echo "refresh-qr-decoder: $PYTHON is missing: run make install first (zxing-cpp's licence comes from it)" >&2; exit 69; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

zxing_wasm=$(npm view "barcode-detector@$version" dependencies.zxing-wasm)
if [[ ! "$zxing_wasm" =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]]; then
  echo "refresh-qr-decoder: barcode-detector@$version depends on zxing-wasm '$zxing_wasm', not one exact version; refusing" >&2
  exit 65
fi
for package in "barcode-detector@$version" "zxing-wasm@$zxing_wasm"; do
  (cd "$work" && npm pack --silent "$package" >/dev/null)
  mkdir -p "$work/${package%@*}"
  tar -xzf "$work/${package%@*}-${package#*@}.tgz" -C "$work/${package%@*}"
done
integrity_detector=$(npm view "barcode-detector@$version" dist.integrity)
integrity_wasm=$(npm view "zxing-wasm@$zxing_wasm" dist.integrity)

target="$VENDOR/barcode-detector-$version"
rm -rf "$VENDOR"
mkdir -p "$target"
cp "$work/barcode-detector/package/dist/es/ponyfill.js" "$target/ponyfill.js"
cp "$work/barcode-detector/package/dist/es/zxing-exported.js" "$target/zxing-exported.js"
cp "$work/zxing-wasm/package/dist/reader/zxing_reader.wasm" "$target/zxing_reader.wasm"
cp "$work/barcode-detector/package/LICENSE" "$target/LICENSE.barcode-detector.txt"
cp "$work/zxing-wasm/package/LICENSE" "$target/LICENSE.zxing-wasm.txt"
"$PYTHON" - "$target/LICENSE.zxing-cpp.txt" <<'EOF'
import sys
from importlib.metadata import distribution

files = [f for f in distribution("zxing-cpp").files or [] if f.name == "LICENSE"]
if not files:
    sys.exit("refresh-qr-decoder: the venv's zxing-cpp has no LICENSE file")
open(sys.argv[1], "w").write(files[0].read_text())
EOF

"$PYTHON" - "$target" "$version" "$zxing_wasm" "$integrity_detector" "$integrity_wasm" <<'EOF'
import hashlib, json, re, sys
from pathlib import Path

target, version, zxing_wasm, integrity_detector, integrity_wasm = sys.argv[1:]
folder = Path(target)
chunk = (folder / "zxing-exported.js").read_text()
# The bundle names the zxing-cpp commit it was built from and the .wasm's sha256 (ZXING_CPP_COMMIT, ZXING_WASM_SHA256).
commit = re.search(r'"(\w{40})", \w+ = \{ locateFile', chunk)
origin = {
    "ponyfill.js": f"barcode-detector@{version} dist/es/ponyfill.js",
    "zxing-exported.js": f"barcode-detector@{version} dist/es/zxing-exported.js",
    "zxing_reader.wasm": f"zxing-wasm@{zxing_wasm} dist/reader/zxing_reader.wasm",
    "LICENSE.barcode-detector.txt": f"barcode-detector@{version} LICENSE (MIT)",
    "LICENSE.zxing-wasm.txt": f"zxing-wasm@{zxing_wasm} LICENSE (MIT)",
    "LICENSE.zxing-cpp.txt": "zxing-cpp LICENSE (Apache-2.0), the C++ library zxing_reader.wasm is compiled from",
}
manifest = {
    "package": "barcode-detector",
    "version": version,
    "npm_integrity": {f"barcode-detector@{version}": integrity_detector, f"zxing-wasm@{zxing_wasm}": integrity_wasm},
    "zxing_wasm": zxing_wasm,
    "zxing_cpp_commit": commit.group(1) if commit else None,
    "files": {name: {"from": source, "sha256": hashlib.sha256((folder / name).read_bytes()).hexdigest(), "bytes": (folder / name).stat().st_size}
              for name, source in origin.items()},
}
(folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
EOF

sed -i "s|^const QR_DECODER_DIR = \"./vendor/barcode-detector-[0-9.]*/\";$|const QR_DECODER_DIR = \"./vendor/barcode-detector-$version/\";|" "$APP"
grep -q "^const QR_DECODER_DIR = \"./vendor/barcode-detector-$version/\";$" "$APP" \
  || { echo "refresh-qr-decoder: could not point $APP's QR_DECODER_DIR at $target" >&2; exit 70; }
echo "refresh-qr-decoder: $target holds barcode-detector@$version with zxing-wasm@$zxing_wasm; see its manifest.json" >&2
