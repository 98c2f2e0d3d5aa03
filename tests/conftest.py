"""Test-wide settings: no network, no wandb uploads, small thread counts for 2-core CI."""

import os

# Set before anything imports huggingface_hub / datasets / wandb / triton.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from tests.tolerance import SEED, Tolerance  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(SEED)


@pytest.fixture(autouse=True)
def _audited_assert_close(request, monkeypatch):
    """Under scripts/audit_tolerances.py every torch.testing.assert_close records the share of its
    bound it used, named by the test and the line that called it."""
    from tests import tolerance as audit

    if audit.LOG:
        monkeypatch.setattr(torch.testing, "assert_close", audit.recording_assert_close(request.node.nodeid))


@pytest.fixture
def tolerance(request) -> Tolerance:
    """Bounds that record how much of them each observation used (see tests/tolerance.py)."""
    return Tolerance(request.node.nodeid)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One tokenizer/token cache for the whole session (the Shakespeare BPE is trained once);
    ``LRTRAIN_CACHE_DIR`` points at it for configs and subprocesses."""
    path = tmp_path_factory.mktemp("lrtrain-cache")
    previous = os.environ.get("LRTRAIN_CACHE_DIR")
    os.environ["LRTRAIN_CACHE_DIR"] = str(path)
    yield path
    if previous is None:
        del os.environ["LRTRAIN_CACHE_DIR"]
    else:
        os.environ["LRTRAIN_CACHE_DIR"] = previous


class TinyBlock(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.attn = nn.ModuleDict({"q_proj": nn.Linear(dim, dim, bias=False), "o_proj": nn.Linear(dim, dim, bias=False)})
        self.mlp = nn.ModuleDict({"up_proj": nn.Linear(dim, hidden), "down_proj": nn.Linear(hidden, dim)})
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        h = self.norm(x)
        x = x + self.attn["o_proj"](torch.tanh(self.attn["q_proj"](h)))
        return x + self.mlp["down_proj"](torch.relu(self.mlp["up_proj"](self.norm(x))))


class TinyLM(nn.Module):
    """A small model whose module names follow LLaMA's (attn / mlp / lm_head), for groups and training tests."""

    def __init__(self, vocab: int = 32, dim: int = 24, hidden: int = 40, layers: int = 2):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(TinyBlock(dim, hidden) for _ in range(layers))
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens):
        x = self.embed_tokens(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(x)


@pytest.fixture
def tiny_lm():
    return TinyLM()


def train_lm(model: nn.Module, optimizer: torch.optim.Optimizer, batches) -> None:
    """Next-token steps of a TinyLM on (batch, seq + 1) token blocks, loss in float32."""
    for tokens in batches:
        optimizer.zero_grad()
        logits = model(tokens[:, :-1]).flatten(0, 1).float()
        nn.functional.cross_entropy(logits, tokens[:, 1:].flatten()).backward()
        optimizer.step()


def resumed_twin(model: nn.Module, optimizer: torch.optim.Optimizer, make_optimizer):
    """A copy of ``model`` and a fresh ``make_optimizer(copy)`` loaded from a ``torch.save`` round
    trip (``weights_only=True``) of both state dicts."""
    import copy
    import io

    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    twin = copy.deepcopy(model)
    twin.load_state_dict(saved["model"])
    twin_optimizer = make_optimizer(twin)
    twin_optimizer.load_state_dict(saved["optimizer"])
    return twin, twin_optimizer


def assert_resume_is_exact(model: nn.Module, make_optimizer, batches, split: int):
    """Train ``split`` batches, save and reload into a twin, train both on the rest: equal weights,
    bit for bit. Returns the twin's optimizer and the dtypes of its loaded state, by key."""
    optimizer = make_optimizer(model)
    train_lm(model, optimizer, batches[:split])
    twin, twin_optimizer = resumed_twin(model, optimizer, make_optimizer)
    loaded: dict[str, set[torch.dtype]] = {}  # the dtypes each state key was loaded with
    for state in twin_optimizer.state.values():
        for key, value in state.items():
            if torch.is_tensor(value):
                loaded.setdefault(key, set()).add(value.dtype)
    train_lm(model, optimizer, batches[split:])
    train_lm(twin, twin_optimizer, batches[split:])
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    return twin_optimizer, loaded
