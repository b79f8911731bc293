"""The supervised loss, and which positions it counts: one home for the rule that the data side labels by and the
loop normalises by.

Position t predicts token t + 1, and only positions whose next token is labelled (an assistant reply, its closing
`<|im_end|>`) count: every other label is IGNORE_INDEX (cross-entropy's ignore_index). The loss of a micro-batch is
the sum of token cross-entropies over those positions (fp32), with their count; the loop divides by the step's
count on all ranks (ftloop.steps), so the gradient does not depend on how the global batch is split.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100  # the label of a position that is not supervised


def supervised_loss(hidden: torch.Tensor, labels: torch.Tensor, lm_head: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the token cross-entropies at the supervised positions in fp32, how many there are). Only those
    positions are projected onto the vocabulary, which saves the (batch x length x vocab) logits of prompts and
    padding."""
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    logits = lm_head(hidden[:, :-1][keep])
    return F.cross_entropy(logits.float(), targets[keep], reduction="sum"), keep.sum()


def supervised_tokens(labels: torch.Tensor) -> int:
    """How many positions of a micro-batch the loss counts (a host sync: read while the batch is on the host)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
