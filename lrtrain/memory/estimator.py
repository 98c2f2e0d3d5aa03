"""The bytes of one training step of an lrtrain LLaMA, by part, for every method (``estimate``), and
its command line (``python -m lrtrain.memory``)."""

from __future__ import annotations

from ..checks import check_positive_int
from ..models.llama import LLAMA_SIZES, linear_shapes

#: Bytes autograd keeps for the backward pass of an lrtrain LLaMA, per token: a·hidden + b·intermediate
#: per decoder layer, and c·vocab (the float32 log-probabilities) + d·hidden outside the layers.
#: A least-squares fit over eight shapes measured with TensorMemoryTracker (worst error 0.2 %); there
#: is no sequence² term: SDPA does not keep the attention matrix.
ACTIVATION_BYTES = {"fp32": (40.17, 16.04, 4.0, 11.5), "bf16": (24.17, 8.04, 4.0, 7.5)}
#: The references' GaLore / Fira / SLTrain / SST rank per size (``recipe.rank`` in configs/model).
RECIPE_RANK = {"llama_tiny": 32, "llama_20m": 64, "llama_60m": 128, "llama_130m": 256, "llama_350m": 256,
               "llama_1b": 512, "llama_7b": 1024}
METHODS = ("adamw", "adamw8bit", "galore", "fira", "frugal", "apollo", "apollo_mini", "galore_adafactor", "sltrain",
           "sst")
#: Methods that project matrices into a subspace and keep Adam's moments there.
SUBSPACE_ADAM = ("galore", "fira", "apollo", "apollo_mini")
#: ``basis_dtype`` / ``moment_dtype`` values and the bytes per element they store (None: the weights').
STORAGE_BYTES = {"param": None, "float32": 4, "bfloat16": 2, "int8": 1, "int4": 0.5, "seed": 0}
_BYTES = {"fp32": 4, "bf16": 2}
#: The refreshes the estimate models (``proj_method``; FRUGAL's ``blocks`` holds no basis).
PROJ_METHODS = ("svd", "randomized", "random", "gaussian", "coordinates")


