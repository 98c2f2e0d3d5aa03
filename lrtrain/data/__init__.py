"""Training text: corpus -> tokenizer -> packed (seq_len + 1)-token blocks, behind one entry point, `load_data`.

Sources: "shakespeare" (the embedded default, offline), "files" (local .txt/.json/.jsonl), "c4"
(streamed from the Hub; needs network). Tokenizers and encoded tokens are cached under `cache_dir`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pathlib
from dataclasses import dataclass

import tokenizers
import torch

from .blocks import PackedBlocks, PackedStream, cached_tokens
from .corpus import c4_documents, check_files, load_text_files, require_network, shakespeare_split
from .tokenizer import cached_bpe, eot_id, pretrained_tokenizer, tokenizer_hash, train_bpe

SOURCES = ("shakespeare", "files", "c4")


@dataclass
class TextData:
    """What the trainer needs: the tokenizer, its sizes, and the train / validation block sources."""

    tokenizer: tokenizers.Tokenizer
    vocab_size: int
    eot_id: int
    train: PackedBlocks | PackedStream
    validation: PackedBlocks | PackedStream | None
    #: identifies the tokens (or, for a stream, the source) and the tokenizer: a resumed run checks it
    fingerprint: str = ""


def _fingerprint(paths: list[str], text_field: str) -> str:
    """Hash of the files' paths, sizes and modification times (names the caches of local files)."""
    stats = [(os.path.abspath(p), os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in paths]
    return hashlib.sha256(json.dumps([text_field, stats]).encode()).hexdigest()[:16]


def load_data(
    source: str,
    *,
    seq_len: int,
    seed: int = 0,
    vocab_size: int = 4096,
    cache_dir: str | os.PathLike,
    files: dict | None = None,
    text_field: str = "text",
    tokenizer: str | None = None,
    validation_fraction: float = 0.05,
) -> TextData:
    """Tokenizer plus train / validation blocks of `seq_len + 1` tokens for `source`.

    - "shakespeare": the 38 plays (36 train, 2 validation), a byte-level BPE of `vocab_size` trained
      on the train plays; `PackedBlocks` for both splits.
    - "files": `files={"train": [...], "validation": [...]}`, documents from `text_field` for json
      files; BPE trained on the train documents; `PackedBlocks`. Without validation files (or with
      `validation: None`) the last `validation_fraction` of the training tokens (at least one block)
      is held out as the validation split; `validation_fraction=0` trains on everything, unvalidated.
    - "c4": streamed C4 (en); `PackedStream` for both splits (train shuffled by `seed`).
    `tokenizer` names a pretrained Hub tokenizer to use instead of a trained BPE (c4: "t5-base" by
    default); then `vocab_size` is the tokenizer's own. `seed` orders the training blocks.
    """
    if source not in SOURCES:
        raise ValueError(f"source={source!r}; choose one of {SOURCES}")
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len} must be >= 1")
    if (files is not None) != (source == "files"):
        raise ValueError("files={...} is required for source='files' and only used there")
    if isinstance(validation_fraction, bool) or not isinstance(validation_fraction, (int, float)) \
            or not 0 <= validation_fraction < 1:
        raise ValueError(f"validation_fraction must be a number in [0, 1); got {validation_fraction!r}")
    cache_dir = pathlib.Path(cache_dir)

    if source == "c4":
        require_network("C4")
        tok = pretrained_tokenizer(tokenizer or "t5-base")
        eot = eot_id(tok)
        train = PackedStream(lambda: c4_documents("train", seed=seed), tok, eot, seq_len)
        validation = PackedStream(lambda: c4_documents("validation"), tok, eot, seq_len)
        return TextData(tok, tok.get_vocab_size(), eot, train, validation, _digest("c4", tokenizer_hash(tok)))

    if source == "shakespeare":
        splits = ("train", "validation")
        names = {split: "shakespeare" for split in splits}
        documents = shakespeare_split
    else:
        files = {split: paths for split, paths in files.items() if paths is not None}
        checked = check_files(files)
        if "train" not in checked or not set(checked) <= {"train", "validation"}:
            raise ValueError(f"files has splits {sorted(checked)}; give 'train' and optionally 'validation'")
        splits = tuple(checked)
        names = {split: "files-" + _fingerprint(checked[split][1], text_field) for split in splits}
        documents = functools.cache(lambda: load_text_files(files, text_field, cache_dir / "datasets"))

    if tokenizer is None:
        tok = cached_bpe(names["train"], lambda: documents()["train"], vocab_size, cache_dir)
    else:
        tok = pretrained_tokenizer(tokenizer)
    eot = eot_id(tok)

    tokens = {split: cached_tokens(names[split], split, lambda split=split: documents()[split], tok, eot, cache_dir)
              for split in splits}
    if "validation" not in tokens and validation_fraction > 0:
        tokens["train"], tokens["validation"] = hold_out(tokens["train"], validation_fraction, seq_len)

    def blocks(split: str) -> PackedBlocks:
        try:
            return PackedBlocks(tokens[split], seq_len, seed)
        except ValueError as error:
            raise ValueError(f"the {split} split of data source {source!r}: {error}") from None

    fingerprint = _digest(tokenizer_hash(tok), *(_digest_tokens(tokens[split]) for split in sorted(tokens)))
    validation = blocks("validation") if "validation" in tokens else None
    return TextData(tok, tok.get_vocab_size(), eot, blocks("train"), validation, fingerprint)


def hold_out(tokens: torch.Tensor, fraction: float, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a token stream into (train, validation): the last ``fraction`` of it, at least one
    block of ``seq_len + 1`` tokens, is the validation part."""
    held = max(seq_len + 1, round(fraction * tokens.numel()))
    if tokens.numel() - held < seq_len + 1:
        raise ValueError(f"the training files have {tokens.numel()} tokens: too few to hold out a validation "
                         f"block of seq_len + 1 = {seq_len + 1} and keep one for training; give validation "
                         "files, more text, a shorter train.seq_len, or data.validation_fraction=0")
    return tokens[:-held], tokens[-held:]


def _digest(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _digest_tokens(tokens: torch.Tensor) -> str:
    return hashlib.sha256(tokens.contiguous().numpy().tobytes()).hexdigest()


__all__ = [
    "PackedBlocks",
    "PackedStream",
    "SOURCES",
    "TextData",
    "hold_out",
    "load_data",
    "shakespeare_split",
    "train_bpe",
]
