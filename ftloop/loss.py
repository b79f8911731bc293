"""The supervised loss, and which positions it counts: one home for the rule that the data side labels by and the
loop normalises by.

Position t predicts token t + 1, and only positions whose next token is labelled (an assistant reply, its closing
`<|im_end|>`) count: every other label is IGNORE_INDEX (cross-entropy's ignore_index). The loss of a micro-batch is
the sum of token cross-entropies over those positions (fp32), with their count; the loop divides by the step's
count on all ranks (ftloop.steps), so the gradient does not depend on how the global batch is split.

The vocabulary makes the logits the largest tensors of a step. Through autograd all at once, one supervised
position holds 12 B per vocabulary entry at the peak of the loss's backward (the fp32 log-softmax saved for it,
the NLL's gradient for it, its gradient for the logits; lm_head's own output is gone by then), 8 B in forward and
evaluation: at Qwen's 151,936 tokens 3.7 GB for 2k supervised positions, 30 GB for a 16k-token packed batch. So
--loss-chunk-size positions at a time go through lm_head and the cross-entropy, in one autograd function that
saves only its inputs: its backward recomputes each chunk's logits, turns them into their gradient in place
(softmax minus one-hot) and adds the chunk's share of lm_head's weight gradient into one buffer. At most one
chunk's logits exist at a time, in forward, backward and evaluation alike: 4 B per entry with an fp32 lm_head,
6 B with a bf16 one (its output beside the fp32 copy, for a moment); scripts/bench_loss.py measures both ways.
The price: lm_head's matmul runs once more (4 of its size per step instead of 3), and the weight gradient is
summed over chunks in the weight's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100  # the label of a position that is not supervised

# Supervised positions per chunk (--loss-chunk-size's default; 0: all at once). At 151,936 tokens a chunk's logits
# peak at 6 B x 1024 x 151,936 = 0.93 GB (bf16 lm_head), whatever the length of the micro-batch, next to lm_head's
# own gradient (0.6 GB at hidden 2048 in bf16, 2.5 GB at 8192), which no chunk size shrinks: smaller chunks would
# save little. A chunk runs a dozen kernels per pass around a 1024 x hidden x 151,936 matmul that keeps a GPU busy
# for a millisecond or more, so the launches and the Python loop stay noise; larger chunks would only add memory.
LOSS_CHUNK_SIZE = 1024


def supervised_index(labels: torch.Tensor) -> torch.Tensor:
    """The positions that count, as indices into the flattened (batch x length) positions: t = b x length + i where
    label i + 1 of row b is supervised. Computed on the host by the loader's collate (ftloop.data.batches), so that
    the loss picks its positions on the device without a boolean mask, whose size the host would wait to learn."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return keep.view(-1).nonzero().view(-1)


def supervised_loss(hidden: torch.Tensor, labels: torch.Tensor, lm_head: nn.Module,
                    chunk_size: int, index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the token cross-entropies at the supervised positions in fp32, how many there are). Only those
    positions are projected onto the vocabulary, which saves the (batch x length x vocab) logits of prompts and
    padding; `chunk_size` of them at a time, or all at once through plain autograd with 0.

    Chunked, lm_head's weight is read directly (every Qwen-VL's lm_head is a bias-free Linear), also in backward:
    under FSDP it lives in the root unit, which keeps its flat parameter gathered from forward to its
    post-backward. The weight's gradient goes back through autograd, so a tie to the embeddings adds up.

    `index`: `supervised_index(labels)`, computed ahead on the host (the training and evaluation batches carry it);
    without it the positions are found here, by a boolean mask (on a GPU, a wait for the device)."""
    if chunk_size < 0:
        raise ValueError(f"chunk_size must be 0 (all positions at once) or positive, not {chunk_size}")
    if index is None:
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        kept, wanted, count = hidden[:, :-1][keep], targets[keep], keep.sum()
    else:
        kept = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)
        wanted = labels.reshape(-1).index_select(0, index + 1)
        count = torch.full((), index.numel(), dtype=torch.long, device=hidden.device)
    if chunk_size == 0:
        return F.cross_entropy(lm_head(kept).float(), wanted, reduction="sum"), count
    if not isinstance(lm_head, nn.Linear) or lm_head.bias is not None:
        raise TypeError(f"a chunked loss needs a bias-free nn.Linear lm_head, not {lm_head}")
    return _ChunkedCrossEntropy.apply(kept, lm_head.weight, wanted, chunk_size), count


class _ChunkedCrossEntropy(torch.autograd.Function):
    """sum(cross_entropy(hidden @ weight.T, targets)) over (positions x hidden) `hidden`, `chunk_size` positions
    at a time in forward and again in backward; saves only its inputs. Its own backward rather than autograd
    over checkpointed chunks: autograd hands each chunk's weight gradient over as a new weight-sized tensor,
    transposed, which it then sums out of place (three weight-sized tensors at once, measured: 1.7 GiB against
    0.9 GiB unchunked at hidden 1000, 512 positions, chunks of 128), and it keeps the fp32 log-softmax beside
    its gradients (12 B per entry, not 4)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                chunk_size: int) -> torch.Tensor:
        ctx.save_for_backward(hidden, weight, targets)
        ctx.chunk_size = chunk_size
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, len(targets), chunk_size):
            # In fp32: the softmax over 150k entries is where bf16 would lose the loss.
            logits = F.linear(hidden[start:start + chunk_size], weight).float()
            picked = logits.gather(1, targets[start:start + chunk_size, None])
            top = logits.amax(1, keepdim=True)
            # log-sum-exp in place: no second (chunk x vocab) tensor
            total += (logits.sub_(top).exp_().sum(1, keepdim=True).log_() + top - picked).sum()
            del logits  # before the next chunk's, not when the name is reassigned
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        hidden, weight, targets = ctx.saved_tensors
        size = ctx.chunk_size
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        for start in range(0, len(targets), size):
            chunk = hidden[start:start + size]
            logits = F.linear(chunk, weight).float()
            # d(sum of cross-entropies)/d(logits) = softmax - one-hot, built in the logits' own memory
            probs = logits.sub_(logits.amax(1, keepdim=True)).exp_()
            probs.div_(probs.sum(1, keepdim=True))
            probs.scatter_add_(1, targets[start:start + size, None], probs.new_full((len(chunk), 1), -1.0))
            grad_logits = probs.mul_(grad_total).to(weight.dtype)  # the same tensor with an fp32 weight
            del logits, probs
            if grad_hidden is not None:
                torch.mm(grad_logits, weight, out=grad_hidden[start:start + size])
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.T, chunk)  # in place: one weight-sized tensor for all chunks
            del grad_logits
        return grad_hidden, grad_weight, None, None


def supervised_tokens(labels: torch.Tensor) -> int:
    """How many positions of a micro-batch the loss counts (a host sync: read while the batch is on the host)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
