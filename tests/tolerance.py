"""Test bounds with a measured margin.

A test that compares numbers which depend on rounding (one implementation against another, bf16
against float32, 8-bit against 32-bit states, a trajectory's loss) checks them through the
``tolerance`` fixture, which asserts the bound and records how much of it the observation used.
``scripts/audit_tolerances.py`` runs those tests over several seeds (``LRTRAIN_TEST_SEED``, added to
every seed the tests set) and thread counts (``OMP_NUM_THREADS``) and reports, per check, the
largest share of its bound ever used: each bound must stay at least 2x away from what was
observed (``docs/tolerances.md`` holds the last audit)."""

from __future__ import annotations

import json
import os
import sys

import torch

#: Added to every seed an audited test sets; 0 in ordinary runs, so they stay reproducible.
SEED = int(os.environ.get("LRTRAIN_TEST_SEED", "0"))
LOG = os.environ.get("LRTRAIN_TOLERANCE_LOG")


class Tolerance:
    """Bounds of one test (``name`` is its node id); each call names what it checks."""

    def __init__(self, name: str):
        self.name = name

    def _record(self, what: str, used: float, bound: str) -> None:
        if LOG:
            with open(LOG, "a") as handle:
                handle.write(json.dumps({"check": f"{self.name}::{what}", "used": used, "bound": bound,
                                         "seed": SEED, "threads": torch.get_num_threads()}) + "\n")

    def close(self, what: str, actual: torch.Tensor, expected: torch.Tensor, *, rtol: float, atol: float) -> None:
        """``torch.testing.assert_close``; records max |a - e| / (atol + rtol·|e|), the share of the bound used."""
        actual, expected = actual.detach(), expected.detach()
        self._record(what, used_share(actual, expected, rtol, atol), f"rtol={rtol:g}, atol={atol:g}")
        _assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")

    def below(self, what: str, observed: float, bound: float) -> None:
        """``observed <= bound``; records observed / bound."""
        self._record(what, observed / bound, f"<= {bound:g}")
        assert observed <= bound, f"{what}: {observed:g} exceeds its bound {bound:g}"

    def above(self, what: str, observed: float, floor: float) -> None:
        """``observed >= floor`` (floor > 0); records floor / observed."""
        self._record(what, floor / observed if observed > 0 else float("inf"), f">= {floor:g}")
        assert observed >= floor, f"{what}: {observed:g} is below its floor {floor:g}"


_assert_close = torch.testing.assert_close
#: torch.testing.assert_close's defaults by dtype, for calls that give no rtol/atol.
_DEFAULTS = {torch.float16: (1e-3, 1e-5), torch.bfloat16: (1.6e-2, 1e-5), torch.float32: (1.3e-6, 1e-5),
             torch.float64: (1e-7, 1e-7)}


def used_share(actual, expected, rtol: float, atol: float) -> float:
    """max |a - e| / (atol + rtol·|e|): 1.0 is the edge of the bound (0 or inf for exact comparisons)."""
    diff = (actual.double() - expected.double()).abs()
    if diff.numel() == 0:
        return 0.0
    allowed = atol + rtol * expected.double().abs()
    share = torch.where(diff == 0, torch.zeros_like(diff), diff / allowed)
    return float(share.max())


def recording_assert_close(test: str):
    """``torch.testing.assert_close`` that also records, per calling line, the share of its bound used."""

    def assert_close(actual, expected, *args, **kwargs):
        if torch.is_tensor(actual) and torch.is_tensor(expected) and actual.is_floating_point() and not args:
            rtol, atol = kwargs.get("rtol"), kwargs.get("atol")
            if rtol is None or atol is None:
                rtol, atol = _DEFAULTS.get(expected.dtype, (0.0, 0.0))
            caller = sys._getframe(1)
            where = f"{os.path.basename(caller.f_code.co_filename)}:{caller.f_lineno}"
            Tolerance(test)._record(where, used_share(actual.detach(), expected.detach(), rtol, atol),
                                    f"rtol={rtol:g}, atol={atol:g}")
        return _assert_close(actual, expected, *args, **kwargs)

    return assert_close
