"""Memory-efficient weighted multi-token-prediction loss (docs/design.md).

    L = (1/H) * sum_k [ sum_{(b,t) valid for k} w[b, t+k+1] * CE_k(b, t) ] / #{(b,t) valid for k}

(b, t) is valid for head k when t+k+1 < S and loss_mask[b, t+k+1]; a head with no
valid position adds 0. With all weights 1 this is the mean over heads of each
head's mean cross-entropy.

Why not `model(input_ids)` and a cross-entropy: that holds H heads' logits
`(B, S, H, V)` plus their softmax and gradients, H times a next-token model's
peak. Here the trunk runs once; then, one head at a time, the head block runs on
the trunk's detached output, the unembedding + cross-entropy runs in chunks of
rows (only the valid ones: prompt and padding rows are never unembedded), and
its gradient is pushed back through the head block into the detached trunk
output before the next head starts. Peak memory is one head block's activations
plus one chunk of logits; no head's full logits ever exist.

To stay an ordinary differentiable scalar (`loss.backward()`, DeepSpeed's
`engine.backward(loss)` with its loss scaling and gradient hooks), the head pass
is a `torch.autograd.Function` whose inputs are the trunk output and the head
parameters (head blocks, shared norm, unembedding): its forward computes the
loss and, with `torch.autograd.grad`, the gradients w.r.t. those inputs; its
backward hands them out scaled by the incoming gradient, and autograd continues
through the trunk once. Cost: the head parameters' gradients are held from
forward to backward (one extra copy of the head parameters). Not compatible with
ZeRO stage 3, which partitions parameters outside module forwards.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from wmtp.core.model import MTPModel

# Logits elements per chunk of the unembedding (fp32: 16 MiB); bounds peak memory
# independently of batch and sequence size while keeping the matmuls large.
CHUNK_ELEMENTS = 2**22

WeightFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class LossOutput:
    loss: torch.Tensor  # () differentiable weighted MTP loss
    head_ce: torch.Tensor  # (n_heads,) detached unweighted mean CE per trained head (0 for a head with no valid token)
    weights: torch.Tensor  # (B, S) detached weights used, 0 at invalid targets
    ce_head0: torch.Tensor  # (B, S) detached head-0 CE per target token, 0 where invalid


def weighted_mtp_loss(
    model: MTPModel,
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    weights: torch.Tensor | WeightFn,
    attention_mask: torch.Tensor | None = None,
    n_heads: int | None = None,
) -> torch.Tensor:
    """The weighted MTP loss as a differentiable scalar; see `weighted_mtp_loss_details`."""
    return weighted_mtp_loss_details(model, input_ids, loss_mask, weights, attention_mask, n_heads).loss


def weighted_mtp_loss_details(
    model: MTPModel,
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    weights: torch.Tensor | WeightFn,
    attention_mask: torch.Tensor | None = None,
    n_heads: int | None = None,
) -> LossOutput:
    """Weighted MTP loss plus the per-head CE, the weights and head 0's per-token CE.

    `input_ids`, `loss_mask` (1 on valid target tokens), `attention_mask` (2-D
    padding mask, optional) are `(B, S)`. Targets where `attention_mask` is 0 are
    never counted even if `loss_mask` says otherwise. `weights` is a `(B, S)`
    tensor indexed by target token (detached here: no gradient flows through it)
    or a callable `weights(ce_head0 (B, S), trunk_hidden (B, S, D)) -> (B, S)`,
    called once with detached inputs after head 0's logits are computed; that is
    how Rho-1 gets the current model's CE and the critic its value-head input
    without a second forward. Head k at position t uses w[t+k+1].

    `n_heads` (default all H) restricts the loss to heads 0..n_heads-1 (the mean is
    over those): `ntp` trains head 0 alone (its `heads` in `wmtp.config.registry`).
    `model` is the bare `MTPModel` (pass `engine.module` under DeepSpeed).
    Under `torch.no_grad()` only the value is computed.
    """
    n_heads = model.n_heads if n_heads is None else n_heads
    if not 1 <= n_heads <= model.n_heads:
        raise ValueError(f"n_heads = {n_heads}: the model has heads 0..{model.n_heads - 1}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (B, S), got shape {tuple(input_ids.shape)}")
    for name, tensor in (("loss_mask", loss_mask), ("attention_mask", attention_mask)):
        if tensor is not None and tensor.shape != input_ids.shape:
            raise ValueError(f"{name} {tuple(tensor.shape)} must match input_ids {tuple(input_ids.shape)}")
    if not callable(weights) and weights.shape != input_ids.shape:
        raise ValueError(f"weights {tuple(weights.shape)} must match input_ids {tuple(input_ids.shape)}")
    valid = loss_mask.bool()  # (B, S) by target token
    if attention_mask is not None:
        valid = valid & attention_mask.bool()

    params = [p for p in _head_parameters(model) if p.requires_grad]
    if any(hasattr(p, "ds_status") for p in params):
        raise ValueError("weighted_mtp_loss does not support DeepSpeed ZeRO stage 3 (partitioned "
                         "parameters); use ZeRO stage 0, 1 or 2")
    hidden, context = model.trunk(input_ids, attention_mask)  # (B, S, D)
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or bool(params))
    heads = _HeadPass(model, context, input_ids, valid, weights, n_heads)
    if needs_grad:
        loss = _HeadsLoss.apply(heads, hidden, *params)
    else:
        with torch.no_grad():
            loss = heads.run(hidden, [], with_grads=False)[0]
    return LossOutput(loss=loss, head_ce=heads.head_ce, weights=heads.weights, ce_head0=heads.ce_head0)


def _head_parameters(model: MTPModel) -> list[torch.nn.Parameter]:
    """Every parameter the head pass uses: head blocks, shared norm, unembedding."""
    return [*model.heads.parameters(), *model.norm.parameters(), *model.output.parameters()]


class _HeadsLoss(torch.autograd.Function):
    """Loss of all heads from the trunk output; gradients computed in forward."""

    @staticmethod
    def forward(ctx, heads: _HeadPass, hidden: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        loss, grads = heads.run(hidden, list(params), with_grads=True)
        ctx.grads = grads
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):
        grads, ctx.grads = ctx.grads, None  # release the held gradients with the graph
        return (None, *(None if g is None else g.mul_(grad_loss) for g in grads))


class _HeadPass:
    """One pass over the heads for a fixed trunk output: loss value, statistics and
    (optionally) gradients w.r.t. the trunk output and the given head parameters."""

    def __init__(
        self,
        model: MTPModel,
        context: dict,
        input_ids: torch.Tensor,  # (B, S)
        valid: torch.Tensor,  # (B, S) bool, by target token
        weights: torch.Tensor | WeightFn,
        n_heads: int,
    ) -> None:
        self.model, self.context, self.input_ids, self.valid = model, context, input_ids, valid
        self.weight_source, self.n_heads = weights, n_heads
        batch, seq = input_ids.shape
        self.head_ce = torch.zeros(n_heads, device=input_ids.device)
        self.ce_head0 = torch.zeros(batch, seq, device=input_ids.device)
        self.weights = torch.zeros(batch, seq, device=input_ids.device)

    def run(
        self, hidden: torch.Tensor, params: list[torch.Tensor], with_grads: bool
    ) -> tuple[torch.Tensor, list[torch.Tensor | None] | None]:
        """Returns the loss (float32 scalar, no graph) and, if `with_grads`, the
        gradients of the loss w.r.t. `[hidden, *params]` (None for hidden when it
        needs none)."""
        model = self.model
        unembedding = model.output.weight  # (V, D)
        x = hidden.detach().requires_grad_(with_grads and hidden.requires_grad)  # (B, S, D)
        slot = {id(p): i for i, p in enumerate(params)}
        param_grads = [torch.zeros_like(p) for p in params] if with_grads else []
        hidden_grad = torch.zeros_like(hidden) if with_grads and hidden.requires_grad else None
        grads = _Grads(slot, param_grads, hidden_grad) if with_grads else None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for k in range(self.n_heads):
            # One call per head: its (B, S, D) buffers die before the next head starts.
            loss += self._run_head(k, x, hidden, unembedding, grads)
        return loss, ([hidden_grad, *param_grads] if with_grads else None)

    def _run_head(
        self, k: int, x: torch.Tensor, hidden: torch.Tensor, unembedding: torch.Tensor, grads: _Grads | None
    ) -> torch.Tensor:
        """Head k's share of the loss (scalar, no graph); with `grads`, its gradients
        are accumulated there and its block's activations freed."""
        valid, seq = self.valid, self.input_ids.shape[1]
        span = seq - k - 1  # positions t with a target t+k+1 inside the sequence
        valid_k = valid[:, k + 1 :]  # (B, span): target t+k+1 valid
        targets = self.input_ids[:, k + 1 :][valid_k]  # (N,)
        n_valid = int(valid_k.sum())
        zero = torch.zeros((), dtype=torch.float32, device=hidden.device)
        if n_valid == 0 and not (k == 0 and callable(self.weight_source)):
            return zero  # nothing to predict (a later head's valid set is a subset of head 0's)
        with torch.set_grad_enabled(grads is not None):
            head_out = self.model.head_hidden(x, k, self.context)  # (B, S, D) after shared norm
        rows = head_out.detach()[:, :span][valid_k]  # (N, D): only positions that count
        if k == 0:
            self.weights = self._resolve_weights(rows, targets, unembedding, hidden)
        if n_valid == 0:
            return zero
        row_scale = self.weights[:, k + 1 :][valid_k] / (n_valid * self.n_heads)  # (N,)
        unembedding_grad = grads.of(unembedding) if grads is not None else None
        ce, rows_grad = _unembed_cross_entropy(
            rows, targets, unembedding, row_scale if grads is not None else None, unembedding_grad
        )
        self.head_ce[k] = ce.mean()
        if k == 0:
            self.ce_head0[:, 1:][valid_k] = ce
        if grads is not None and head_out.requires_grad:
            head_out_grad = torch.zeros_like(head_out)  # (B, S, D)
            head_out_grad[:, :span][valid_k] = rows_grad.to(head_out.dtype)
            self._backward_head(k, x, head_out, head_out_grad, grads)
        return (row_scale * ce).sum()

    def _resolve_weights(
        self, rows: torch.Tensor, targets: torch.Tensor, unembedding: torch.Tensor, hidden: torch.Tensor
    ) -> torch.Tensor:
        """The `(B, S)` weights, 0 where invalid. A callable gets head 0's CE first
        (an extra no-grad unembedding of head 0's rows: CE must be known before the
        weighted gradient can be formed)."""
        valid = self.valid
        if callable(self.weight_source):
            ce_head0 = torch.zeros(valid.shape, device=valid.device)  # (B, S)
            if rows.shape[0]:
                ce_head0[:, 1:][valid[:, 1:]] = _unembed_cross_entropy(rows, targets, unembedding)[0]
            weights = self.weight_source(ce_head0, hidden.detach())
            if not isinstance(weights, torch.Tensor) or weights.shape != valid.shape:
                got = tuple(weights.shape) if isinstance(weights, torch.Tensor) else type(weights).__name__
                raise ValueError(f"weights callable must return a {tuple(valid.shape)} tensor, got {got}")
        else:
            weights = self.weight_source
        weights = weights.detach().float()  # (B, S): no gradient through the weighting
        if not torch.isfinite(weights[valid]).all():
            raise ValueError("weights must be finite at every valid target token")
        return torch.where(valid, weights, torch.zeros_like(weights))

    def _backward_head(self, k, x, head_out, head_out_grad, grads: _Grads) -> None:
        """Push head k's output gradient through its block and the shared norm,
        accumulating into the trunk-output and parameter gradients."""
        block_params = [*self.model.heads[k].parameters(), *self.model.norm.parameters()]
        targets = [p for p in block_params if id(p) in grads.slot]
        inputs = ([x] if grads.hidden is not None else []) + targets
        block_grads = torch.autograd.grad(head_out, inputs, head_out_grad, allow_unused=True)
        if grads.hidden is not None:
            grads.hidden += block_grads[0]
            block_grads = block_grads[1:]
        for p, g in zip(targets, block_grads, strict=True):
            if g is not None:
                grads.of(p).add_(g)


