"""Rebuild the open-autoglm-base corpus and tokenizer from Debian documentation packages.

Sources (both fetched with ``apt-get download``, no other network access):

* ``python3.11-doc`` -- the reST sources of the Python 3.11 documentation (PSF licence);
  held-out text is drawn from these files only, so what ships with the repository is PSF-licensed.
* ``linux-doc-6.1`` -- the kernel's reST documentation, used as extra *training* text only.

The split is by file: a file goes to held-out when ``sha1(path) % 100 < HELDOUT_PERCENT``,
so no file is in both splits and the split is stable across rebuilds.

Outputs::

    data/corpus/train.txt                     training text (not committed, ~35 MB)
    data/corpus/train.bin, heldout.bin        uint16 token ids (not committed)
    src/openautoglm/data/heldout.txt          held-out text (committed, package data)
    src/openautoglm/data/heldout_files.txt    which source files are held out
    data/tokenizer/                           BPE tokenizer trained on train.txt only

Usage: ``python scripts/build_corpus.py [--vocab-size 8192] [--workdir data]``
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import logging
import subprocess
import tempfile
from pathlib import Path

import numpy as np

log = logging.getLogger("build_corpus")

REPO = Path(__file__).resolve().parents[1]
PKG_DATA = REPO / "src" / "openautoglm" / "data"
PACKAGES = ("python3.11-doc", "linux-doc-6.1")
HELDOUT_PERCENT = 5
EOS = "<|endoftext|>"
SPECIAL_TOKENS = [EOS, "<|pad|>"]


def fetch_packages(dest: Path) -> Path:
    """Download and unpack the Debian packages into ``dest`` (idempotent)."""
    root = dest / "root"
    if (root / "usr/share/doc").exists():
        return root
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(["apt-get", "download", *PACKAGES], cwd=dest, check=True)
    for deb in sorted(dest.glob("*.deb")):
        subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
    return root


def collect(root: Path) -> list[tuple[str, str, str]]:
    """Return ``(source, relative path, text)`` for every documentation file, sorted by path."""
    docs: list[tuple[str, str, str]] = []
    py = root / "usr/share/doc/python3.11/html/_sources"
    for f in sorted(py.rglob("*.rst.txt")):
        docs.append(("python", str(f.relative_to(py)), f.read_text("utf-8", errors="replace")))
    lx = root / "usr/share/doc/linux-doc-6.1/Documentation"
    for f in sorted(lx.rglob("*.rst.gz")):
        with gzip.open(f, "rt", encoding="utf-8", errors="replace") as fh:
            docs.append(("linux", str(f.relative_to(lx)), fh.read()))
    if not docs:
        raise RuntimeError(f"no documentation files found under {root}")
    return docs


def is_heldout(source: str, rel: str) -> bool:
    if source != "python":
        return False
    return int(hashlib.sha1(rel.encode()).hexdigest(), 16) % 100 < HELDOUT_PERCENT


def clean(text: str) -> str:
    # Normalise line endings and strip trailing spaces; keep the reST markup (it is the domain).
    return "\n".join(line.rstrip() for line in text.replace("\r\n", "\n").split("\n")).strip() + "\n"


def train_tokenizer(train_txt: Path, vocab_size: int, out_dir: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=True,
    )
    tok.train([str(train_txt)], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=None, pad_token="<|pad|>"
    )
    fast.model_max_length = 2048
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)


def encode(tokenizer_dir: Path, texts: list[str], out: Path) -> int:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    eos = tok.token_to_id(EOS)
    ids: list[int] = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eos)
    arr = np.asarray(ids, dtype=np.uint16)
    arr.tofile(out)
    return arr.size


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=REPO / "data")
    ap.add_argument("--vocab-size", type=int, default=8192)
    args = ap.parse_args()

    root = fetch_packages(Path(tempfile.gettempdir()) / "openautoglm-debs")
    docs = collect(root)
    train = [clean(t) for s, r, t in docs if not is_heldout(s, r)]
    held = [(r, clean(t)) for s, r, t in docs if is_heldout(s, r)]
    corpus = args.workdir / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    (corpus / "train.txt").write_text(f"\n{EOS}\n".join(train), "utf-8")
    PKG_DATA.mkdir(parents=True, exist_ok=True)
    (PKG_DATA / "heldout.txt").write_text(f"\n{EOS}\n".join(t for _, t in held), "utf-8")
    (PKG_DATA / "heldout_files.txt").write_text("\n".join(f"python3.11-doc:{r}" for r, _ in held) + "\n")
    log.info("files: %d train, %d held-out", len(train), len(held))

    tok_dir = args.workdir / "tokenizer"
    train_tokenizer(corpus / "train.txt", args.vocab_size, tok_dir)
    n_train = encode(tok_dir, train, corpus / "train.bin")
    n_held = encode(tok_dir, [t for _, t in held], corpus / "heldout.bin")
    stats = {
        "packages": list(PACKAGES),
        "files_train": len(train),
        "files_heldout": len(held),
        "chars_train": sum(map(len, train)),
        "chars_heldout": sum(len(t) for _, t in held),
        "tokens_train": n_train,
        "tokens_heldout": n_held,
        "vocab_size": args.vocab_size,
        "heldout_rule": f"python3.11-doc files with sha1(path) % 100 < {HELDOUT_PERCENT}",
    }
    (corpus / "stats.json").write_text(json.dumps(stats, indent=2))
    log.info(json.dumps(stats, indent=2))


if __name__ == "__main__":
    main()
