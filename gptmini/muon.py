"""Muon: momentum, then the nearest (semi-)orthogonal matrix by a few Newton-Schulz iterations, for the 2-D weight
matrices inside the blocks; `MuonWithAdamW` pairs it with AdamW for everything else behind one optimizer interface.
Registered as `optim.name=muon` in gptmini.optim."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import torch
from torch import Tensor

from gptmini.config import NS_DTYPES, check_choice
from gptmini.device import native_bf16
from gptmini.step_skip import skips_on_device, step_unless

# Coefficients (a, b, c) of the quintic Newton-Schulz step x <- a·x + b·(x xᵀ)x + c·(x xᵀ)²x, chosen (by Keller
# Jordan, for Muon) to push every singular value in (0, 1] quickly into a band around 1, rather than to converge
# exactly: after 5 steps they lie roughly in [0.7, 1.2], which is all an update direction needs.
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def ns_dtype_choice(name: str, device: torch.device) -> tuple[torch.dtype, str]:
    """The Newton-Schulz dtype for `optim.muon.ns_dtype=name` on `device`, and why, in words.

    `auto` is bfloat16 where the hardware computes bf16 matmuls natively (bf16 GPUs; CPUs with AVX512-BF16,
    AMX-BF16 or Arm BF16), else float32: on other CPUs bf16 is emulated and several times slower than float32.
    """
    check_choice("optim.muon.ns_dtype", name, NS_DTYPES)  # OptimConfig's own check, for direct callers
    native, hardware = native_bf16(device)
    if name == "auto":
        return (torch.bfloat16 if native else torch.float32), f"auto: {hardware}"
    why = f"set by optim.muon.ns_dtype={name}"
    if name == "bfloat16" and not native:
        why += f"; {hardware}, so float32 or auto may be faster"
    return getattr(torch, name), why


def ns_dtype(name: str, device: torch.device) -> torch.dtype:
    """The Newton-Schulz dtype for `optim.muon.ns_dtype=name` on `device` (see `ns_dtype_choice`)."""
    return ns_dtype_choice(name, device)[0]


def ns_dtype_note(name: str, device: torch.device) -> str:
    """One line for the start-up log, e.g. "muon Newton-Schulz dtype: float32 (auto: CPU AMD EPYC (AVX2) has no
    native bf16)"."""
    dtype, why = ns_dtype_choice(name, device)
    return f"muon Newton-Schulz dtype: {str(dtype).removeprefix('torch.')} ({why})"


