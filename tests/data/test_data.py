"""lrtrain.data: the embedded corpus, the cached BPE, packed blocks and their exact resume, local files, C4 offline."""

import json
import os
import time

import datasets
import huggingface_hub.constants
import pytest
import torch

from lrtrain.data import PackedBlocks, PackedStream, TextData, load_data, shakespeare_split, train_bpe
from lrtrain.data.blocks import encode_documents
from lrtrain.data.corpus import VALIDATION_PLAYS, c4_documents, load_text_files, shakespeare_plays
from lrtrain.data.tokenizer import cached_bpe, pretrained_tokenizer

DOCS = [f"Document {i}: " + "to be or not to be, " * (i % 7) + "that is the question.\n" for i in range(40)]


@pytest.fixture(scope="session")
def shakespeare(cache_dir) -> TextData:
    return load_data("shakespeare", seq_len=64, seed=0, vocab_size=4096, cache_dir=cache_dir)


@pytest.fixture(scope="session")
def small_bpe():
    return train_bpe(DOCS, vocab_size=300)


# ---- corpus -------------------------------------------------------------------------------------

def test_plays_are_plain_text():
    plays = shakespeare_plays()
    assert len(plays) == 38 and "tragedies/macbeth" in plays
    for name, text in plays.items():
        for markup in ("**", "#", "_Enter", "_", "*", "\\", "  \n", "\n\n\n"):
            assert markup not in text, (name, markup)
    assert plays["tragedies/macbeth"].startswith(
        "Macbeth\n\nACT I\n\nSCENE I. A desert place.\n\nThunder and lightning. Enter three Witches\n\n"
        "First Witch\nWhen shall we three meet again\n"
    )


def test_split_is_fixed_disjoint_and_small():
    plays, split = shakespeare_plays(), shakespeare_split()
    assert split == shakespeare_split()
    assert split["validation"] == [plays[name] for name in VALIDATION_PLAYS]
    assert len(split["train"]) == 36 and not set(split["train"]) & set(split["validation"])
    assert sorted(split["train"] + split["validation"]) == sorted(plays.values())
    fraction = sum(map(len, split["validation"])) / sum(map(len, plays.values()))
    assert 0.03 < fraction < 0.08


# ---- tokenizer ----------------------------------------------------------------------------------

def test_tokenizer_round_trip_and_eot(shakespeare):
    tok = shakespeare.tokenizer
    assert shakespeare.eot_id == 0 == tok.token_to_id("<|endoftext|>")
    assert shakespeare.vocab_size == tok.get_vocab_size() == 4096
    for text in shakespeare_split()["validation"]:
        assert tok.decode(tok.encode(text, add_special_tokens=False).ids) == text
    assert len(tok.encode("Shall I compare thee to a summer's day?").ids) < 20


def test_cached_tokenizer_is_reused(shakespeare, cache_dir):
    path = cache_dir / "tokenizers" / "shakespeare-bpe-4096.json"
    mtime = path.stat().st_mtime_ns

    def no_training():
        raise AssertionError("the cached tokenizer should have been loaded")

    tok = cached_bpe("shakespeare", no_training, 4096, cache_dir)  # loaded, not trained (no_training raises)
    assert tok.to_str() == shakespeare.tokenizer.to_str() and path.stat().st_mtime_ns == mtime
    again = load_data("shakespeare", seq_len=64, cache_dir=cache_dir)
    assert torch.equal(again.train.tokens, shakespeare.train.tokens) and path.stat().st_mtime_ns == mtime


def test_cached_bpe_writes_atomically(tmp_path):
    tok = cached_bpe("tiny", lambda: DOCS, 300, tmp_path)
    assert tok.get_vocab_size() == 300
    assert [p.name for p in (tmp_path / "tokenizers").iterdir()] == ["tiny-bpe-300.json"]
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe(DOCS, vocab_size=100)


# ---- PackedBlocks -------------------------------------------------------------------------------

def test_blocks_overlap_and_reproduce_the_stream(shakespeare, small_bpe):
    data = shakespeare.train
    blocks = data.blocks(torch.arange(data.num_blocks))
    assert blocks.shape == (data.num_blocks, 65) and data.num_blocks == (data.tokens.numel() - 1) // 64
    assert torch.equal(blocks[:-1, -1], blocks[1:, 0])
    stream = torch.cat([blocks[:, :-1].reshape(-1), blocks[-1, -1:]])
    assert torch.equal(stream, data.tokens[: data.num_blocks * 64 + 1])
    tokens = encode_documents(DOCS, small_bpe, eot_id=0)
    assert (tokens == 0).sum() == len(DOCS) and tokens[-1] == 0
    assert small_bpe.decode(tokens.tolist()) == "".join(DOCS)