def _eight_bit(numel: int) -> int:
    """Bytes of one 8-bit moment (lrtrain's and bitsandbytes'): a code per element and a float32
    scale per block, float32 below the 8-bit threshold."""
    from ..optim.quantized import BLOCK, MIN_8BIT_SIZE

    return 4 * numel if numel < MIN_8BIT_SIZE else numel + 4 * -(-numel // BLOCK)


def basis_bytes(rank: int, length: int, basis_dtype: str, weight_bytes: int) -> int:
    """Bytes of a basis of ``rank`` vectors of ``length`` stored as ``basis_dtype``: float elements, int8 /
    int4 codes plus a float32 scale per :data:`~lrtrain.optim.engine.storage.BASIS_GROUP` entries of each
    vector, or nothing (``seed``)."""
    from ..optim.engine.storage import BASIS_GROUP

    per_element = STORAGE_BYTES[basis_dtype]
    if basis_dtype in ("int8", "int4"):
        codes = rank * (length if basis_dtype == "int8" else -(-length // 2))
        return codes + 4 * rank * -(-length // BASIS_GROUP)
    return int(rank * length * (weight_bytes if per_element is None else per_element))


def refresh_bytes(proj_method: str, m: int, n: int, rank: int, oversample: int = 8) -> int:
    """Bytes a refresh of an (m, n) float32 gradient allocates (measured on lrtrain's code, CPU):
    ``svd`` LAPACK's copy of G, Vᵀ (or U) and U (or Vᵀ) of the short side s, 4mn + 5s²; ``randomized``
    its (m + n, k) sketches, k = rank + oversample; a seeded basis its float64 draw and QR."""
    if proj_method == "svd":
        return 4 * m * n + 5 * min(m, n) ** 2
    if proj_method == "randomized":
        return 8 * (rank + oversample) * (m + n)
    return 16 * rank * min(m, n)


def _trained_tensors(method: str, model: str, vocab_size: int, wb: int, state_bits: int, rank: int,
                     density: float, sparsity: float, device: str, moment_dtype: str,
                     basis_dtype: str, layerwise: bool, proj_method: str, oversample: int) -> tuple[list, int]:
    """``([(elements, state bytes, step temporary bytes), ...], buffer bytes)`` for every trained
    tensor of the model under ``method``. The temporaries are what one tensor's update allocates
    (measured on lrtrain's and torch's update code, per element): torch AdamW 2 copies in the
    weights' dtype; lrtrain's AdamW 1 (8-bit: four float32 chunks, five for bf16 weights); a GaLore, Fira
    or APOLLO matrix R, the float32 working copies of moments not stored in float32 and N (in bf16: W, G
    and the basis are used in bf16, with a copy of a basis not stored in it; in fp32: float32 copies of a
    basis not stored in float32, two for int8/int4 codes), plus Fira's and APOLLO's norms, or at a refresh
    the float32 gradient and the previous basis with :func:`refresh_bytes`; GaLore-Adafactor float32
    copies of G and W besides; FRUGAL's
    state-free update the float32 weight, gradient and sign (12; 4 in fp32); Adafactor its float32
    gradient and weight, G² + ε and its update (of R's size in a subspace)."""
    from ..optim.projector import CPU_HALF_BLOCK
    from ..optim.quantized import CHUNK

    h, layers = LLAMA_SIZES[model]["hidden_size"], LLAMA_SIZES[model]["num_hidden_layers"]
    half = wb == 2
    eight = state_bits == 8 or method == "adamw8bit"
    torch_adamw = method in ("sltrain", "sst") or (method == "adamw" and not layerwise)
    bnb = method == "adamw8bit" and not layerwise  # layer-wise 8-bit Adam: lrtrain's plain 8-bit groups
    mb = wb if torch_adamw or STORAGE_BYTES[moment_dtype] is None else STORAGE_BYTES[moment_dtype]

    def moments(numel: int) -> int:
        return 2 * _eight_bit(numel) if eight else 2 * numel * mb

    def plain(numel: int, rows: int = 0) -> tuple[int, int, int]:  # a tensor trained without a subspace
        if method == "galore_adafactor":  # Adafactor: factored (rows + columns) float32 statistics of matrices
            state = 4 * (rows + numel // rows) if rows else 4 * numel
            return numel, state, (8 * half + 8) * numel  # float32 G and W, G² + ε, the update
        if torch_adamw:  # torch.optim.AdamW
            return numel, moments(numel), 2 * numel * wb
        if bnb:  # bitsandbytes updates in place
            return numel, moments(numel), 0
        return numel, moments(numel), (16 + 4 * half) * min(numel, CHUNK) if eight else numel * wb  # lrtrain's adamw_

    tensors = [plain(vocab_size * h, vocab_size), plain(vocab_size * h, vocab_size)] + [plain(h)] * (2 * layers + 1)
    buffers = 0
    for m, n in linear_shapes(model):
        r = min(rank, m, n)
        long, short = max(m, n), min(m, n)
        basis = basis_bytes(r, short, basis_dtype, wb)
        basis_copies = 0 if STORAGE_BYTES[basis_dtype] == 4 or (basis_dtype == "param" and not half) else \
            2 if basis_dtype in ("int8", "int4") else 1
        working = 8 * half * m * n + 4 * r * short * basis_copies  # float32 G, W and basis
        previous = 4 * r * short * (basis_copies > 0)  # the old basis, loaded in float32
        refresh = refresh_bytes(proj_method, m, n, r, oversample) + 4 * half * m * n + previous
        if method in ("adamw", "adamw8bit"):
            tensors.append(plain(m * n))
        elif method in SUBSPACE_ADAM:
            low_copies = 1 if mb == 4 and not eight else 3  # R, and the moments' float32 working copies
            if half:  # G, W and the basis in their half type: the basis' copy unless stored so, and N's
                half_basis = 0 if STORAGE_BYTES[basis_dtype] in (None, 2) else 2 * r * short
                steady = half_basis + 4 * r * long * low_copies + 2 * r * long
                if device == "cpu":  # products in float32 row blocks (projector.CPU_HALF_BLOCK), float32 N, basis
                    steady += 8 * min(CPU_HALF_BLOCK, -(-m // 8) * n) + 4 * r * (long + short)
            else:
                steady = working + 4 * r * long * low_copies
            if method == "fira":  # its scaled residual's low-rank terms
                steady += (12 - 2 * half) * r * long
            elif method.startswith("apollo"):  # its channel norms
                steady += wb * r * long
            tensors.append((m * n, basis + moments(r * long), max(steady, refresh)))
        elif method == "galore_adafactor":  # factored statistics of R (long x r), no first moment
            tensors.append((m * n, basis + 4 * (long + r), max(working + 12 * r * long, refresh)))  # R, R² + ε, U
        elif method == "frugal":  # a `density` share of the matrices has Adam state at a time
            tensors.append((m * n, round(density * moments(m * n)), (12 if half else 4) * m * n))
        elif method == "sltrain":
            nnz = int(sparsity * m * n)
            tensors += [plain(r * n), plain(m * r), plain(nnz)]
            buffers += 4 * nnz  # int32 support
        else:  # sst: all singular values and `rank` pairs of singular vectors train; U, V are frozen
            k = min(m, n)
            tensors += [plain(k), plain(m * r), plain(n * r)]
            buffers += wb * k * (m + n)
    if torch_adamw and method == "adamw" and device == "cuda":  # torch's foreach update: a copy of every tensor
        total = sum(numel for numel, _, _ in tensors)
        tensors = [(numel, state, 0) for numel, state, _ in tensors] + [(0, 0, total * wb)]
    return tensors, buffers


def estimate(
    model: str, *, method: str = "adamw", vocab_size: int = 32000, dtype: str = "bf16", micro_batch: int = 1,
    seq_len: int = 256, layerwise: bool = False, world_size: int = 1, state_bits: int = 32, rank: int | None = None,
    density: float = 0.25, sparsity: float = 0.03, device: str = "cuda", moment_dtype: str = "param",
    basis_dtype: str = "param", proj_method: str | None = None, oversample: int = 8,
) -> dict[str, int]:
    """Bytes of one training step of an lrtrain LLaMA ``model`` (a key of ``LLAMA_SIZES``).

    ``weights`` (parameters and buffers), ``gradients`` (all; with ``layerwise`` the largest, the
    one alive at a time), ``optimizer_state``, ``activations`` (kept for the backward pass),
    ``transient`` (the largest of: the start of the backward pass — activations with the float32
    gradients of the log-softmax, or the head's gradient; the optimizer step — gradients plus the largest
    update's temporaries; with ``layerwise`` the activations but the log-probabilities, plus one
    gradient and its update's temporaries) and ``peak`` = weights + state + transient.

    State is counted as lrtrain stores it: moments in ``moment_dtype`` and bases in ``basis_dtype``
    ("param": the weights' dtype, as the references; float32, bfloat16, int8 / int4 codes with group scales,
    or a seed only); 8-bit moments as codes plus block scales; FRUGAL with a ``density`` share of the
    matrices holding Adam state; GaLore-Adafactor's factored float32 statistics; APOLLO-Mini at rank 1.
    ``state_bits=8`` applies to every tensor (GaLore's 8-bit recipe). ``layerwise`` steps each tensor in
    the backward pass (lrtrain's :class:`~lrtrain.optim.LayerwiseUpdates`; for adamw and adamw8bit that is
    lrtrain's plain AdamW groups, with ``state_bits=8`` for the latter). ``device="cuda"`` counts torch
    AdamW's foreach temporaries.
    ``world_size`` > 1 is FSDP2: weights, gradients and state split, two layers gathered at a time.
    ``rank`` defaults to the references' rank for the size (:data:`RECIPE_RANK`; 1 for APOLLO-Mini).
    ``proj_method`` (svd, randomized, or a seeded basis: random, gaussian, coordinates; default the
    method's own: gaussian for APOLLO, svd otherwise) sets what a refresh allocates.
    """
    if model not in LLAMA_SIZES:
        raise ValueError(f"model must be one of {', '.join(LLAMA_SIZES)}; got {model!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    if dtype not in _BYTES:
        raise ValueError(f"dtype must be fp32 or bf16; got {dtype!r}")
    if state_bits not in (32, 8):
        raise ValueError(f"state_bits must be 32 or 8; got {state_bits!r}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda; got {device!r}")
    if layerwise and method in ("sltrain", "sst"):
        raise ValueError(f"layerwise=True is modelled for lrtrain's optimizers (LayerwiseUpdates); {method} trains "
                         "with torch.optim.AdamW")
    for name, value in (("moment_dtype", moment_dtype), ("basis_dtype", basis_dtype)):
        choices = ("param", "float32", "bfloat16") if name == "moment_dtype" else tuple(STORAGE_BYTES)
        if value not in choices:
            raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    proj_method = proj_method or ("gaussian" if method.startswith("apollo") else "svd")
    if proj_method not in PROJ_METHODS:
        raise ValueError(f"proj_method must be one of {', '.join(PROJ_METHODS)}; got {proj_method!r}")
    for name, value in (("micro_batch", micro_batch), ("seq_len", seq_len), ("world_size", world_size)):
        check_positive_int(name, value)
    size = LLAMA_SIZES[model]
    h, f, layers = size["hidden_size"], size["intermediate_size"], size["num_hidden_layers"]
    wb, tokens = _BYTES[dtype], micro_batch * seq_len
    rank = rank or (1 if method == "apollo_mini" else RECIPE_RANK[model])
    tensors, buffers = _trained_tensors(method, model, vocab_size, wb, state_bits, rank, density, sparsity, device,
                                        moment_dtype, basis_dtype, layerwise, proj_method, oversample)
    weights = sum(numel for numel, _, _ in tensors) * wb + buffers
    state = sum(state for _, state, _ in tensors)
    gradients = sum(numel for numel, _, _ in tensors) * wb
    a, b, c, d = ACTIVATION_BYTES[dtype]
    activations = int(tokens * (layers * (a * h + b * f) + c * vocab_size + d * h))
    # The backward pass starts at the loss: the log-softmax's backward holds the float32 gradients of its
    # output and input beside the log-probabilities (8 bytes per token and vocabulary entry on top of the
    # activations); then the log-probabilities go and the head's gradient arrives beside the logits' bf16 one.
    logits = tokens * vocab_size
    backward_start = activations + max(8 * logits, vocab_size * h * wb - 2 * logits)
    if layerwise:
        gradients = max(numel for numel, _, _ in tensors) * wb
        # Steps run inside the backward pass, the first (the head's) once the log-probabilities are gone.
        step = activations - 4 * logits + max(numel * wb + temporary for numel, _, temporary in tensors)
    else:
        step = gradients + max(temporary for _, _, temporary in tensors)
    if world_size > 1:  # FSDP2: everything split, plus two gathered layers
        layer = sum(m * n for m, n in linear_shapes(model, layers=1)) * wb
        weights, gradients, state = weights // world_size + 2 * layer, gradients // world_size, state // world_size
        step = step // world_size + layer
    transient = max(backward_start, step)
    return {"weights": int(weights), "gradients": int(gradients), "optimizer_state": int(state),
            "activations": activations, "transient": int(transient), "peak": int(weights + state + transient)}


def main(argv: list[str] | None = None) -> None:
    """``python -m lrtrain.memory llama_7b --optimizer galore --state-bits 8 --layerwise``: the estimate
    as a table, with AdamW's (same dtype and batch) beside it."""
    import argparse

    from ..text import format_table

    parser = argparse.ArgumentParser(prog="python -m lrtrain.memory", description=main.__doc__.split(":")[0])
    parser.add_argument("model", choices=list(LLAMA_SIZES))
    parser.add_argument("--optimizer", "--method", dest="method", choices=METHODS, default="adamw")
    parser.add_argument("--state-bits", type=int, choices=(32, 8), default=32)
    parser.add_argument("--layerwise", action="store_true", help="per-parameter updates in the backward pass")
    parser.add_argument("--dtype", choices=list(_BYTES), default="bf16", help="weights' dtype")
    parser.add_argument("--batch", type=int, default=1, help="micro-batch (sequences)")
    parser.add_argument("--seq", type=int, default=256, help="sequence length")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--world-size", type=int, default=1, help="FSDP2 ranks")
    parser.add_argument("--rank", type=int, default=None, help="subspace rank (default: the recipe's)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--moment-dtype", choices=("param", "float32", "bfloat16"), default="param")
    parser.add_argument("--basis-dtype", choices=tuple(STORAGE_BYTES), default="param")
    parser.add_argument("--proj-method", choices=PROJ_METHODS, default=None,
                        help="the refresh (default: the method's own)")
    args = parser.parse_args(argv)
    common = dict(vocab_size=args.vocab, dtype=args.dtype, micro_batch=args.batch, seq_len=args.seq,
                  world_size=args.world_size, device=args.device)
    try:
        chosen = estimate(args.model, method=args.method, state_bits=args.state_bits, layerwise=args.layerwise,
                          rank=args.rank, moment_dtype=args.moment_dtype, basis_dtype=args.basis_dtype,
                          proj_method=args.proj_method, **common)
    except ValueError as error:
        parser.error(str(error))
    baseline = estimate(args.model, method="adamw", **common)
    name = args.method + (" 8-bit" if args.state_bits == 8 and args.method != "adamw8bit" else "") + \
        (" layer-wise" if args.layerwise else "")
    rows = [["", name, "adamw", "ratio"]]
    for key in chosen:
        rows.append([key, f"{chosen[key] / 1e9:.2f} GB", f"{baseline[key] / 1e9:.2f} GB",
                     f"{chosen[key] / baseline[key]:.2f}" if baseline[key] else "-"])
    print(f"{args.model}, {args.dtype} weights, {args.batch} x {args.seq} tokens, world size {args.world_size}, "
          f"{args.device} (estimate; GB = 10^9 bytes, as the papers count)")
    print(format_table(rows))
