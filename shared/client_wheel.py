"""The runner client's wheel, as a deployment serves it at /gbx/: built reproducibly, listed with its sha256.

Usage: python -m shared.client_wheel DIR   (what deploy.sh runs to stage Hosting; `make run` builds it too)
"""

from __future__ import annotations

import hashlib
import html
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from shared.config import REPO_ROOT

CLIENT_DIR = REPO_ROOT / "client"
INDEX = "index.html"
SUMS = "SHA256SUMS"
# Zip entries take their times from here, not from the clock: the same source builds the same bytes, so a
# hash pinned in a customer's Dockerfile keeps matching after every redeploy of an unchanged client.
# 1980-01-01, the earliest time a zip entry can hold.
SOURCE_DATE_EPOCH = "315532800"


class WheelBuildFailed(RuntimeError):
    """pip could not build the client's wheel (its message says why)."""


@dataclass(frozen=True)
class Wheel:
    """A built wheel of the runner client."""

    path: Path
    sha256: str
    size: int

    @property
    def name(self) -> str:
        """The wheel's file name, which pip reads the version and tags from."""
        return self.path.name


def build(dest: Path, *, base_url: str | None = None, python: str = sys.executable) -> Wheel:
    """Build the gbx wheel into `dest` (replacing what was there) with its index.html (naming `base_url`) and SHA256SUMS."""
    with tempfile.TemporaryDirectory(prefix="gbx-wheel-") as tmp:
        # A copy: setuptools builds in the source tree, and files left there by an earlier build would ship.
        source = Path(tmp) / "client"
        shutil.copytree(CLIENT_DIR, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", ".*"))
        for path in [source, *source.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)  # the zip records modes: the checkout's umask must not
        out = Path(tmp) / "dist"
        # No build isolation: the backend is the pinned setuptools of requirements-dev.txt, so no index is
        # needed and every machine builds with the same one.
        command = [python, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-cache-dir", "--wheel-dir", str(out), str(source)]
        env = {**os.environ, "SOURCE_DATE_EPOCH": SOURCE_DATE_EPOCH, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, check=False)
        wheels = sorted(out.glob("*.whl"))
        if done.returncode != 0 or len(wheels) != 1:
            raise WheelBuildFailed(f"building the gbx wheel failed (pip exit {done.returncode}): {done.stderr.strip()[-2000:]}")
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        target = dest / wheels[0].name
        shutil.copyfile(wheels[0], target)
    data = target.read_bytes()
    wheel = Wheel(path=target, sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    (dest / SUMS).write_text(f"{wheel.sha256}  {wheel.name}\n")
    (dest / INDEX).write_text(index_html(wheel, base_url))
    return wheel


def index_html(wheel: Wheel, base_url: str | None = None) -> str:
    """The /gbx/ page: the wheel as a link pip can follow (its #sha256 is checked on download), and the pip line to copy."""
    name, digest = html.escape(wheel.name), wheel.sha256
    base = html.escape(base_url.rstrip("/")) if base_url else "BASE"
    where = "" if base_url else "\n<p>where BASE is this site.</p>"
    return f"""<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1"><title>gbx, the runner client</title></head>
<body>
<h1>gbx, the runner client of GBX Entitlements</h1>
<p><a href="{name}#sha256={digest}">{name}</a> ({wheel.size} bytes)</p>
<p>sha256 <code id="sha256">{digest}</code> (also in <a href="{SUMS}">{SUMS}</a>)</p>
<p>Install it in any Python 3.11+ environment; its dependencies come from the package index:</p>
<pre>pip install "gbx-client @ {base}/gbx/{name}#sha256={digest}"</pre>{where}
<p>pip refuses the file if its sha256 differs.</p>
</body>
</html>
"""


def main(argv: list[str] | None = None) -> None:
    """Build the wheel into the folder named on the command line and print what was built."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.exit(__doc__.splitlines()[2].strip())
    try:
        wheel = build(Path(args[0]))
    except WheelBuildFailed as exc:
        sys.exit(f"shared.client_wheel: {exc}")
    print(f"{wheel.sha256}  {wheel.name}")


if __name__ == "__main__":
    main()
