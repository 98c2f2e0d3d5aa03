"""Token blocks for causal-LM training: documents packed into one stream, cut into (seq_len + 1)-token blocks.

Each document is encoded and followed by the end-of-text id; the documents are concatenated and
block i is tokens[i*seq_len : i*seq_len + seq_len + 1], so consecutive blocks share one token and
inputs = block[:-1], labels = block[1:] cover every token of the stream exactly once.

This differs from the GaLore reference, which tokenizes each C4 document on its own with
truncation and padding to max_length: there a document longer than seq_len loses its tail, a
shorter one is padded (pad positions are wasted compute), and no block spans two documents. Packing
wastes nothing and keeps every token; documents are separated by the end-of-text token instead.

`PackedBlocks` holds a whole encoded corpus (shuffled blocks per epoch, exact resume);
`PackedStream` packs an endless or huge stream of documents (C4) on the fly, also resumable.
"""

from __future__ import annotations

import itertools
import os
import pathlib
from collections.abc import Callable, Iterable, Iterator

import torch
from tokenizers import Tokenizer

from ..checks import check_positive_int
from ..files import atomic_write
from .tokenizer import tokenizer_hash


def _encode(tokenizer: Tokenizer, docs: list[str], eot_id: int) -> list[int]:
    ids: list[int] = []
    for enc in tokenizer.encode_batch_fast(docs, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eot_id)
    return ids


def encode_documents(docs: Iterable[str], tokenizer: Tokenizer, eot_id: int, chunk: int = 256) -> torch.Tensor:
    """All documents, each followed by `eot_id`, as one 1-D int64 tensor."""
    docs, parts = iter(docs), []
    while batch := list(itertools.islice(docs, chunk)):
        parts.append(torch.tensor(_encode(tokenizer, batch, eot_id), dtype=torch.int64))
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)


def cached_tokens(
    name: str,
    split: str,
    docs_fn: Callable[[], Iterable[str]],
    tokenizer: Tokenizer,
    eot_id: int,
    cache_dir: str | os.PathLike,
) -> torch.Tensor:
    """`encode_documents(docs_fn())`, cached in `<cache_dir>/tokens/<name>-<split>-<tokenizer hash>.pt`."""
    path = pathlib.Path(cache_dir) / "tokens" / f"{name}-{split}-{tokenizer_hash(tokenizer)}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    tokens = encode_documents(docs_fn(), tokenizer, eot_id)
    atomic_write(path, lambda tmp: torch.save(tokens, tmp))
    return tokens


