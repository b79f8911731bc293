"""The chunked supervised loss (ftloop.loss): the same loss and gradients as all positions at once (tied to the
embeddings or not, lm_head frozen or not), the same as a float64 computation written here from the definition,
and at most one chunk's logits alive at a time, observed below autograd (scripts/bench_loss.py's LiveTensors)
through forward, recomputation and backward, with the bytes per entry the memory plan counts; also inside an
FSDP1 root's forward on 2 processes. Run as a script (under torchrun), this file is that FSDP worker."""

from __future__ import annotations

import functools
import json
import os
import sys

import pytest
import torch
from torch import nn

from launch import REPO, check, forked_torchrun
from ftloop.loss import IGNORE_INDEX, LOSS_CHUNK_SIZE, supervised_loss, supervised_tokens
from scripts.bench_loss import LiveTensors, logits_shaped

VOCAB, HIDDEN, ROWS, LENGTH, COUNT = 50, 6, 2, 30, 40  # COUNT of the ROWS x (LENGTH - 1) positions supervised
# Chunks of 1, 3 (leaving 1), 7 (leaving 5), 8 (COUNT is a multiple) and more than COUNT; none of them, nor what
# they leave, is HIDDEN, which tells logits (rows x vocab) from lm_head's weight gradient (hidden x vocab).
CHUNK_SIZES = [1, 3, 7, 8, 64]


class Tiny(nn.Module):
    """Embeddings, one layer, lm_head: `tied` shares lm_head's weight with the embeddings, as Qwen2.5-VL-3B."""

    def __init__(self, tied: bool):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.layer = nn.Linear(HIDDEN, HIDDEN)
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)
        if tied:
            self.lm_head.weight = self.embed.weight

    def hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.layer(self.embed(input_ids)))


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels) of ROWS rows, COUNT supervised positions among them, the others IGNORE_INDEX."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(VOCAB, (ROWS, LENGTH), generator=generator)
    labels = input_ids.clone()
    targets = labels[:, 1:].reshape(-1)  # a view: position t's label is labels[:, t + 1]
    positions = ROWS * (LENGTH - 1)
    ignored = torch.randperm(positions, generator=generator)[:positions - COUNT]
    labels[:, 1:] = targets.index_fill(0, ignored, IGNORE_INDEX).view(ROWS, LENGTH - 1)
    labels[:, 0] = IGNORE_INDEX  # never read: no position predicts the first token
    return input_ids, labels