@dataclass
class _Grads:
    """Gradient accumulators of one head pass: one per head parameter, and the trunk
    output's (None when the trunk needs none)."""

    slot: dict[int, int]  # id(param) -> index in params / param_grads
    param_grads: list[torch.Tensor]
    hidden: torch.Tensor | None  # (B, S, D)

    def of(self, param: torch.Tensor) -> torch.Tensor | None:
        index = self.slot.get(id(param))
        return None if index is None else self.param_grads[index]


@torch.no_grad()
def _unembed_cross_entropy(
    rows: torch.Tensor,
    targets: torch.Tensor,
    unembedding: torch.Tensor,
    row_scale: torch.Tensor | None = None,
    unembedding_grad: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row CE of `rows @ unembedding.T` against `targets`, in chunks of rows.

    With `row_scale` (the loss's d loss / d CE per row) it also returns the
    gradient w.r.t. `rows` `(N, D)` and adds the one w.r.t. the unembedding into
    `unembedding_grad` in place. One chunk at a time is alive (see `_chunk_cross_entropy`).
    """
    n_rows, vocab = rows.shape[0], unembedding.shape[0]
    step = max(1, CHUNK_ELEMENTS // vocab)
    ce = torch.empty(n_rows, dtype=torch.float32, device=rows.device)  # (N,)
    rows_grad = torch.empty_like(rows) if row_scale is not None else None  # (N, D)
    for start in range(0, n_rows, step):
        chunk = slice(start, start + step)
        scale = row_scale[chunk] if row_scale is not None else None
        ce[chunk], chunk_grad = _chunk_cross_entropy(rows[chunk], targets[chunk], unembedding, scale, unembedding_grad)
        if chunk_grad is not None:
            rows_grad[chunk] = chunk_grad
    return ce, rows_grad


def _chunk_cross_entropy(
    rows: torch.Tensor,  # (C, D)
    targets: torch.Tensor,  # (C,)
    unembedding: torch.Tensor,  # (V, D)
    row_scale: torch.Tensor | None,  # (C,)
    unembedding_grad: torch.Tensor | None,  # (V, D)
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """CE `(C,)` of one chunk and, with `row_scale`, d loss / d rows `(C, D)`.

    The whole chunk costs ONE `(C, V)` fp32 buffer: the log-sum-exp and the CE
    gradient (softmax - onehot) are formed in place on the logits (torch.logsumexp
    would allocate a second one), and the buffer is freed when this returns, before
    the next chunk's logits exist. Logits are upcast to fp32 for the softmax.
    """
    logits = F.linear(rows, unembedding).float()  # (C, V)
    target = targets.unsqueeze(1)  # (C, 1)
    target_logit = logits.gather(1, target)  # (C, 1)
    row_max = logits.amax(dim=-1, keepdim=True)  # (C, 1)
    total = logits.sub_(row_max).exp_().sum(dim=-1, keepdim=True)  # (C, 1); logits now exp(logit - max)
    ce = (row_max + total.log() - target_logit).squeeze(1)  # (C,)
    if row_scale is None:
        return ce, None
    scale = row_scale.unsqueeze(1)  # (C, 1)
    logits.mul_(scale / total).scatter_add_(1, target, -scale)  # (C, V) scale * (softmax - onehot)
    dlogits = logits.to(unembedding.dtype)
    del logits  # the fp32 copy, when the model is not fp32
    if unembedding_grad is not None:
        unembedding_grad.addmm_(dlogits.T, rows)
    return ce, dlogits @ unembedding
