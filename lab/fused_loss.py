"""LM head + cross-entropy in chunks of rows, so the (B*T, vocab) logits are never held whole.

At GPT-2's vocabulary the plain path spends about half of a small model's training step writing,
reading and zero-filling full-size fp32 logits and their gradient. Here each chunk's logits are made,
turned into its loss and its gradients straight away (the softmax gradient is computed in place),
and dropped. The gradients are computed during the forward pass because the loss is a scalar at the
end of the graph: backward only scales them by the incoming gradient. Same three matmuls as the
plain path, a fraction of the memory traffic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lab.extras import add_loss


@dataclass
class Chunk:
    """Some rows of the head's output, as a `chunk_loss(chunk, ctx)` hook sees them (lab's
    Extension): a loss term on the logits, computed inside the fused loss without the full logits.

    lse           (n,) log-sum-exp of each row's logits (the log-partition z; a z-loss is lse ** 2)
    target_logit  (n,) each row's logit of its target (0 on ignored rows)
    targets       (n,) the target ids (-1: ignored; such rows' values are dropped)
    logits        (n, V) the (soft-capped) logits: only for an extension whose class sets
                  `reads_logits = True` (it costs a copy and two matmuls per chunk), else None

    A hook returns {name: (values, weight)}: values (n,), one per row, computed with torch ops from
    these tensors; lab adds weight x the mean over the scored rows to the loss (logged as loss.NAME).
    Terms of lse and target_logit alone cost next to nothing: their gradient is a per-row factor
    folded into the cross-entropy's own."""

    lse: torch.Tensor
    target_logit: torch.Tensor
    targets: torch.Tensor
    logits: torch.Tensor | None = None


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, x, weight, targets, vocab_size: int, chunk: int, ignore_index: int, softcap, hooks=(), named=None
    ):
        # x (N, C), weight (V_padded, C), targets (N,). Columns past vocab_size are padding: never a target.
        n_valid = (targets != ignore_index).sum().clamp(min=1)
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        acc = torch.promote_types(x.dtype, torch.float32)  # fp32 at least, float64 stays float64
        w = padded_rows(weight.to(x.dtype))
        total = torch.zeros((), dtype=acc, device=x.device)
        grad_x = torch.empty_like(x) if need_grad else None
        # Same dtype: the first chunk's product is written into grad_w, later ones added to it (no
        # 51 MB zero fill). Autocast's bf16 products are added to fp32 zeros.
        same = x.dtype == acc
        grad_w = (torch.empty_like if same else torch.zeros_like)(w, dtype=acc) if need_grad else None
        # One buffer for every chunk's logits: a fresh (chunk, V) tensor per chunk costs more in page
        # faults than the softmax itself.
        buffer = torch.empty(min(chunk, x.size(0)), w.size(0), dtype=acc, device=x.device)
        # With a soft-cap, d capped / d logits = 1 - tanh^2, kept per chunk for the gradient.
        slope = torch.empty_like(buffer) if softcap and need_grad else None
        term_sums: dict[str, torch.Tensor] = {}
        term_owners: dict[str, object] = {}
        reads_logits = any(getattr(owner, "reads_logits", False) for owner, _ in hooks)
        for start in range(0, x.size(0), chunk):
            xc, tc = x[start : start + chunk], targets[start : start + chunk]
            logits = buffer[: len(tc)]  # (n, V_padded)
            if same:
                torch.mm(xc, w.t(), out=logits)
            else:
                logits.copy_(xc @ w.t())
            if softcap:  # cap * tanh(logits / cap), in place
                logits.div_(softcap).tanh_()
                if slope is not None:
                    torch.mul(logits, logits, out=slope[: len(tc)]).neg_().add_(1.0)
                logits.mul_(softcap)
            if vocab_size < logits.size(1):
                logits[:, vocab_size:] = float("-inf")
            ignored = tc == ignore_index
            safe_t = tc.masked_fill(ignored, 0)
            target_logit = logits.gather(1, safe_t[:, None]).squeeze(1)
            kept = logits[:, :vocab_size].clone() if hooks and reads_logits else None
            peak = logits.amax(dim=-1, keepdim=True)
            probs = logits.sub_(peak).exp_()  # unnormalised softmax, in place of the logits
            norm = probs.sum(dim=-1, keepdim=True)
            lse = (peak + norm.log()).squeeze(1)
            total += (lse - target_logit).masked_fill(ignored, 0).sum()
            coefs = None
            if hooks:
                coefs = chunk_terms(
                    hooks, lse, target_logit, tc, ignored, kept, term_sums, term_owners, need_grad
                )
            if need_grad:
                assert grad_x is not None and grad_w is not None  # made above when need_grad
                chunk_grads(
                    probs,
                    norm,
                    ignored,
                    safe_t,
                    xc,
                    w,
                    None if slope is None else slope[: len(tc)],
                    grad_x[start : start + chunk],
                    grad_w,
                    first=same and start == 0,
                    coefs=coefs,
                )
        if need_grad:  # the mean's 1/n, applied once to the small results rather than every logit
            assert grad_x is not None and grad_w is not None
            grad_w = grad_w[: weight.size(0)]  # the padding rows' gradients are zero: dropped
            ctx.save_for_backward(grad_x / n_valid.to(x.dtype), (grad_w / n_valid).to(weight.dtype))
        out = torch.float32 if acc != torch.float64 else acc
        terms = torch.stack(list(term_sums.values())) / n_valid if term_sums else total.new_zeros(0)
        terms = terms.to(out)
        ctx.mark_non_differentiable(terms)
        if named is not None:  # the terms' names and owners, in the order of `terms`
            named.extend((name, term_owners[name]) for name in term_sums)
        return (total / n_valid).to(out), terms

    @staticmethod
    def backward(ctx, grad_loss, grad_terms):
        grad_x, grad_w = ctx.saved_tensors
        return (
            grad_x * grad_loss.to(grad_x.dtype),
            grad_w * grad_loss.to(grad_w.dtype),
            None,
            None,
            None,
            None,
            None,
            None,
            None,
        )