def run(tied: bool, chunk_size: int, dtype=torch.float32, frozen: bool = False,
        labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Loss, count and gradients (the hidden states, lm_head's weight, the layer, the embeddings) of one forward
    and backward from the same weights; `frozen`: lm_head's weight takes no gradient."""
    torch.manual_seed(0)
    model = Tiny(tied).to(dtype)
    model.lm_head.weight.requires_grad_(not frozen)
    input_ids, default_labels = batch()
    hidden = model.hidden(input_ids)
    hidden.retain_grad()
    loss, count = supervised_loss(hidden, default_labels if labels is None else labels, model.lm_head, chunk_size)
    (loss / count.clamp(min=1)).backward()  # as the loop divides by the count: an upstream gradient other than 1
    return {"loss": loss.detach(), "count": count, "hidden": hidden.grad, "lm_head": model.lm_head.weight.grad,
            "layer": model.layer.weight.grad, "embed": model.embed.weight.grad}


def test_the_batch_has_the_shape_the_tests_rely_on():
    _, labels = batch()
    assert supervised_tokens(labels) == COUNT and (labels[:, 1:] == IGNORE_INDEX).any()
    assert all(size != HIDDEN and COUNT % size != HIDDEN for size in CHUNK_SIZES)
    assert COUNT % 8 == 0 and COUNT % 7 > 1 and max(CHUNK_SIZES) > COUNT
    assert LOSS_CHUNK_SIZE > 0


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
def test_chunks_give_the_loss_and_gradients_of_all_positions_at_once(tied, chunk_size):
    whole, chunked = run(tied, 0), run(tied, chunk_size)
    assert int(chunked["count"]) == int(whole["count"]) == COUNT
    for name, expected in whole.items():
        assert expected is not None and chunked[name] is not None, name
        torch.testing.assert_close(chunked[name], expected, rtol=1e-6, atol=1e-6, msg=lambda m: f"{name}: {m}")
    # With a tie, the embeddings' gradient is lm_head's: both uses summed into one tensor.
    assert (whole["embed"] is whole["lm_head"]) == tied and (chunked["embed"] is chunked["lm_head"]) == tied


def reference(tied: bool) -> dict[str, torch.Tensor]:
    """The definition in float64, position by position: minus the log of the softmax probability of the next
    token, summed over the positions whose next token is labelled."""
    torch.manual_seed(0)
    model = Tiny(tied).double()
    input_ids, labels = batch()
    hidden = model.hidden(input_ids)
    hidden.retain_grad()
    terms = []
    for row in range(ROWS):
        for t in range(LENGTH - 1):
            if labels[row, t + 1] != IGNORE_INDEX:
                scores = hidden[row, t] @ model.lm_head.weight.T
                terms.append(torch.logsumexp(scores, 0) - scores[labels[row, t + 1]])
    loss = torch.stack(terms).sum()
    (loss / len(terms)).backward()
    return {"loss": loss.detach(), "count": torch.tensor(len(terms)), "hidden": hidden.grad,
            "lm_head": model.lm_head.weight.grad, "layer": model.layer.weight.grad, "embed": model.embed.weight.grad}


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("chunk_size", [0, 3])
def test_the_loss_is_the_definition_computed_in_float64(tied, chunk_size):
    expected, found = reference(tied), run(tied, chunk_size)
    assert found["loss"].dtype == torch.float32 and int(found["count"]) == int(expected["count"]) == COUNT
    for name in ("loss", "hidden", "lm_head", "layer", "embed"):
        torch.testing.assert_close(found[name].double(), expected[name], rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{name}: {m}")


def test_a_frozen_lm_head_gets_no_gradient_and_the_rest_the_same():
    whole, chunked = run(False, 0, frozen=True), run(False, 7, frozen=True)
    assert whole["lm_head"] is None and chunked["lm_head"] is None
    for name in ("loss", "hidden", "layer", "embed"):
        torch.testing.assert_close(chunked[name], whole[name], rtol=1e-6, atol=1e-6)


def test_a_batch_without_supervised_positions_gives_zero_loss_and_zero_gradients():
    _, labels = batch()
    nothing = torch.full_like(labels, IGNORE_INDEX)
    for chunk_size in (0, 7):
        found = run(True, chunk_size, labels=nothing)
        assert found["loss"].item() == 0 and int(found["count"]) == 0
        assert all(found[name] is not None and not found[name].any() for name in ("hidden", "lm_head", "layer"))


def test_a_bf16_lm_head_still_gives_an_fp32_loss_and_its_gradients():
    whole, chunked = run(False, 0, torch.bfloat16), run(False, 7, torch.bfloat16)
    assert whole["loss"].dtype == chunked["loss"].dtype == torch.float32
    assert chunked["lm_head"].dtype == torch.bfloat16
    # The same bf16 logits, cast to fp32 before the softmax either way
    torch.testing.assert_close(chunked["loss"], whole["loss"], rtol=1e-6, atol=1e-6)
    for name, expected in whole.items():  # bf16 gradients: summed over chunks, they round differently
        torch.testing.assert_close(chunked[name].float(), expected.float(), rtol=2e-2, atol=2e-2)


def test_a_negative_chunk_size_and_an_lm_head_that_is_not_a_bias_free_linear_are_refused():
    model = Tiny(False)
    input_ids, labels = batch()
    with pytest.raises(ValueError, match="chunk_size"):
        supervised_loss(model.hidden(input_ids), labels, model.lm_head, -1)
    with pytest.raises(TypeError, match="bias-free"):
        supervised_loss(model.hidden(input_ids), labels, nn.Linear(HIDDEN, VOCAB), 7)


def tracked(chunk_size: int, grad: bool = True, dtype=torch.float32) -> dict:
    """The logits-shaped (rows x vocab) tensors of one loss forward (and backward), as LiveTensors saw them."""
    torch.manual_seed(0)
    model = Tiny(False).to(dtype)
    input_ids, labels = batch()
    with torch.set_grad_enabled(grad):
        hidden = model.hidden(input_ids)
        tracker = LiveTensors(logits_shaped(VOCAB, HIDDEN))
        with tracker:
            loss, _ = supervised_loss(hidden, labels, model.lm_head, chunk_size)
            after_forward = tracker.logits_now  # what the forward left for the backward
            if grad:
                loss.backward()
    return {"peak": tracker.logits_peak, "after_forward": after_forward, "largest": tracker.largest_logits,
            "after": tracker.logits_now}


@pytest.mark.parametrize("grad", [True, False], ids=["training", "no_grad"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_at_most_one_chunk_of_logits_is_alive_at_a_time(grad, dtype):
    whole = tracked(0, grad, dtype)
    assert whole["largest"] == (COUNT, VOCAB) and whole["after"] == 0
    # All positions at once, through autograd: the forward keeps the fp32 log-softmax for the backward, whose
    # peak is 12 B per entry (the log-softmax, the NLL's gradient for it, its gradient for the logits); without
    # gradients the fp32 copy of the logits and the log-softmax.
    assert whole["after_forward"] == (COUNT * VOCAB * 4 if grad else 0)
    assert whole["peak"] == COUNT * VOCAB * (12 if grad else 8)
    for chunk_size in CHUNK_SIZES:
        chunked, rows = tracked(chunk_size, grad, dtype), min(chunk_size, COUNT)
        assert chunked["largest"] == (rows, VOCAB), chunk_size
        assert chunked["after_forward"] == 0 and chunked["after"] == 0, chunk_size
        # One chunk's logits in fp32 (4 B, with lm_head's bf16 output beside them while they are cast: 6 B), in
        # forward and in backward: logits kept from an earlier chunk, or a second copy, would add to it.
        per_entry = 6 if dtype == torch.bfloat16 else 4
        assert chunked["peak"] == rows * VOCAB * per_entry, (chunk_size, chunked["peak"])


def test_inside_an_fsdp1_root_forward_chunks_give_the_gradients_of_all_positions_at_once(tmp_path):
    out = tmp_path / "found.json"
    check(forked_torchrun(2, [os.path.join(REPO, "tests", "test_loss.py"), str(out)]))
    found = json.loads(out.read_text())
    assert sorted(found) == ["tied orig_params=False", "tied orig_params=True", "untied orig_params=False",
                             "untied orig_params=True"], found
    assert all(problems == [] for problems in found.values()), found


class Root(Tiny):
    """Tiny, its layer an FSDP unit of its own, the loss computed in the root's forward (as VisionLanguageSFT)."""

    def forward(self, input_ids, labels, chunk_size):
        return supervised_loss(self.hidden(input_ids), labels, self.lm_head, chunk_size)


def fsdp_worker(out: str) -> None:
    """Each rank its own batch; per case, the local gradient shards (reduced over both ranks) and the no_grad
    loss with chunks of 3 against all positions at once, from the same weights. Rank 0 writes {case: problems}."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, ShardingStrategy
    from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

    from ftloop.distributed import init_distributed

    world = init_distributed()
    input_ids, labels = batch(seed=world.rank)
    found = {}
    for tied in (False, True):
        for use_orig_params in (False, True):
            torch.manual_seed(0)
            root = Root(tied)
            policy = functools.partial(lambda_auto_wrap_policy, lambda_fn=lambda module: module is root.layer)
            model = FSDP(root, auto_wrap_policy=policy, sharding_strategy=ShardingStrategy.FULL_SHARD,
                         use_orig_params=use_orig_params, device_id=torch.device("cpu"))
            results = {}
            for chunk_size in (0, 3):
                model.zero_grad(set_to_none=True)
                loss, count = model(input_ids, labels, chunk_size)
                (loss / count).backward()
                # (use_orig_params: a parameter with no elements in this rank's shard has no gradient)
                grads = [p.grad.clone() if p.grad is not None else torch.zeros(0) for p in model.parameters()]
                with torch.no_grad():
                    evaluated, _ = model(input_ids, labels, chunk_size)
                results[chunk_size] = (loss.detach(), evaluated, grads)
            problems = []
            (loss0, eval0, grads0), (loss3, eval3, grads3) = results[0], results[3]
            for name, a, b in [("loss", loss0, loss3), ("eval loss", eval0, eval3), ("eval vs train", loss0, eval3)]:
                if not torch.allclose(a, b, rtol=1e-6, atol=1e-6):
                    problems.append(f"{name}: {a.item()} != {b.item()}")
            if len(grads0) != len(grads3) or not sum(g.numel() for g in grads0):
                problems.append(f"{len(grads0)} gradients != {len(grads3)}, or none in this rank's shard")
            for i, (a, b) in enumerate(zip(grads0, grads3)):
                if not torch.allclose(a, b, rtol=1e-6, atol=1e-6):
                    problems.append(f"gradient {i}: max difference {(a - b).abs().max().item()}")
            gathered = [None] * world.world_size
            dist.all_gather_object(gathered, problems)
            found[f"{'tied' if tied else 'untied'} orig_params={use_orig_params}"] = sum(gathered, [])
    if world.rank == 0:
        with open(out, "w") as f:
            json.dump(found, f)


if __name__ == "__main__":
    from ftloop.distributed import leave

    fsdp_worker(sys.argv[1])
    leave(0)  # not through the interpreter's teardown, which can abort with gloo threads alive