def newton_schulz(g: Tensor, steps: int = 5, dtype: torch.dtype | None = None, eps: float = 1e-7) -> Tensor:
    """Approximately orthogonalise each matrix of g (..., m, n): U·f(S)·Vᵀ with f(s) ≈ 1, where g = U·S·Vᵀ.

    Scaling by the Frobenius norm puts every singular value in (0, 1]; each odd-polynomial step then maps the
    singular values through p(s) = a·s + b·s³ + c·s⁵ while keeping the singular vectors. The iteration
    tolerates low precision (bfloat16: about 3 significant digits), since only the direction matters.
    """
    a, b, c = NS_COEFFS
    x = g.to(dtype or g.dtype).reshape(-1, *g.shape[-2:])  # (N, m, n)
    wide = x.size(-2) <= x.size(-1)
    if not wide:
        x = x.mT  # work with the smaller Gram matrix x·xᵀ
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        gram = x @ x.mT  # (N, m, m)
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b·gram + c·gram²
        x = torch.baddbmm(x, poly, x, beta=a)  # a·x + poly·x
    if not wide:
        x = x.mT
    return x.reshape(g.shape).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Momentum, orthogonalised: for each 2-D parameter W with gradient G,

        M <- μ·M + G;   U = G + μ·M (Nesterov) or M;   W <- W·(1 - lr·wd) - lr·√max(1, rows/cols)·NS(U)

    A group may set `split` (row counts): the rows of each of its matrices are then separate matrices (the
    fused query/key/value projection is three). Matrices of one shape are orthogonalised together, batched.
    """

    def __init__(
        self,
        params: Any,
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        weight_decay: float = 0.0,
        ns_dtype: torch.dtype | None = None,
    ) -> None:
        if lr < 0 or not 0.0 <= momentum < 1.0 or ns_steps < 1:
            raise ValueError(
                f"Muon needs lr >= 0, momentum in [0, 1) and ns_steps >= 1; got lr={lr}, momentum={momentum}, "
                f"ns_steps={ns_steps}"
            )
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, weight_decay=weight_decay,
                        split=None)
        super().__init__(params, defaults)
        self.ns_dtype = ns_dtype  # None: the parameters' own dtype
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"Muon updates 2-D matrices only; got a parameter of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure: Any = None, found_inf: Tensor | None = None) -> Any:
        """One update; where `found_inf` (a 0-dim device tensor) is non-zero, parameters and momentum stay exactly
        as they were. That is decided on the device, so the host never waits for the step to finish."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        keep = None if found_inf is None else found_inf == 0  # 0-dim bool on the device
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            mu, lr = group["momentum"], group["lr"]
            grads = [p.grad for p in params]
            if keep is not None:  # a skipped step: zero gradients, momentum kept (x1), learning rate 0
                grads = [torch.where(keep, g, 0.0) for g in grads]  # non-finite gradients never reach the momentum
                mu_keep, lr = torch.where(keep, mu, 1.0), torch.where(keep, lr, 0.0)
            bufs = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                bufs.append(state["momentum_buffer"])
            torch._foreach_mul_(bufs, mu if keep is None else mu_keep)
            torch._foreach_add_(bufs, grads)
            updates = torch._foreach_add(grads, bufs, alpha=mu) if group["nesterov"] else [b.clone() for b in bufs]
            self._orthogonalise(updates, group["split"], group["ns_steps"], self.ns_dtype)
            if group["weight_decay"] != 0:
                decay = 1.0 - group["lr"] * group["weight_decay"]  # in double, rounded once, as a plain step does
                torch._foreach_mul_(params, decay if keep is None else torch.where(keep, decay, 1.0))
            torch._foreach_mul_(updates, -lr)
            torch._foreach_add_(params, updates)
        return loss

    @staticmethod
    def _orthogonalise(updates: list[Tensor], split: list[int] | None, steps: int, dtype: torch.dtype | None) -> None:
        """Replace each (piece of an) update in place by its scaled Newton-Schulz orthogonalisation."""
        # Group the pieces by shape, tall ones transposed (the orthogonalisation commutes with transposing), so
        # that one batched iteration serves e.g. the MLP's (4C, C) and (C, 4C) matrices together.
        by_shape: dict[tuple[int, int], list[Tensor]] = defaultdict(list)
        for u in updates:
            for piece in (u.split(list(split), dim=0) if split else (u,)):  # views into u
                by_shape[tuple(sorted(piece.shape))].append(piece)
        for pieces in by_shape.values():
            wide = [p if p.size(0) <= p.size(1) else p.mT for p in pieces]  # views
            ortho = newton_schulz(torch.stack(wide), steps, dtype)  # (N, small, large)
            torch._foreach_copy_(wide, list(ortho.unbind()))  # one launch per shape, not one per piece
            tall = [p for p in pieces if p.size(0) > p.size(1)]  # tall pieces are scaled up by sqrt(rows/cols)
            if tall:
                torch._foreach_mul_(tall, math.sqrt(tall[0].size(0) / tall[0].size(1)))


class MuonWithAdamW:
    """Muon for the hidden matrices and AdamW for the rest, behind one optimizer interface.

    `param_groups` lists AdamW's groups, then Muon's; `state_dict()` holds both optimizers' states.
    """

    def __init__(self, adamw: torch.optim.AdamW, muon: Muon) -> None:
        self.adamw, self.muon = adamw, muon
        self.optimizers = (adamw, muon)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.adamw.param_groups + self.muon.param_groups

    @property
    def state(self) -> dict[Tensor, Any]:
        return {**self.adamw.state, **self.muon.state}

    def step(self, closure: Any = None) -> None:
        if closure is not None:
            raise ValueError("MuonWithAdamW.step takes no closure")
        for opt in self.optimizers:
            opt.step()

    @property
    def skips_on_device(self) -> bool:
        """The device-side skip protocol (see `step_unless`): Muon masks its own update, AdamW needs fused."""
        return skips_on_device(self.adamw)

    def step_unless(self, bad: Tensor) -> None:
        """`step_unless(self, bad)` for both optimizers."""
        step_unless(self.adamw, bad)
        self.muon.step(found_inf=bad.float())

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"adamw": self.adamw.state_dict(), "muon": self.muon.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"adamw", "muon"}:
            raise ValueError("the checkpoint's optimizer state is not Muon+AdamW (optim.name=muon); resume with the "
                             "optim.name it was trained with")
        self.adamw.load_state_dict(state["adamw"])
        self.muon.load_state_dict(state["muon"])