def test_every_block_once_per_epoch():
    data = PackedBlocks(torch.arange(101), seq_len=10, seed=3)  # 10 blocks; block i starts at token 10 i
    firsts = torch.cat([data.next_batch(4)[:, 0] // 10 for _ in range(5)])  # 20 blocks = 2 epochs
    assert data.epoch == 2 and data.state_dict() == {"epoch": 2, "position": 0}
    for epoch in range(2):
        assert sorted(firsts[10 * epoch : 10 * epoch + 10].tolist()) == list(range(10))
    assert not torch.equal(firsts[:10], firsts[10:])


def test_seeds_and_exact_resume(shakespeare):
    tokens = shakespeare.validation.tokens

    def batches(seed, n):
        data = PackedBlocks(tokens, seq_len=64, seed=seed)
        return [data.next_batch(48) for _ in range(n)]

    assert all(torch.equal(a, b) for a, b in zip(batches(0, 3), batches(0, 3)))
    assert not torch.equal(batches(0, 1)[0], batches(1, 1)[0])

    original = PackedBlocks(tokens, seq_len=64, seed=5)
    k = original.num_blocks // 48 + 2  # the k batches cross an epoch boundary
    for _ in range(k):
        original.next_batch(48)
    state = json.loads(json.dumps(original.state_dict()))
    assert original.epoch == 1 and all(type(v) is int for v in state.values())
    resumed = PackedBlocks(tokens, seq_len=64, seed=5)
    resumed.load_state_dict(state)
    assert resumed.epoch == 1
    for _ in range(original.num_blocks // 48 + 1):  # and the next batches cross another
        assert torch.equal(original.next_batch(48), resumed.next_batch(48))


def test_validation_iteration(shakespeare):
    val = shakespeare.validation
    first, second = list(val.iter_batches(32)), list(val.iter_batches(32))
    assert len(first) == -(-val.num_blocks // 32) and all(torch.equal(a, b) for a, b in zip(first, second))
    assert torch.equal(torch.cat(first), val.blocks(torch.arange(val.num_blocks)))
    assert first[-1].shape[0] == val.num_blocks % 32 or val.num_blocks % 32 == 0
    capped = list(val.iter_batches(32, max_batches=3))
    assert len(capped) == 3 and all(torch.equal(a, b) for a, b in zip(capped, first))
    assert all(b.shape == (32, 65) for b in val.iter_batches(32, max_batches=10_000))


def test_blocks_errors():
    with pytest.raises(ValueError, match="seq_len"):
        PackedBlocks(torch.arange(10), seq_len=0)
    with pytest.raises(ValueError, match="seq_len=10.*fewer than seq_len"):
        PackedBlocks(torch.arange(10), seq_len=10)
    data = PackedBlocks(torch.arange(11), seq_len=10)
    assert data.num_blocks == 1
    with pytest.raises(ValueError, match="batch_size"):
        data.next_batch(0)
    with pytest.raises(ValueError, match="batch_size"):
        next(data.iter_batches(0))
    with pytest.raises(ValueError, match="does not fit"):
        data.load_state_dict({"epoch": 0, "position": 5})


# ---- PackedStream -------------------------------------------------------------------------------

def test_stream_packs_like_blocks_and_resumes(small_bpe):
    tokens = encode_documents(DOCS, small_bpe, eot_id=0)
    stream = PackedStream(lambda: iter(DOCS), small_bpe, eot_id=0, seq_len=16, read_size=3)
    first = [stream.next_batch(4) for _ in range(3)]
    assert torch.equal(torch.cat(first), PackedBlocks(tokens, 16).blocks(torch.arange(12)))

    per_pass = tokens.numel() // 64  # batches per pass over DOCS: run past a pass boundary
    for _ in range(per_pass):
        stream.next_batch(4)
    assert stream.epoch == 1
    state = json.loads(json.dumps(stream.state_dict()))
    assert 0 < state["documents"] and all(type(t) is int for t in state["buffer"])
    resumed = PackedStream(lambda: iter(DOCS), small_bpe, eot_id=0, seq_len=16, read_size=5)
    resumed.load_state_dict(state)
    assert resumed.epoch == 1 and resumed.state_dict() == state
    for _ in range(per_pass + 2):
        assert torch.equal(stream.next_batch(4), resumed.next_batch(4))


def test_stream_validation_and_errors(small_bpe):
    stream = PackedStream(lambda: iter(DOCS), small_bpe, eot_id=0, seq_len=16)
    one, two = list(stream.iter_batches(8)), list(stream.iter_batches(8))
    assert all(torch.equal(a, b) for a, b in zip(one, two)) and len(one) == len(two) > 1
    n_blocks = (encode_documents(DOCS, small_bpe, 0).numel() - 1) // 16
    assert sum(b.shape[0] for b in one) == n_blocks and one[-1].shape[0] <= 8
    assert len(list(stream.iter_batches(8, max_batches=2))) == 2
    with pytest.raises(ValueError, match="no documents"):
        PackedStream(lambda: iter([]), small_bpe, eot_id=0, seq_len=16).next_batch(1)
    with pytest.raises(ValueError, match="seq_len"):
        PackedStream(lambda: iter(DOCS), small_bpe, eot_id=0, seq_len=0)


# ---- local files --------------------------------------------------------------------------------

def _write_files(tmp_path):
    for i in range(3):
        (tmp_path / f"train{i}.txt").write_text("".join(DOCS[i::3]))
    with open(tmp_path / "val.jsonl", "w") as f:
        for doc in DOCS[:5]:
            f.write(json.dumps({"body": doc, "id": 1}) + "\n")
    return {"train": [str(tmp_path / f"train{i}.txt") for i in range(3)], "validation": str(tmp_path / "val.jsonl")}


def test_local_files(tmp_path):
    files = _write_files(tmp_path)
    docs = load_text_files(files, text_field="body", cache_dir=tmp_path / "hf")
    assert docs["train"] == ["".join(DOCS[i::3]) for i in range(3)] and docs["validation"] == DOCS[:5]
    cache = tmp_path / "cache"
    data = load_data("files", files=files, text_field="body", seq_len=8, vocab_size=300, cache_dir=cache)
    assert isinstance(data.train, PackedBlocks) and data.vocab_size == 300 and data.eot_id == 0
    assert data.tokenizer.decode(data.validation.tokens.tolist()) == "".join(DOCS[:5])
    assert len(list((cache / "tokenizers").iterdir())) == 1
    (tmp_path / "train0.txt").write_text("changed text\n")  # another fingerprint: a new tokenizer
    changed = load_data("files", files=files, text_field="body", seq_len=8, vocab_size=300, cache_dir=cache)
    assert len(list((cache / "tokenizers").iterdir())) == 2
    assert changed.tokenizer.decode(changed.train.tokens.tolist()).startswith("changed text\n")
    # without validation files (or with validation: null, the config's default) the tail is held out
    whole = changed.train.tokens
    for given in ({"train": files["train"]}, {"train": files["train"], "validation": None}):
        held = load_data("files", files=given, seq_len=8, vocab_size=300, cache_dir=cache)
        n_val = held.validation.tokens.numel()
        assert n_val == max(9, round(0.05 * (held.train.tokens.numel() + n_val)))
        assert torch.equal(torch.cat([held.train.tokens, held.validation.tokens]), whole)
    unvalidated = load_data("files", files={"train": files["train"]}, seq_len=8, vocab_size=300, cache_dir=cache,
                            validation_fraction=0)
    assert unvalidated.validation is None and torch.equal(unvalidated.train.tokens, whole)
    # the fingerprint follows the tokens: same data, same fingerprint; other text, another one
    assert load_data("files", files=files, text_field="body", seq_len=8, vocab_size=300,
                     cache_dir=cache).fingerprint == changed.fingerprint != data.fingerprint


def test_bad_inputs(tmp_path):
    files = _write_files(tmp_path)
    with pytest.raises(ValueError, match="shakespeare.*files.*c4"):
        load_data("wikitext", seq_len=8, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="files"):
        load_data("files", seq_len=8, cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_data("files", files={"train": [str(tmp_path / "missing.txt")]}, seq_len=8, cache_dir=tmp_path)
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"data.csv.*\.jsonl"):
        load_text_files({"train": str(tmp_path / "data.csv")})
    with pytest.raises(ValueError, match="text_field='text'.*body"):
        load_text_files({"validation": files["validation"]}, cache_dir=tmp_path / "hf")
    with pytest.raises(ValueError, match="'train'"):
        load_data("files", files={"validation": files["validation"]}, seq_len=8, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="seq_len"):
        load_data("shakespeare", seq_len=0, cache_dir=tmp_path)
    binary = tmp_path / "weights.txt"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match=r"files\['train'\]: .*weights.txt' is not a text file \(it contains NUL"):
        load_data("files", files={"train": [str(binary)]}, seq_len=8, cache_dir=tmp_path)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt' is not a text file .byte 3 is not UTF-8"):
        load_data("files", files={"train": [str(latin1)]}, seq_len=8, cache_dir=tmp_path)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(ValueError, match=r"files\['validation'\] holds no text .*empty.txt"):
        load_data("files", files={"train": files["train"], "validation": [str(empty)]}, seq_len=8,
                  vocab_size=300, cache_dir=tmp_path)
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("a b")
    with pytest.raises(ValueError, match="the validation split of data source 'files'.*fewer than seq_len"):
        load_data("files", files={"train": files["train"], "validation": [str(tiny)]}, seq_len=8,
                  vocab_size=300, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="too few to hold out a validation block"):
        load_data("files", files={"train": [str(tiny)]}, seq_len=8, vocab_size=300, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="validation_fraction must be a number in"):
        load_data("files", files={"train": files["train"]}, seq_len=8, cache_dir=tmp_path, validation_fraction=1)


# ---- C4 and pretrained tokenizers, offline ------------------------------------------------------

def test_c4_fails_fast_offline(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    with pytest.raises(ConnectionError, match="C4.*network access.*HF_HUB_OFFLINE / HF_DATASETS_OFFLINE"):
        load_data("c4", seq_len=8, cache_dir=tmp_path)
    with pytest.raises(ConnectionError, match="C4.*network access"):
        c4_documents("train")
    with pytest.raises(ConnectionError, match="tokenizer='t5-base'.*network access"):
        pretrained_tokenizer("t5-base")
    assert time.perf_counter() - start < 10
    assert os.listdir(tmp_path) == []
