"""Tokenizers: a byte-level BPE trained (and cached) on the corpus, or a pretrained one from the Hub."""

from __future__ import annotations

import hashlib
import os
import pathlib
from collections.abc import Callable, Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ..files import atomic_write

EOT = "<|endoftext|>"
# End-of-document tokens of common pretrained tokenizers, tried in this order.
_EOT_CANDIDATES = (EOT, "</s>", "<|end_of_text|>", "<eos>")


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE with `vocab_size` tokens; "<|endoftext|>" (id 0) separates documents."""
    if vocab_size < 257:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: byte-level BPE needs 256 bytes + the end-of-text token"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[EOT],
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def cached_bpe(
    name: str, texts_fn: Callable[[], Iterable[str]], vocab_size: int, cache_dir: str | os.PathLike
) -> Tokenizer:
    """Load `<cache_dir>/tokenizers/<name>-bpe-<vocab_size>.json`, or train it on `texts_fn()` and save it."""
    path = pathlib.Path(cache_dir) / "tokenizers" / f"{name}-bpe-{vocab_size}.json"
    if path.is_file():
        return Tokenizer.from_file(str(path))
    tok = train_bpe(texts_fn(), vocab_size)
    atomic_write(path, tok.save)
    return tok


def pretrained_tokenizer(name: str) -> Tokenizer:
    """`Tokenizer.from_pretrained(name)` (e.g. "t5-base"); needs network unless the HF cache has it."""
    try:
        return Tokenizer.from_pretrained(name)
    except Exception as err:  # the Hub client raises several OSError / HTTP error types
        raise ConnectionError(
            f"tokenizer={name!r}: could not load it from the Hugging Face Hub or its local cache "
            f"({type(err).__name__}: {err}). A pretrained tokenizer needs network access once; "
            "offline, leave tokenizer=None to train a BPE on the corpus."
        ) from err


def eot_id(tok: Tokenizer) -> int:
    """Id of the end-of-document token ("<|endoftext|>", "</s>", ...)."""
    for token in _EOT_CANDIDATES:
        idx = tok.token_to_id(token)
        if idx is not None:
            return idx
    raise ValueError(
        f"the tokenizer has none of the end-of-document tokens {_EOT_CANDIDATES}; add one as a special token"
    )


def tokenizer_hash(tok: Tokenizer) -> str:
    """Short content hash of the tokenizer's JSON (names token caches)."""
    return hashlib.sha256(tok.to_str().encode("utf-8")).hexdigest()[:16]