class PackedBlocks:
    """Blocks of `seq_len + 1` tokens from a 1-D token tensor; a seeded shuffle per epoch, exactly resumable."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, seed: int = 0):
        if tokens.dim() != 1:
            raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
        check_positive_int("seq_len", seq_len)
        if tokens.numel() < seq_len + 1:
            raise ValueError(f"seq_len={seq_len}: the corpus has {tokens.numel()} tokens, fewer than seq_len + 1; "
                             "use a shorter seq_len or more text")
        self.tokens = tokens.to(torch.int64)
        self.seq_len = seq_len
        self.seed = seed
        self.num_blocks = (tokens.numel() - 1) // seq_len
        self._offsets = torch.arange(seq_len + 1)
        self._epoch = 0
        self._position = 0
        self._perm: tuple[int, torch.Tensor] | None = None

    @property
    def epoch(self) -> int:
        """Epochs completed so far (the epoch the next block comes from)."""
        return self._epoch

    def blocks(self, index: torch.Tensor) -> torch.Tensor:
        """Blocks `index` (shape (k,)) as a (k, seq_len + 1) LongTensor."""
        return self.tokens[index[:, None] * self.seq_len + self._offsets]

    def permutation(self, epoch: int) -> torch.Tensor:
        """The block order of `epoch`: a permutation of range(num_blocks) seeded by (seed, epoch)."""
        if self._perm is None or self._perm[0] != epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(self.num_blocks, generator=gen))
        return self._perm[1]

    def next_batch(self, batch_size: int) -> torch.Tensor:
        """The next (batch_size, seq_len + 1) training blocks; a batch may run on into the next epoch."""
        check_positive_int("batch_size", batch_size)
        parts = []
        while batch_size > 0:
            take = min(batch_size, self.num_blocks - self._position)
            parts.append(self.permutation(self._epoch)[self._position : self._position + take])
            batch_size -= take
            self._position += take
            if self._position == self.num_blocks:
                self._epoch, self._position = self._epoch + 1, 0
        return self.blocks(torch.cat(parts))

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "position": self._position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.num_blocks:
            raise ValueError(f"state {dict(state)} does not fit {self.num_blocks} blocks: "
                             "was it saved with another corpus or seq_len?")
        self._epoch, self._position = epoch, position

    def iter_batches(self, batch_size: int, max_batches: int | None = None) -> Iterator[torch.Tensor]:
        """Blocks in order 0, 1, ... (no shuffle, same every call), (batch_size, seq_len + 1) each.

        With max_batches=None every block is used (the last batch may be smaller); otherwise at
        most `max_batches` full batches.
        """
        check_positive_int("batch_size", batch_size)
        if max_batches is not None:
            check_positive_int("max_batches", max_batches)
        stop = self.num_blocks if max_batches is None else min(self.num_blocks // batch_size, max_batches) * batch_size
        for start in range(0, stop, batch_size):
            yield self.blocks(torch.arange(start, min(start + batch_size, stop)))


class PackedStream:
    """Packs a stream of documents into (batch_size, seq_len + 1) blocks on the fly, resumable.

    `documents_fn()` returns a fresh iterator over the documents, in the same order every call;
    when it runs out, training starts over with a new one (the next epoch).
    """

    def __init__(self, documents_fn: Callable[[], Iterable[str]], tokenizer: Tokenizer, eot_id: int, seq_len: int,
                 read_size: int = 16):
        check_positive_int("seq_len", seq_len)
        check_positive_int("read_size", read_size)
        self.documents_fn = documents_fn
        self.tokenizer = tokenizer
        self.eot_id = eot_id
        self.seq_len = seq_len
        self.read_size = read_size
        self._docs: Iterator[str] | None = None  # opened on first use
        self._documents = 0  # documents consumed, over all epochs
        self._epoch = 0
        self._in_epoch = 0  # documents consumed in this epoch
        self._buffer: list[int] = []

    @property
    def epoch(self) -> int:
        """Passes over the documents completed so far."""
        return self._epoch

    def _next_docs(self, count: int) -> list[str]:
        """The next `count` documents (fewer at the end of a pass), opening a new pass when one ends."""
        if self._docs is None:
            self._docs = iter(self.documents_fn())
        docs = list(itertools.islice(self._docs, count))
        if not docs:
            if self._in_epoch == 0:
                raise ValueError("documents_fn returned no documents")
            self._docs, self._epoch, self._in_epoch = iter(self.documents_fn()), self._epoch + 1, 0
            return self._next_docs(count)
        self._documents += len(docs)
        self._in_epoch += len(docs)
        return docs

    def _cut(self, buffer: list[int], count: int) -> torch.Tensor:
        """`count` overlapping blocks from the start of `buffer`, (count, seq_len + 1)."""
        tokens = torch.tensor(buffer[: count * self.seq_len + 1], dtype=torch.int64)
        return tokens.unfold(0, self.seq_len + 1, self.seq_len).contiguous()

    def next_batch(self, batch_size: int) -> torch.Tensor:
        """The next (batch_size, seq_len + 1) training blocks."""
        check_positive_int("batch_size", batch_size)
        while len(self._buffer) < batch_size * self.seq_len + 1:
            self._buffer.extend(_encode(self.tokenizer, self._next_docs(self.read_size), self.eot_id))
        batch = self._cut(self._buffer, batch_size)
        del self._buffer[: batch_size * self.seq_len]
        return batch

    def state_dict(self) -> dict[str, int | list[int]]:
        return {"documents": self._documents, "buffer": list(self._buffer)}

    def load_state_dict(self, state: dict[str, int | list[int]]) -> None:
        """Re-open the documents and skip the `documents` already consumed (over as many passes as it takes)."""
        documents = int(state["documents"])
        if documents < 0:
            raise ValueError(f"state['documents']={documents} must be >= 0")
        self._docs, self._documents, self._epoch, self._in_epoch = None, 0, 0, 0
        while self._documents < documents:
            self._next_docs(min(documents - self._documents, 10_000))
        self._buffer = [int(t) for t in state["buffer"]]

    def iter_batches(self, batch_size: int, max_batches: int | None = None) -> Iterator[torch.Tensor]:
        """One pass from the first document (independent of training state), same every call.

        With max_batches=None the pass is used to the end (the last batch may be smaller);
        otherwise at most `max_batches` full batches.
        """
        check_positive_int("batch_size", batch_size)
        if max_batches is not None:
            check_positive_int("max_batches", max_batches)
        docs, buffer, produced = iter(self.documents_fn()), [], 0
        while max_batches is None or produced < max_batches:
            while len(buffer) < batch_size * self.seq_len + 1:
                chunk = list(itertools.islice(docs, self.read_size))
                if not chunk:
                    break
                buffer.extend(_encode(self.tokenizer, chunk, self.eot_id))
            count = min(batch_size, (len(buffer) - 1) // self.seq_len) if buffer else 0
            if count < batch_size and (max_batches is not None or count == 0):
                return
            yield self._cut(buffer, count)
            del buffer[: count * self.seq_len]
            produced += 1
