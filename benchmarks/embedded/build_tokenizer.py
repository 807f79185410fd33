"""Build the Stable Diffusion 1.x CLIP tokenizer files for ``lab/dvar_lab/assets/mini-sd/tokenizer``.

SD 1.x uses the tokenizer of ``openai/clip-vit-large-patch14``: OpenAI CLIP's byte-level
BPE with 49,408 tokens. Its only source of truth is the BPE merges file that OpenAI
published with CLIP, ``bpe_simple_vocab_16e6.txt.gz``; the ``open_clip_torch`` wheel on
PyPI ships an identical copy. This script rebuilds the vocabulary exactly as OpenAI's
``SimpleTokenizer`` does and writes it in the format ``transformers.CLIPTokenizer`` reads:

- ``vocab.json``: token -> id (256 byte symbols, the same with ``</w>``, 48,894 merges,
  then ``<|startoftext|>`` = 49406 and ``<|endoftext|>`` = 49407);
- ``merges.txt``: a ``#version: 0.2`` line, then the 48,894 merges in rank order;
- ``tokenizer_config.json`` and ``special_tokens_map.json``: max length 77, lower-casing,
  ``<|endoftext|>`` as eos, pad and unk.

Usage (from the repository root)::

    python benchmarks/embedded/build_tokenizer.py                     # fetches the wheel with pip
    python benchmarks/embedded/build_tokenizer.py bpe_simple_vocab_16e6.txt.gz
    python benchmarks/embedded/build_tokenizer.py --out /tmp/tokenizer path/to/file.txt.gz

open_clip is only downloaded (``pip download --no-deps``) and unzipped, never installed.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
# SHA-256 of OpenAI's bpe_simple_vocab_16e6.txt.gz (unchanged across open_clip releases).
BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
# OpenAI CLIP keeps the merges on lines 1 .. 49152-256-2 (line 0 is a header): together
# with 512 byte symbols and 2 special tokens this makes a 49,408-token vocabulary.
N_MERGES = 49152 - 256 - 2
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MODEL_MAX_LENGTH = 77

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO_ROOT / "lab" / "dvar_lab" / "assets" / "mini-sd" / "tokenizer"


def bytes_to_unicode() -> dict[int, str]:
    """Map each byte to a printable unicode character, as OpenAI CLIP and GPT-2 do.

    Example:
        >>> bytes_to_unicode()[ord("a")], bytes_to_unicode()[ord(" ")]
        ('a', 'Ġ')
    """
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def read_merges(bpe_gz: Path) -> list[tuple[str, str]]:
    """Read the ranked merges from OpenAI's ``bpe_simple_vocab_16e6.txt.gz``.

    Example:
        >>> read_merges(Path("bpe_simple_vocab_16e6.txt.gz"))[:2]  # doctest: +SKIP
        [('i', 'n'), ('t', 'h')]
    """
    lines = gzip.decompress(bpe_gz.read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
    if len(merges) != N_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{bpe_gz} does not look like CLIP's BPE merges file")
    return merges  # type: ignore[return-value]


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """Build CLIP's token -> id table from its merges, in OpenAI's order.

    Example:
        >>> len(build_vocab([("i", "n")]))  # 256 + 256 + 1 merge + 2 specials
        515
    """
    byte_symbols = list(bytes_to_unicode().values())
    tokens = byte_symbols + [s + "</w>" for s in byte_symbols]
    tokens += ["".join(m) for m in merges]
    tokens += [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("duplicate tokens in the vocabulary")
    return vocab


def _special(content: str) -> dict[str, object]:
    return {
        "content": content,
        "lstrip": False,
        "normalized": True,
        "rstrip": False,
        "single_word": False,
    }


def tokenizer_config() -> dict[str, object]:
    """``tokenizer_config.json`` of the SD 1.x tokenizer (openai/clip-vit-large-patch14)."""
    return {
        "add_prefix_space": False,
        "added_tokens_decoder": {
            "49406": {**_special(BOS), "special": True},
            "49407": {**_special(EOS), "special": True},
        },
        "bos_token": BOS,
        "clean_up_tokenization_spaces": False,
        "do_lower_case": True,
        "eos_token": EOS,
        "errors": "replace",
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": EOS,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": EOS,
    }


def special_tokens_map() -> dict[str, object]:
    """``special_tokens_map.json`` of the SD 1.x tokenizer."""
    return {
        "bos_token": _special(BOS),
        "eos_token": _special(EOS),
        "pad_token": EOS,
        "unk_token": _special(EOS),
    }


def write_tokenizer(bpe_gz: Path, out_dir: Path) -> None:
    """Write the four tokenizer files built from ``bpe_gz`` into ``out_dir``.

    Example:
        >>> write_tokenizer(Path("bpe_simple_vocab_16e6.txt.gz"), Path("tok"))  # doctest: +SKIP
    """
    merges = read_merges(bpe_gz)
    vocab = build_vocab(merges)
    out_dir.mkdir(parents=True, exist_ok=True)

    def dump(name: str, obj: object, **kw: object) -> None:
        text = json.dumps(obj, ensure_ascii=False, **kw) + "\n"  # type: ignore[arg-type]
        (out_dir / name).write_text(text, encoding="utf-8", newline="\n")

    dump("vocab.json", vocab, separators=(",", ":"))
    merges_text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    (out_dir / "merges.txt").write_text(merges_text, encoding="utf-8", newline="\n")
    dump("tokenizer_config.json", tokenizer_config(), indent=2, sort_keys=True)
    dump("special_tokens_map.json", special_tokens_map(), indent=2, sort_keys=True)


def fetch_bpe(dest_dir: Path) -> Path:
    """Download the open_clip_torch wheel with pip (no install) and extract the BPE file."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            "open_clip_torch",
            "-d",
            str(dest_dir),
        ],
        check=True,
    )
    wheel = next(dest_dir.glob("open_clip_torch-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        target = dest_dir / Path(BPE_MEMBER).name
        target.write_bytes(zf.read(BPE_MEMBER))
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "bpe", nargs="?", type=Path, help="path to bpe_simple_vocab_16e6.txt.gz (default: fetch via pip)"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"default: {DEFAULT_OUT}")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        bpe = args.bpe if args.bpe is not None else fetch_bpe(Path(tmp))
        digest = hashlib.sha256(bpe.read_bytes()).hexdigest()
        if digest != BPE_SHA256:
            raise SystemExit(f"{bpe}: sha256 {digest} is not OpenAI's ({BPE_SHA256})")
        write_tokenizer(bpe, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