def chunk_terms(
    hooks, lse, target_logit, targets, ignored, logits, sums: dict, owners: dict, need_grad: bool
):
    """The hooks' terms on one chunk: their values summed into `sums` (over the scored rows), and
    d (sum of weight x values) / d logits as (a, b, G): a per-row factor on the softmax (from lse),
    one on the target's onehot (from target_logit), and G (n, V) from the logits (or None)."""
    leaves = [lse.detach().requires_grad_(need_grad), target_logit.detach().requires_grad_(need_grad)]
    if logits is not None:
        leaves.append(logits.requires_grad_(need_grad))
    chunk = Chunk(leaves[0], leaves[1], targets, logits)
    total = 0.0
    with torch.enable_grad():
        for owner, hook in hooks:
            for name, (values, weight) in hook(chunk).items():
                values = values.masked_fill(ignored, 0)
                summed = values.sum()
                sums[name] = sums[name] + summed.detach() if name in sums else summed.detach()
                owners[name] = owner
                total = total + weight * summed.float()
    if not need_grad or not isinstance(total, torch.Tensor) or not total.requires_grad:
        return None
    grads = torch.autograd.grad(total, leaves, allow_unused=True)
    zero = torch.zeros_like(lse)
    a, b = (zero if g is None else g for g in grads[:2])
    return a, b, grads[2] if len(grads) > 2 else None


def chunk_grads(probs, norm, ignored, targets, xc, w, slope, grad_x, grad_w, first: bool, coefs=None):
    """One chunk's share of the summed loss's gradients. d loss / d logits = (softmax - onehot(target))
    (x slope under a soft-cap; 0 on ignored rows). With probs unnormalised, softmax = probs / norm
    row by row, so the 1/norm scales the chunk's small matrices, (n, C), rather than every one of its
    logits: grad_x = (probs @ w) / norm - slope_t w[target] and grad_w += probs^T (x / norm) - the
    target rows' slope_t x, one pass over probs fewer. first: grad_w is written, not added to.
    coefs: the extensions' terms' gradient (chunk_terms): a per-row factor on the softmax and on the
    onehot, folded into scale and picked (no extra pass), and a full (n, V) part added to probs."""
    valid = (~ignored).to(norm.dtype)[:, None]
    a, b, extra = coefs if coefs is not None else (None, None, None)
    softmax_weight = valid if a is None else valid + a[:, None].to(norm.dtype)
    scale = (softmax_weight / norm).to(xc.dtype)  # (n, 1)
    picked = valid.to(xc.dtype)  # the onehot's weight per row (0 where ignored)
    if b is not None:
        picked = picked - b[:, None].to(xc.dtype)
    if extra is not None:  # a term of the full logits: its gradient joins the softmax's, unscaled
        probs.mul_(scale.to(probs.dtype))[:, : extra.size(1)].add_(extra.to(probs.dtype))
        scale = torch.ones_like(scale)
    if slope is not None:
        probs.mul_(slope)
        picked = picked * slope.gather(1, targets[:, None]).to(xc.dtype)
    p = probs if probs.dtype == xc.dtype else probs.to(xc.dtype)
    torch.mm(p, w, out=grad_x)
    grad_x.mul_(scale).sub_(picked * w[targets])
    xs = xc * scale
    if first:
        torch.mm(p.t(), xs, out=grad_w)
    elif p.dtype == grad_w.dtype:
        grad_w.addmm_(p.t(), xs)  # accumulate in place: no (V, C) temporary
    else:
        grad_w += (p.t() @ xs).to(grad_w.dtype)
    grad_w.index_add_(0, targets, (-picked * xc).to(grad_w.dtype))


