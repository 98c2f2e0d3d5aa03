"""The engine behind GaLoreAdamW, FiraAdamW and FrugalAdamW: Adam in a low-rank subspace of each
gradient matrix, plus a rule for the part of the gradient that falls outside it.

For a 2-D weight W (m, n) with gradient G in a group that has ``rank`` (or ``density``), at step
t (t0 = t - 1 steps taken so far):

1. refresh, when t0 % update_proj_gap == 0: a basis of a rank-r subspace of G (``projector``);
   moments kept (``refresh_moments="keep"``), zeroed with the step count (``"reset"``) or carried
   into the new basis (``"project"``: :func:`rotate_moments_`); with ``stagger_refresh`` matrix i of
   a group's n refreshes first after gap - ⌊i·gap/n⌋ steps, then every gap, so refreshes spread out;
2. R = down(G), shape (m, r) or (r, n);
3. M ← β1·M + (1-β1)·R,  V ← β2·V + (1-β2)·R²,  and the Adam direction with its step size s:
     ``adam_style="hf"``    (galore-torch, fira):  N = M / (√V + ε),          s = lr·√(1-β2ᵗ)/(1-β1ᵗ)
     ``adam_style="torch"`` (FRUGAL, torch.optim): N = M / (√V/√(1-β2ᵗ) + ε),  s = lr/(1-β1ᵗ)
4. W ← W - s·scale·back(N) - residual term, with ``residual``:
     ``"none"``      GaLore: nothing;
     ``"fira"``      Fira: s·ℓ⁻¹·φ⊙(G - scale·back(R)), φ = ‖N‖/(‖R‖+1e-8) per row (right side) or
                     column (left side), ℓ = max(‖S‖/‖S_prev‖, γ)/γ the norm-growth limiter (γ=1.01);
     ``"apollo"``    APOLLO: no back-projection at all, W ← W - s·√scale·ℓ⁻¹·φ⊙G with φ = ‖N‖/(‖R‖+1e-8)
                     per row/column (``scale_type="channel"``) or for the whole matrix ("tensor"),
                     ℓ the limiter on ‖φ⊙G‖;
     ``"sign_sgd"``  FRUGAL: lr·scale·c·sign(G - back(R)),  c = ``state_free_lr_scale``;
     ``"sgd"``       FRUGAL: lr·scale·c·(G - back(R))
   (each rule is one entry of :data:`RESIDUAL_RULES`: its torch form and its kernel arguments);
5. decoupled weight decay W ← W·(1 - lr·wd): after the update for "hf" (as galore-torch and fira
   do), before it for "torch" (as torch.optim.AdamW and FRUGAL do).

``proj_method="blocks"`` is FRUGAL's whole-tensor mode: every ``update_proj_gap`` steps a fraction
``density`` of the group's tensors (any shape) is chosen (``block_order``); those get Adam with
fresh moments, the rest the state-free ``residual`` rule on all of G.

Sharded parameters (FSDP2 DTensors on a 1-D mesh, split on dim 0 or 1) are handled through the
row-split view of :mod:`lrtrain.distributed.sharding`: a projection whose basis spans the unsplit
dimension is local to each rank; one whose basis spans the split dimension all-reduces the (r, n)
projected gradient every step. Refreshes gather the gradient (``svd``) or all-reduce (n, k)
sketches (``randomized``); random and coordinate bases come from seeds. Every rank ends each step
with the same basis, step and limiter state; moments split like the parameter are DTensors.

On CUDA matrices steps 2-5 run as two fused Triton kernels (``fused``; :mod:`lrtrain.kernels`);
the torch code here is their reference and serves every other case.

Groups without ``rank``/``density`` are plain AdamW in the same ``adam_style``. The state holds
tensors only: ``step`` (0-d float32, CPU, as torch.optim), ``exp_avg``/``exp_avg_sq``, ``basis``
(float, int8/int4 codes with ``basis_scale``, or int64 indices for coordinates), ``seed`` (int64),
``limiter_norm`` (Fira) and ``active`` (blocks). Projection math runs in float32 (float64 for float64
parameters) whatever the parameter dtype; the moments and the basis are stored as ``moment_dtype`` and
``basis_dtype`` say (:mod:`lrtrain.optim.engine.storage`; by default in the parameter's dtype, as
galore-torch), also across ``load_state_dict``.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

from ..distributed import local, matrix_shards
from ..kernels.dispatch import kernels_win, kernels_work
from .engine.adafactor import AdafactorSettings, adafactor_lr, adafactor_update, init_adafactor_state, rms
from .engine.adam import (
    AdamSettings,
    adam_denominator_,
    adam_step_size,
    adamw_,
    compute_dtype,
    decoupled_decay,
    init_adamw_state,
    second_moment_divisor,
)
from .engine.blocks import select_blocks
from .engine.options import (
    ALIASES,
    ENGINE_OPTIONS,
    MARKER_KEYS,
    TORCH_ADAMW_DEFAULTS,
    check_misspelled,
    is_projected,
    kernels_available,
    kernels_cover,
    resolve_aliases,
    validate_marker,
    validate_options,
)
from .engine.refresh import MatrixPlan, refresh_basis, rotate_moments_
from .engine.rules import (
    RESIDUAL_RULES,
    ResidualRule,
    SubspaceStep,
    roundoff_floor,
    state_free_lr,
    state_free_update_,
)
from .engine.storage import QUANTIZED_BASES, has_basis, load_basis, storage_dtype
from .projector import (
    add_project_back_,
    project,
    projection_side,
    subspace_rank,
)
from .quantized import float_moments

#: Kept importable from here for code written against the single-file engine.
__all__ = ["ENGINE_OPTIONS", "RESIDUAL_RULES", "ResidualRule", "SubspaceAdamW", "SubspaceStep", "adamw_",
           "compute_dtype", "is_projected", "param_layout", "refresh_due", "roundoff_floor", "rotate_moments_",
           "state_free_lr", "validate_options"]


#: State entries kept on the CPU, and those stored in float32 whatever the weights (8-bit and basis scales).
_ON_CPU = {"step", "seed", "refresh_in"}
#: The ``step`` of state allocated by torch.distributed.checkpoint's zero-gradient initialisation.
PLACEHOLDER_STEP = -1.0
_FLOAT32 = {"exp_avg_absmax", "exp_avg_sq_absmax", "basis_scale"}


def param_layout(shape: tuple[int, ...], group: dict) -> tuple[str, int]:
    """(side, rank) of a 2-D parameter in a subspace group."""
    side = projection_side(shape, group["proj_type"])
    return side, subspace_rank(shape, side, group.get("rank"), group.get("density"))


# --------------------------------------------------------------------------- the optimizer


class SubspaceAdamW(Optimizer):
    """Adam in a periodically refreshed low-rank subspace of each gradient matrix, plus a residual
    rule; plain AdamW for groups without ``rank``. See the module docstring for the equations.

    Args:
        params: parameters or param groups. A group with ``rank`` (int) or ``density`` (fraction of
            the projected side; FRUGAL's rule) is a subspace group and must hold 2-D tensors
            (any shape with ``proj_method="blocks"``).
        lr, betas, eps, weight_decay, correct_bias: as in torch.optim.AdamW / transformers.
        **options: defaults for every group (each group may override them): the fields of
            :class:`lrtrain.optim.engine.options.GroupOptions` (each with its default, its values
            and what it means; the README's key table is made from it).

    The public classes are presets of this engine: they only change the defaults (``preset``).
    """

    preset: dict[str, Any] = {}
    #: Engine options that a preset's own arguments set, with the argument that does (not taken as options).
    options_in_arguments: dict[str, str] = {}

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        **options: Any,
    ):
        for key, default in TORCH_ADAMW_DEFAULTS.items():
            if key in options and options.pop(key) != default:
                raise TypeError(
                    f"{type(self).__name__} does not implement torch.optim.AdamW's {key}={default!r} alternative; "
                    "it takes lr, betas, eps, weight_decay, correct_bias, maximize and lrtrain's options "
                    f"({', '.join(k for k in ENGINE_OPTIONS if k != 'maximize')})"
                )
        for key in options:
            if key not in ENGINE_OPTIONS and key not in ALIASES:
                close = difflib.get_close_matches(key, sorted(ENGINE_OPTIONS), n=1, cutoff=0.75)
                hint = f"; did you mean {close[0]!r}?" if close else f"; known options: {', '.join(ENGINE_OPTIONS)}"
                raise TypeError(f"{type(self).__name__} got an unknown option {key!r}{hint}")
        options = resolve_aliases(dict(options))
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "correct_bias": correct_bias,
            **ENGINE_OPTIONS,
            **self.preset,
            **options,
        }
        validate_options(defaults)
        self._positions: dict[int, tuple[int, int, int]] = {}  # id(param) -> (group, position, index)
        super().__init__(params, defaults)
        if not any(is_projected(group) for group in self.param_groups):
            warnings.warn(
                f"{type(self).__name__} has no param group with 'rank' or 'density', so every parameter trains "
                "with plain AdamW (e.g. the groups HF Trainer's optimizer_cls_and_kwargs builds): give it "
                "lrtrain.optim.param_groups(model, target_modules=..., rank=...); in HF Trainer pass "
                "optimizers=(lrtrain.integrations.hf.create_optimizer(model, args, ...), None)",
                UserWarning, stacklevel=2)

    def __repr__(self) -> str:
        """One line per group: its tensors and the settings that differ from this optimizer's defaults."""
        lines = [f"{type(self).__name__}(lr={self.defaults['lr']}, betas={self.defaults['betas']}, "
                 f"eps={self.defaults['eps']}, weight_decay={self.defaults['weight_decay']})"]
        for k, group in enumerate(self.param_groups):
            own = {key: value for key, value in group.items() if key not in ("params", "param_names")
                   and (key not in self.defaults or self.defaults[key] != value)}
            numbers = sum(p.numel() for p in group["params"])
            kind = "subspace" if is_projected(group) else "plain"
            settings = ", ".join(f"{key}={value!r}" for key, value in own.items())
            lines.append(f"  group {k}: {len(group['params'])} {kind} tensors ({numbers:,} numbers)"
                         + (f": {settings}" if settings else ""))
        return "\n".join(lines)

    # ----------------------------------------------------------------- groups

    def add_param_group(self, param_group: dict) -> None:
        """torch.optim's ``add_param_group`` plus lrtrain's checks; a group that fails them is not
        added. A group whose parameters come with or without names unlike the groups already
        there (``param_groups()`` gives ``(name, parameter)`` pairs) is adapted: its parameters
        get names ``added.<group>.<i>``, or lose theirs."""
        group = resolve_aliases(dict(param_group))
        check_misspelled(group, set(self.defaults) | set(MARKER_KEYS))
        group["params"] = self._match_naming(group["params"])
        super().add_param_group(group)
        group = self.param_groups[-1]
        try:
            validate_options(group)
            for i, p in enumerate(group["params"]):
                if p.is_complex():
                    raise TypeError(f"{self._param_name(group, i)} is {p.dtype}: lrtrain's optimizers take real "
                                    "floating-point tensors only; optimize it with torch.optim.AdamW, or train "
                                    "torch.view_as_real(p)")
            if is_projected(group):
                validate_marker(group)
                self._validate_projected_params(group)
            if group["inner"] == "adafactor":
                # Adafactor keeps a first moment only if it was built with one (beta1); see _adafactor_param
                group.setdefault("first_moment", group["betas"][0] > 0.0)
        except BaseException:
            self.param_groups.pop()
            raise

    def _match_naming(self, params) -> list:
        """``params`` named (``(name, tensor)`` pairs) if the groups already here are, plain otherwise."""
        params = [params] if isinstance(params, Tensor) else list(params)
        if not self.param_groups or not params:
            return params
        named_here = "param_names" in self.param_groups[0]
        named_now = isinstance(params[0], tuple)
        if named_here and not named_now:
            return [(f"added.{len(self.param_groups)}.{i}", p) for i, p in enumerate(params)]
        if named_now and not named_here:
            return [p for _, p in params]
        return params

    def _validate_projected_params(self, group: dict) -> None:
        """What each tensor of a subspace group must be (real floating point; 2-D unless in blocks), and a
        warning for the tensors whose min(m, n) is below the rank. Option combinations: ``COMBINATIONS``."""
        blocks = group["proj_method"] == "blocks"
        clamped = []
        for i, p in enumerate(group["params"]):
            name = self._param_name(group, i)
            if not p.is_floating_point():
                raise TypeError(
                    f"{name} has dtype {p.dtype}; a subspace group takes real floating-point tensors only: "
                    "move it to a group without 'rank'/'density'"
                )
            if blocks:
                continue
            if p.dim() != 2:
                raise ValueError(
                    f"{name} has shape {tuple(p.shape)}, but a group with 'rank' projects 2-D weights only: "
                    "move it to a group without 'rank' (lrtrain.optim.param_groups does this for you)"
                )
            if group.get("rank") is not None and group["rank"] > min(p.shape):
                clamped.append(f"{name} {tuple(p.shape)}")
        if clamped:
            warnings.warn(
                f"rank {group['rank']} exceeds min(m, n) of {len(clamped)} parameter(s) ({', '.join(clamped[:3])}"
                f"{', ...' if len(clamped) > 3 else ''}); those use rank min(m, n).",
                UserWarning,
                stacklevel=3,
            )

    def _param_name(self, group: dict, index: int) -> str:
        names = group.get("param_names")
        if names is not None:
            return repr(names[index])
        group_index = next((k for k, g in enumerate(self.param_groups) if g is group), len(self.param_groups))
        return f"parameter {index} of param group {group_index}"

    def __setstate__(self, state: dict) -> None:
        """Unpickling (and ``copy.deepcopy``) restores only what torch.optim pickles: defaults, state
        and groups; the caches and the placeholder flag are rebuilt from them."""
        super().__setstate__(state)
        self._positions = {}
        self._placeholders = any(torch.is_tensor(entry.get("step")) and float(entry["step"]) == PLACEHOLDER_STEP
                                 for entry in self.state.values())
        for group in self.param_groups:
            for key, value in ENGINE_OPTIONS.items():
                group.setdefault(key, self.defaults.get(key, value))
            if group["inner"] == "adafactor":
                group.setdefault("first_moment", group["betas"][0] > 0.0)

    def load_state_dict(self, state_dict: dict) -> None:
        """torch.optim's load, with three differences. Saved groups that lack lrtrain's keys (a
        ``torch.optim.AdamW`` state dict) take this optimizer's values for them. Each floating state
        entry gets the dtype a fresh step would create, from the saved tensor (not from torch's cast
        to the parameter's dtype): Adam's moments and a float basis as ``moment_dtype`` /
        ``basis_dtype`` say; the rest of the subspace, Adafactor and 8-bit groups' state in the compute
        dtype (float32 for bf16/fp16/fp32 weights, float64 for float64 ones), the parameter's dtype in
        plain AdamW groups; 8-bit and basis codes, indices and seeds keep theirs, scales stay float32.
        ``step`` becomes a float32 CPU tensor (older state dicts hold a number)."""
        state_dict = dict(state_dict)
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) == len(self.param_groups):
            state_dict["param_groups"] = [{**{k: v for k, v in mine.items() if k != "params"}, **saved}
                                          for mine, saved in zip(self.param_groups, saved_groups)]
        saved_ids = [pid for group in saved_groups for pid in group["params"]]
        saved_state = state_dict["state"]
        super().load_state_dict(state_dict)
        ids = iter(saved_ids)
        for group in self.param_groups:
            for p in group["params"]:
                for key, value in saved_state.get(next(ids), {}).items():
                    self.state[p][key] = _loaded_entry(key, value, p, group)

    # ----------------------------------------------------------------- step

    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss.

        ``torch.compile`` leaves it eager: a step is a per-matrix schedule (refreshes, SVDs, host-side
        step counts) whose heavy work is matrix products and fused kernels already, and tracing it
        specialises on every parameter (one recompile per tensor, then dynamo gives up)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._forget_placeholder_state()
        if self._allocating_only():
            self._allocate_state()
            return loss
        self._step_groups()
        return loss

    def _step_groups(self) -> None:
        first_index = 0  # position of the group's first parameter in the optimizer: seeds use it
        for group in self.param_groups:
            if is_projected(group) and group["proj_method"] == "blocks":
                self._block_step(group, first_index)
            else:
                stepped = [self._step_param(group, i, first_index + i, p)
                           for i, p in enumerate(group["params"]) if p.grad is not None]
                if fused := [matrix for matrix in stepped if matrix is not None]:
                    _fused_updates(group, fused)
            first_index += len(group["params"])

    def _allocating_only(self) -> bool:
        """Whether this is torch.distributed.checkpoint's state initialisation (``_init_optim_state``,
        called by ``get_optimizer_state_dict`` / ``set_optimizer_state_dict`` before anything has
        stepped): the first step, every lr 0, every gradient zero."""
        if self.state or any(float(group["lr"]) != 0.0 for group in self.param_groups):
            return False
        grads = [local(p.grad) for group in self.param_groups for p in group["params"] if p.grad is not None]
        return bool(grads) and not any(bool(grad.any()) for grad in grads)

    def _allocate_state(self) -> None:
        """Create every state entry a first step creates (so that DCP can load a checkpoint into
        them) and leave the optimizer as if it had not stepped: weights, group keys (block cursors)
        untouched, and each entry marked by ``step = -1`` so that the next real step starts afresh
        unless a checkpoint was loaded into it (:meth:`_forget_placeholder_state`). Group keys a
        first step adds (FRUGAL's ``block_cursor``) stay, set to None, as a fresh optimizer reads them."""
        saved = [{k: v for k, v in group.items() if k != "params"} for group in self.param_groups]
        for group in self.param_groups:
            group["weight_decay"] = 0.0  # lr is 0 and the gradients are zero: nothing else moves a weight
        try:
            self._step_groups()
        finally:
            for group, keys in zip(self.param_groups, saved):
                for key in set(group) - set(keys) - {"params"}:
                    group[key] = None  # kept for DCP to load into (block_cursor); None is its fresh value
                group.update(keys)
        for state in self.state.values():
            state["step"] = torch.tensor(PLACEHOLDER_STEP)
        self._placeholders = True

    def _forget_placeholder_state(self) -> None:
        """Drop the state :meth:`_allocate_state` made, where no checkpoint was loaded into it."""
        if not getattr(self, "_placeholders", False):
            return
        for state in self.state.values():
            step = state.get("step")
            if torch.is_tensor(step) and float(step) == PLACEHOLDER_STEP:
                state.clear()
        self._placeholders = False

    @torch.compiler.disable
    @torch.no_grad()
    def step_param(self, p: Tensor) -> None:
        """Update ``p`` alone from its gradient, exactly as :meth:`step` updates it (for layer-wise
        updates: :class:`lrtrain.optim.LayerwiseUpdates`). FRUGAL's block mode chooses tensors per
        group and has no per-parameter step."""
        self._forget_placeholder_state()
        group, i, index = self._locate(p)
        if is_projected(group) and group["proj_method"] == "blocks":
            raise ValueError("proj_method='blocks' reselects whole tensors per group; it has no per-parameter step")
        if p.grad is not None and (matrix := self._step_param(group, i, index, p)) is not None:
            _fused_updates(group, [matrix])

    @torch.compiler.disable
    @torch.no_grad()
    def accumulate_low_rank_(self, p: Tensor) -> bool:
        """Fold ``p``'s gradient into its projected accumulator (``state["low_rank_grad"]``, added to
        the next step's R) and free the full gradient; True if done. Only where the update needs
        nothing but R (the GaLore rule, ``residual="none"``), the basis exists and the next step is
        not a refresh (a refresh needs the whole accumulated gradient), on an unsplit parameter."""
        self._forget_placeholder_state()
        group, i, index = self._locate(p)
        state = self.state.get(p, {})
        if (p.grad is None or not is_projected(group) or group["proj_method"] == "blocks"
                or group["residual"] != "none" or isinstance(p, DTensor) or refresh_due(group, state)):
            return False
        plan, operand = self._plan(group, i, index, p), operand_dtype(group, p)
        low = project(p.grad, load_basis(state, group, plan, p, operand), plan.side).to(compute_dtype(p.dtype))
        if group["maximize"]:
            low.neg_()
        pending = state.get("low_rank_grad")
        state["low_rank_grad"] = low if pending is None else pending.add_(low)
        p.grad = None
        return True

    def _locate(self, p: Tensor) -> tuple[dict, int, int]:
        """(group, position in the group, position in the optimizer) of a parameter."""
        key = id(p)
        if key not in self._positions:
            self._positions.clear()
            index = 0
            for g, group in enumerate(self.param_groups):
                for i, q in enumerate(group["params"]):
                    self._positions[id(q)] = (g, i, index + i)
                index += len(group["params"])
            if key not in self._positions:
                raise ValueError("the parameter is not in this optimizer")
        g, i, index = self._positions[key]
        return self.param_groups[g], i, index

    def _step_param(self, group: dict, i: int, index: int, p: Tensor) -> FusedMatrix | None:
        """Step ``p`` on the torch path, or return the matrix for the fused kernels to step with its group's."""
        if group["inner"] == "adafactor":
            self._adafactor_param(group, i, index, p)
        elif is_projected(group):
            return self._subspace_param(group, i, index, p)
        else:
            self._dense_param(group, i, p)
        return None

    def _grad(self, group: dict, index: int, p: Tensor) -> Tensor:
        grad = p.grad
        if grad.is_sparse:
            raise RuntimeError(
                f"{self._param_name(group, index)} has a sparse gradient, which {type(self).__name__} does not "
                "support: build the module with sparse=False, or give it torch.optim.SparseAdam"
            )
        return torch.neg(grad) if group["maximize"] else grad

    def _dense_param(self, group: dict, i: int, p: Tensor) -> None:
        grad, state = self._grad(group, i, p), self.state[p]
        if not state:
            init_adamw_state(state, p, group["state_bits"], storage_dtype(group["moment_dtype"], p.dtype))
        adamw_(p, grad, state, lr=float(group["lr"]), adam=AdamSettings.of(group))

    def _plan(self, group: dict, i: int, index: int, p: Tensor) -> MatrixPlan:
        """What this step knows of subspace matrix ``p`` (``i``: its position in ``group``; ``index``: in
        the optimizer)."""
        side, rank = param_layout(tuple(p.shape), group)
        return MatrixPlan(self._param_name(group, i), i, index, side, rank, matrix_shards(p))

    def _adafactor_param(self, group: dict, i: int, index: int, p: Tensor) -> None:
        """GaLore's Adafactor (``inner="adafactor"``): Adafactor on R, or on G in a plain group, then
        W ← W·(1 - lr_t·wd) - scale·back(U) (plain: W - U), with U the clipped, lr_t-scaled update."""
        grad, state = self._grad(group, i, p).to(compute_dtype(p.dtype)), self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
        projected = is_projected(group)
        if projected:
            plan = self._plan(group, i, index, p)
            side = plan.side
            if refresh_due(group, state) and not refresh_basis(group, plan, p, grad, state):
                return
            basis = load_basis(state, group, plan, p, grad.dtype)
            low = project(grad, basis, side)
            if "low_rank_grad" in state:
                low.add_(state.pop("low_rank_grad"))
        else:
            low = grad
        if group["betas"][0] > 0.0 and not group["first_moment"]:
            raise ValueError(
                f"{type(self).__name__} was built without a first moment (beta1=None), but betas[0] is now "
                f"{group['betas'][0]}: a scheduler cycles momentum (OneCycleLR or CyclicLR with "
                "cycle_momentum=True?). Pass cycle_momentum=False, or build it with beta1=... to keep one"
            )
        if "exp_avg_sq_row" not in state and "exp_avg_sq" not in state:
            init_adafactor_state(state, low, use_first_moment=group["first_moment"])
        step = count_step(state)
        work = p if p.dtype == grad.dtype else p.to(grad.dtype)
        adafactor = AdafactorSettings.of(group)
        lr = adafactor_lr(step, rms(work), adafactor=adafactor)
        update = adafactor_update(low, state, step, lr, adafactor=adafactor)
        if group["weight_decay"]:
            work.mul_(1.0 - lr * group["weight_decay"])
        if projected:
            add_project_back_(work, update, basis, side, alpha=-group["scale"])
        else:
            work.sub_(update)
        if work is not p:
            p.copy_(work)

    def _subspace_param(self, group: dict, i: int, index: int, p: Tensor) -> FusedMatrix | None:
        lr = float(group["lr"])
        plan = self._plan(group, i, index, p)
        shards = plan.shards
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
        refresh = refresh_due(group, state)
        fused = self._use_kernels(group, p, state, plan.rank)
        grad = shards.view(self._grad(group, i, p))  # this rank's rows (m_local, n)
        dtype = compute_dtype(p.dtype)
        if refresh and not refresh_basis(group, plan, p, grad.to(dtype), state):
            return
        side = shards.view_side(plan.side)
        operand = dtype if fused else operand_dtype(group, p)  # the kernels read a half gradient as it is
        basis = shards.basis_view(load_basis(state, group, plan, p, operand), side, operand)
        step = count_step(state)
        if fused:
            return FusedMatrix(p, grad, basis, state, side, step)
        adam = AdamSettings.of(group)
        grad = grad.to(operand)
        low = project(grad, basis, side).to(dtype)
        if "low_rank_grad" in state:  # earlier micro-batches, folded in by accumulate_low_rank_
            low.add_(state.pop("low_rank_grad"))
        if side == "left":
            shards.all_reduce_(low)  # R = Σ over the ranks' rows of Pᵀ G
        # GaLore's rule never reads R again, so the denominator (and N) can take its memory.
        reuse = None if RESIDUAL_RULES[group["residual"]].reads_low else low
        with float_moments(state, shards.view, dtype) as (exp_avg, exp_avg_sq):
            denom = adam_denominator_(exp_avg, exp_avg_sq, low, step, adam=adam, out=reuse)
            direction = torch.div(exp_avg, denom, out=denom)
        weight = shards.view(p)
        work = weight if weight.dtype == operand else weight.to(operand)
        self._write_update(group, work, SubspaceStep(grad, basis, side, low, direction, lr,
                                                      adam_step_size(lr, step, adam=adam), shards.all_reduce_), state)
        if work is not weight:
            weight.copy_(work)

    @staticmethod
    def _use_kernels(group: dict, p: Tensor, state: dict, rank: int) -> bool:
        """The fused Triton step where it applies (a whole, not sharded, float32/half matrix with 32-bit
        moments, a float basis, no low-rank accumulation): with ``fused=None`` on a GPU where
        :data:`~lrtrain.kernels.dispatch.KERNELS_WIN` has them faster at this rank and a probe launch
        worked; with True also on CPU tensors, which only the Triton interpreter runs."""
        choice = group["fused"]
        if choice is False or not kernels_cover(group):
            return False
        if isinstance(p, DTensor) or "low_rank_grad" in state or p.dtype == torch.float64:
            return False
        if choice is None:
            return (p.device.type == "cuda" and kernels_available() and kernels_win(p.device, p.dtype, rank)
                    and kernels_work(p.device))
        if p.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("fused=True with CPU tensors needs TRITON_INTERPRET=1 (Triton's interpreter, "
                               "set before Triton is imported); on a CPU use fused=None or False")
        return True

    @staticmethod
    def _write_update(group: dict, weight: Tensor, step: SubspaceStep, state: dict) -> None:
        """W ← W - s·scale·back(N) - residual term, with decoupled decay before or after. Half-precision
        weights, updated in place, take the decay as the rule's ``keep`` (after·(before·W - u) =
        before·after·W - after·u) and so round once, not once per factor."""
        before, after = decoupled_decay(step.lr, adam=AdamSettings.of(group))
        if weight.dtype in (torch.float16, torch.bfloat16) and before * after != 1.0:
            folded = dataclasses.replace(step, keep=before * after, step_size=step.step_size * after,
                                         lr=step.lr * after)
            RESIDUAL_RULES[group["residual"]].update_(weight, folded, group, state)
            return
        if before != 1.0:
            weight.mul_(before)
        RESIDUAL_RULES[group["residual"]].update_(weight, step, group, state)
        if after != 1.0:
            weight.mul_(after)


    # ----------------------------------------------------------------- FRUGAL blocks

    def _block_step(self, group: dict, first_index: int) -> None:
        first_state = self.state[group["params"][0]]
        if "step" not in first_state or int(first_state["step"]) % group["update_proj_gap"] == 0:
            select_blocks(group, [self.state[p] for p in group["params"]], first_index)
        lr, scale = float(group["lr"]), group["scale"]
        adam = AdamSettings.of(group)
        before, after = decoupled_decay(lr, adam=adam)
        for i, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            grad, state = self._grad(group, i, p), self.state[p]
            if bool(state["active"]):
                adamw_(p, grad, state, lr=lr, adam=adam, lr_scale=scale)
                continue
            state["step"].add_(1.0)
            if group["residual"] == "none" and before * after == 1.0:
                continue
            weight = local(p)
            work = weight if weight.dtype == compute_dtype(p.dtype) else weight.to(compute_dtype(p.dtype))
            if before != 1.0:
                work.mul_(before)
            if group["residual"] != "none":
                state_free_update_(work, local(grad).to(work.dtype), None, None, side="right",
                                   rule=group["residual"], lr=state_free_lr(lr, group))
            if after != 1.0:
                work.mul_(after)
            if work is not weight:
                weight.copy_(work)


def operand_dtype(group: dict, p: Tensor) -> torch.dtype:
    """The dtype the torch path multiplies G, W and the basis in: a half-precision weight's own type
    (products accumulate in float32, as galore-torch's) where the group's residual rule allows it,
    else the compute dtype (float32 copies)."""
    return p.dtype if RESIDUAL_RULES[group["residual"]].half_operands else compute_dtype(p.dtype)


def count_step(state: dict) -> float:
    """Advance a subspace matrix's step count (and its staggered-refresh countdown); the new step."""
    if "refresh_in" in state:
        state["refresh_in"].sub_(1)
    return float(state["step"].add_(1.0))


def refresh_due(group: dict, state: dict) -> bool:
    """Whether this step refreshes the subspace: the first step; then every ``update_proj_gap``
    steps of ``state["step"]`` (which restarts at a "reset" refresh), or, with ``stagger_refresh``,
    when the countdown ``state["refresh_in"]`` reaches 0."""
    if not has_basis(state):
        return True
    if "refresh_in" in state:
        return int(state["refresh_in"]) <= 0
    return int(state["step"]) % group["update_proj_gap"] == 0


@dataclasses.dataclass(frozen=True)
class FusedMatrix:
    """A matrix whose step the fused kernels take (``weight`` in place, ``grad`` G, the ``basis`` and ``side``
    it projects, its ``state`` and Adam ``step``), held until its group's matrices are all known."""

    weight: Tensor
    grad: Tensor
    basis: Tensor
    state: dict
    side: str
    step: float

    def bucket(self) -> tuple:
        """Matrices with equal keys (layouts, dtypes, side, step) share the kernels' launches."""
        tensors = (self.weight, self.grad, self.basis, self.state["exp_avg"], self.state["exp_avg_sq"])
        return (self.side, self.step, *((tuple(t.shape), t.stride(), t.dtype) for t in tensors))


def _fused_updates(group: dict, matrices: list[FusedMatrix]) -> None:
    """Steps 2-5 of the module docstring in Triton kernels (:mod:`lrtrain.kernels.subspace_adam`), one launch
    of each kernel per bucket of equal matrices (:meth:`FusedMatrix.bucket`): the projection with the moment
    update, the rule's coefficients (torch, per matrix), then the back-projection with the residual rule and
    the decay, written into each weight in its own dtype."""
    from ..kernels.subspace_adam import project_adam_grouped, project_back_update_grouped_

    adam, rule, lr = AdamSettings.of(group), RESIDUAL_RULES[group["residual"]], float(group["lr"])
    # W ← keep·W - alpha·(...): the decay's factor, which also scales the update when it comes after it
    before, after = decoupled_decay(lr, adam=adam)
    buckets: dict[tuple, list[FusedMatrix]] = {}
    for matrix in matrices:
        buckets.setdefault(matrix.bucket(), []).append(matrix)
    for bucket in buckets.values():
        side, step, grads = bucket[0].side, bucket[0].step, [m.grad for m in bucket]
        bases, states = [m.basis for m in bucket], [m.state for m in bucket]
        grad_sqs = ([torch.empty(g.shape[0 if side == "right" else 1], dtype=torch.float32, device=g.device)
                     for g in grads] if rule.reads_norms else None)
        directions, lows = project_adam_grouped(
            grads, bases, side, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
            beta1=adam.beta1, beta2=adam.beta2, eps=adam.eps, denom_scale=1.0 / second_moment_divisor(step, adam=adam),
            return_low=rule.reads_low, grad_sq_outs=grad_sqs)
        step_size = adam_step_size(lr, step, adam=adam)
        args = [rule.kernel(SubspaceStep(g, q, side, None if lows is None else lows[k], directions[k], lr, step_size,
                                         grad_sq=None if grad_sqs is None else grad_sqs[k]), group, state)
                for k, (g, q, state) in enumerate(zip(grads, bases, states))]
        project_back_update_grouped_(
            [m.weight for m in bucket], [a["direction"] for a in args], bases, side, keep=before * after,
            alpha=args[0]["alpha"] * after, residual=args[0]["residual"], gamma=args[0]["gamma"] * after,
            grads=grads, coefs=[a.get("coef") for a in args], lows=[a.get("low") for a in args])


def _loaded_entry(key: str, value: Any, p: Tensor, group: dict) -> Any:
    """A saved state entry as this engine stores it for ``p`` in ``group`` (see ``SubspaceAdamW.load_state_dict``)."""
    if key == "step":
        return torch.tensor(float(value), dtype=torch.float32)
    if not torch.is_tensor(value):
        return value
    device = "cpu" if key in _ON_CPU else p.device
    if key in _FLOAT32:
        return value.to(device=device, dtype=torch.float32)
    if not value.is_floating_point():
        return value.to(device=device)
    return value.to(device=device, dtype=_stored_dtype(key, p, group))


def _stored_dtype(key: str, p: Tensor, group: dict) -> torch.dtype:
    """The dtype in which a step stores floating state entry ``key`` of ``p`` in ``group``: Adam's 32-bit
    moments and a float basis as ``moment_dtype`` / ``basis_dtype`` say; the rest of a subspace, Adafactor
    or 8-bit group's state in the compute dtype; a plain group's as the parameter (as torch.optim)."""
    if key in ("exp_avg", "exp_avg_sq") and group["inner"] == "adam" and group["state_bits"] == 32:
        return storage_dtype(group["moment_dtype"], p.dtype)
    if key == "basis" and group["basis_dtype"] not in QUANTIZED_BASES:
        return storage_dtype(group["basis_dtype"], p.dtype)
    subspace = is_projected(group) and group["proj_method"] != "blocks"
    if subspace or group["inner"] == "adafactor" or group["state_bits"] == 8:
        return compute_dtype(p.dtype)
    return p.dtype
