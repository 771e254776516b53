"""The language-model loss without materialising the logits: a linear head fused with cross-entropy, in chunks.

At the `gpu` shapes the head is 151,936 wide: a 16 x 1,024-token batch has 16,384 x 151,936 logits — 5 GB in bf16,
10 GB in fp32 for the loss, and autograd keeps them (or their softmax) for the backward, which then reads them again.
`linear_cross_entropy` walks the tokens `chunk` at a time: it computes a chunk's logits (one GEMM), its log-sum-exp and
loss, turns the logits in place into the loss's gradient (softmax minus the one-hot target, over the number of counted
tokens), and multiplies that straight into the gradients of the hidden states and the head weight (two GEMMs). The
forward thereby also does the backward's work; the backward only scales the stored gradients by the incoming one.
Peak memory holds one chunk of logits instead of all of them, and they are written and read once in fast memory
rather than kept for the backward (the same idea as Liger-Kernel's fused linear cross-entropy; here in plain PyTorch
ops, so it runs — and is tested — on CPU too).

The GEMMs run in the autocast dtype when autocast is on (bf16 on GPU, as `lm_head` would under autocast), the
softmax and the loss in fp32, the head-weight gradient is accumulated in fp32. Tokens labelled `ignore_index` count
neither in the loss nor in its mean, as in `F.cross_entropy`.
"""
from __future__ import annotations

import torch


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, labels, chunk: int, ignore_index: int, dtype: torch.dtype):
        with torch.autocast(h.device.type, enabled=False):
            w = weight.to(dtype)
            valid = labels != ignore_index
            count = valid.sum().clamp(min=1).float()
            loss = torch.zeros((), dtype=torch.float32, device=h.device)
            grad_h = torch.empty(h.shape, dtype=h.dtype, device=h.device) if h.requires_grad else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if weight.requires_grad else None
            for s in range(0, h.shape[0], chunk):
                hc, lc, vc = h[s:s + chunk].to(dtype), labels[s:s + chunk], valid[s:s + chunk]
                logits = (hc @ w.t()).float()
                lse = logits.logsumexp(-1)
                target = lc.clamp(min=0)[:, None]
                loss += ((lse - logits.gather(1, target).squeeze(1)) * vc).sum()
                # d loss / d logits = (softmax - onehot) * valid / count, built in the logits' own memory
                g = logits.sub_(lse[:, None]).exp_()
                g.scatter_add_(1, target, -vc[:, None].float())
                g.mul_((vc.float() / count)[:, None])
                g = g.to(dtype)
                if grad_h is not None:
                    grad_h[s:s + chunk] = g @ w
                if grad_w is not None:
                    grad_w += g.t() @ hc
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return loss / count

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = None if grad_h is None else grad_h * grad_out.to(grad_h.dtype)
        gw = None if grad_w is None else (grad_w * grad_out).to(ctx.weight_dtype)
        return gh, gw, None, None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int = 4096,
                         ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of `h @ weight.T` (h [N, hidden], weight [vocab, hidden]) against `labels` [N], computed
    `chunk` tokens at a time without keeping the [N, vocab] logits; equal to
    `F.cross_entropy(F.linear(h, weight).float(), labels, ignore_index=ignore_index)` in value and gradients."""
    if chunk < 1:
        raise ValueError(f"chunk must be a positive number of tokens, got {chunk}")
    if h.dim() != 2 or labels.shape != h.shape[:1] or weight.shape[1] != h.shape[1]:
        raise ValueError(f"linear_cross_entropy wants h [N, hidden], weight [vocab, hidden], labels [N]; got "
                         f"{tuple(h.shape)}, {tuple(weight.shape)}, {tuple(labels.shape)}")
    dev = h.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
    return _LinearCrossEntropy.apply(h, weight, labels, chunk, ignore_index, dtype)