ROW_MULTIPLE = 64


def padded_rows(w: torch.Tensor) -> torch.Tensor:
    """w with zero rows added up to a multiple of 64 (GPT-2's 50257 -> 50304, as nanoGPT pads its
    vocabulary): BLAS runs the head's three matmuls 15-20% faster with that many columns (fp32, AMD
    Zen 4, native and AVX2). The padding columns' logits are masked to -inf like any past vocab_size,
    so the loss and the gradients are unchanged; the copy (51 MB at GPT-2's shape) costs ~1% of them."""
    pad = -w.size(0) % ROW_MULTIPLE
    return torch.nn.functional.pad(w, (0, 0, 0, pad)) if pad else w


def chunked_cross_entropy(
    x,
    weight,
    targets,
    vocab_size: int | None = None,
    chunk: int = 1024,
    ignore_index: int = -1,
    softcap: float | None = None,
    hooks=(),
) -> torch.Tensor:
    """Mean cross-entropy of (x @ weight.T), soft-capped if softcap is set, against targets, over
    the rows whose target is not ignore_index. x (..., C), weight (V, C), targets (...).

    hooks: (owner, hook) pairs, hook(Chunk) -> {name: (values, weight)}, run on every chunk. Each
    term's mean over the scored rows is added to owner's extras (lab.extras.add_loss) for the log,
    detached: its gradient, weight x d term, is folded into the returned loss's own, so backward of
    the loss trains through the terms too (one pass over the logits for both)."""
    vocab_size = vocab_size or weight.size(0)
    named: list = []
    loss, terms = _ChunkedLinearCrossEntropy.apply(
        x.reshape(-1, x.size(-1)),
        weight,
        targets.reshape(-1),
        vocab_size,
        chunk,
        ignore_index,
        softcap,
        tuple(hooks),
        named,
    )
    # Each term's value to its owner's extras, weighted 0 in the total: its gradient already rides on
    # the cross-entropy's backward (adding it again would count it twice).
    for (name, owner), value in zip(named, terms):
        add_loss(owner, name, value, weight=0.0)
    return loss


def head_loss_terms(logits, targets, hooks, ignore_index: int = -1) -> None:
    """The same terms on full logits (the unfused path, model.loss_chunk = 0), with ordinary autograd:
    each term's mean over the scored rows is added with its weight (lab.extras.add_loss)."""
    if not hooks:
        return
    logits, targets = logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1)
    ignored = targets == ignore_index
    safe = targets.masked_fill(ignored, 0)
    chunk = Chunk(
        torch.logsumexp(logits, dim=-1), logits.gather(1, safe[:, None]).squeeze(1), targets, logits
    )
    n_valid = (~ignored).sum().clamp(min=1)
    for owner, hook in hooks:
        for name, (values, weight) in hook(chunk).items():
            add_loss(owner, name, values.masked_fill(ignored, 0).sum() / n_valid, weight)


def soft_cap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(logits / cap) (Gemma 2, modded-nanogpt): logits squashed into (-cap, cap), nearly
    unchanged well inside it. None: the logits as they are."""
    if not cap:
        return logits
    return (cap * torch.tanh(logits.float() / cap)).to(logits.dtype)  # tanh in fp32 even under autocast
