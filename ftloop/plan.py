"""What every GPU of a run holds, from the model's config alone: `python -m ftloop.plan [ftloop.train flags]
--nproc-per-node 8 --nnodes 1 --gpu-memory-gib 80`.

The model is built on the meta device (no weights, no tokenizer, no data) by the builder ftloop.train uses
(ftloop.model.build_skeleton), and split into the FSDP units the run wraps, its own unit set (each decoder layer
and vision block, what freezing and LoRA keep apart; the root with the embeddings, lm_head, final norm, patch
embedding and merger). Per GPU, in bytes:

  persistent   sharded parameters (master dtype, each unit padded to a multiple of the shard count), their
               gradients (FSDP reduces into the master dtype), optimizer state (Adafactor: full row and column
               statistics of every matrix on every rank, the sliced second moment of vectors, the Kahan
               buffer with --bf16-master-rounding kahan; AdamW: two moments per parameter)
               (with --cpu-offload they live on the host; but accumulating over micro-batches then keeps
               every unit's unsharded gradient on the GPU, as FSDP1 cannot add to an offloaded gradient)
  largest unit two units gathered in the compute dtype (the one running and the one prefetched:
               limit_all_gathers allows no more), the running unit's unsharded gradient, its copy in
               --reduce-dtype for the reduce-scatter, and the reduced shard (SHARD_GRAD_OP: every unit stays
               gathered from forward to backward)
  root unit    the root's gathered parameters and unsharded gradient: FSDP keeps the root gathered from the
               first forward to its post-backward, and lm_head's gradient arrives first in backward
  activations  per micro-batch of --per-device-train-batch-size x --max-seq-length tokens: the tensors autograd
               saves in each decoder layer (formula below, checked against autograd on CPU by the tests), all
               layers without gradient checkpointing, or the layer inputs plus one recomputed layer with it;
               the vision tower likewise for the most patches those tokens can hold (4 per token)
  packed mask  with --packing under sdpa: the dense mask transformers builds over each packed sequence, one byte per
               (query, key) pair as a boolean and again in the query dtype (sdpa converts it)
  logits       every position supervised at worst, --loss-chunk-size positions at a time (ftloop.loss): one chunk's
               logits in the compute dtype and in fp32, and lm_head's weight gradient the chunks add into
               (`loss_bytes`; unchunked: 12 bytes per position x vocabulary entry at the backward's peak)
  eval logits  the same for a micro-batch of --per-device-eval-batch-size rows (no gradients)
  export       the `best` and `final` exports gather one unit at a time in the master dtype (the gradients are
               freed by then); a checkpoint's save and resume add nothing on the GPU (ftloop.fsdp.checkpoint
               writes and reads the shards' own memory, staging one tensor at a time on the host)
  reserve      what the run's memory does not hold but the GPU must: the CUDA context (CONTEXT_BYTES), each NCCL
               communicator's buffers (NCCL_BYTES; HYBRID_SHARD has three), and FRAGMENTATION of the peak for the
               caching allocator. ftloop.train plans against the memory free after its process group exists
               (`torch.cuda.mem_get_info`: the context, the first communicator and any other tenant already
               taken), so its reserve is the other communicators and the fragmentation

Frozen units (freeze flags, a LoRA base) have no gradients and no optimizer state; a LoRA base is held in bf16
under --bf16, its adapter matrices (units of their own) in the master dtype.

The peak is the persistent part plus the larger of two moments: mid-backward (root unit + largest unit +
activations + logits) and the root's own post-backward (its unsharded gradient, the copy in --reduce-dtype and
the reduced shard), plus the reserve; or evaluation's peak (the root and two units gathered, the logits of
--per-device-eval-batch-size rows), or the export's, if higher. Gradient accumulation adds nothing: every micro-batch's gradient
is reduce-scattered into the sharded gradient (not with --cpu-offload, above). Exit 0 when the peak fits the
GPU, 2 (with the flag to change) when it does not. `ftloop.train` runs the same plan on GPUs before loading
anything (--no-memory-check skips it).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field

import tyro
from torch import nn

from ftloop.cli import run_command
from ftloop.config import Config
from ftloop.data.sources import check_sources
from ftloop.errors import ConfigError
from ftloop.activations import layer_activation_bytes, vision_block_activation_bytes
from ftloop.linear_attention import linear_attention_kernels
from ftloop.fsdp.wrap import shard_group_size
from ftloop.lora import base_dtype
from ftloop.model import DTYPES, Skeleton, build_skeleton, load_config

GIB = 2**30
CONTEXT_BYTES = GIB  # CUDA context, kernels, cuBLAS workspaces
NCCL_BYTES = GIB  # one NCCL communicator's buffers (0.5-1.6 GiB seen on 8-GPU nodes)
FRAGMENTATION = 0.05  # of the peak: the caching allocator's slack (expandable segments keep it small)


def reserve_bytes(strategy: str, peak: int, measured_free: bool) -> Term:
    """The reserve of a plan whose other terms add up to `peak`; `measured_free`: the GPU's memory is what
    `mem_get_info` found free after the process group started (the context and its communicator taken)."""
    communicators = 3 if strategy == "HYBRID_SHARD" else 1  # HYBRID_SHARD: the world, its shard and replica groups
    fragmentation = int(FRAGMENTATION * peak)
    if measured_free:
        return Term((communicators - 1) * NCCL_BYTES + fragmentation,
                    f"{communicators - 1} more NCCL communicator(s) + {FRAGMENTATION:.0%} fragmentation")
    return Term(CONTEXT_BYTES + communicators * NCCL_BYTES + fragmentation,
                f"CUDA context + {communicators} NCCL communicator(s) + {FRAGMENTATION:.0%} fragmentation")


@dataclass
class UnitSize:
    """One FSDP unit's parameters as the plan needs them."""
    name: str
    numel: int
    matrix_stats: int  # row + column statistics Adafactor keeps for its >= 2-D parameters (full, on every rank)
    vector_numel: int  # elements of its 0-/1-D parameters (per-element second moment, sliced)
    trainable: int  # elements that train (a unit is all frozen or all trainable); the optimizer counts only these


def fsdp_units(skeleton: Skeleton) -> list[UnitSize]:
    """The units FSDP makes of `skeleton` (its auto-wrap policy is `skeleton.units`), outer ones in module order,
    the root last. As FSDP wraps, children come first: a unit holds its parameters that no unit inside it holds
    (LoRA's adapter matrices sit inside their decoder layer's unit), the root whatever no unit took; tied
    parameters count once (in the root). Parameters without requires_grad (frozen parts, a LoRA base) get no
    gradient or optimizer statistics."""
    modules = list(skeleton.model.named_modules())
    seen: set[int] = set()
    sizes = {name: _unit_size(name, module, seen) for name, module in reversed(modules) if module in skeleton.units}
    return [sizes[name] for name, _ in modules if name in sizes] + [_unit_size("root", skeleton.model, seen)]


def _unit_size(name: str, module: nn.Module, seen: set[int]) -> UnitSize:
    numel = stats = vectors = trainable = 0
    for param in module.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        numel += param.numel()
        if not param.requires_grad:  # no gradient, no optimizer statistics
            continue
        trainable += param.numel()
        if param.dim() >= 2:
            rows = param.numel() // param.shape[-1]
            stats += rows + (rows // param.shape[-2]) * param.shape[-1]
        else:
            vectors += param.numel()
    return UnitSize(name, numel, stats, vectors, trainable)


@dataclass
class Term:
    """One term of the plan: bytes per GPU, and how they come about."""
    nbytes: int
    detail: str = ""


@dataclass
class MemoryPlan:
    """Per-GPU bytes of each term (see the module docstring) and the peak against the GPU's memory."""
    sharded_parameters: Term
    gradients: Term
    optimizer_state: Term
    largest_unit: Term
    root_unit: Term
    activations: Term
    packed_mask: Term | None  # sdpa's dense mask over packed sequences; None without packing or with flash-attention
    logits: Term
    eval_logits: Term
    export: Term
    reserve: Term
    activations_other: int  # activations with gradient checkpointing switched the other way
    peak_bytes: int
    gpu_bytes: int | None = None
    measured_free: bool = False  # gpu_bytes is what mem_get_info found free after start-up (see reserve_bytes)
    shards: int = 1
    parameters: int = 0
    notes: list[str] = field(default_factory=list)

    def terms(self) -> list[tuple[str, Term]]:
        """(name, term) of every term there is, in the order the report prints them."""
        return [(f.name.replace("_", " "), getattr(self, f.name)) for f in dataclasses.fields(self)
                if isinstance(getattr(self, f.name), Term)]

    def fits(self) -> bool:
        return self.gpu_bytes is None or self.peak_bytes <= self.gpu_bytes


def loss_bytes(positions: int, chunk_size: int, text, cb: int, training: bool) -> Term:
    """The loss's peak beyond the activations (ftloop.loss, measured by scripts/bench_loss.py and tests/test_loss.py):
    unchunked, the fp32 log-softmax, its gradient and the NLL gradient (12 B per position x vocabulary entry; 8 B
    without gradients); in chunks, one chunk's logits in the compute dtype and in fp32, plus in training lm_head's
    weight gradient, which the chunks add into one buffer."""
    vocab = text.vocab_size
    if not chunk_size:
        per = 12 if training else 8
        return Term(positions * vocab * per, f"{positions} positions x {vocab} x {per} B (--loss-chunk-size 0)")
    chunk = min(positions, chunk_size)
    weight_grad = vocab * text.hidden_size * cb if training else 0
    return Term(chunk * vocab * (cb + 4) + weight_grad, f"{chunk} positions at a time x {vocab} x ({cb} + 4) B" +
                (f" + lm_head's gradient {cb} B" if training else ""))


def plan_memory(skeleton: Skeleton, cfg: Config, world_size: int, gpus_per_node: int,
                gpu_bytes: int | None = None, measured_free: bool = False) -> MemoryPlan:
    """The plan for `cfg` on `world_size` GPUs, `gpus_per_node` to a node, for the skeleton `cfg` builds
    (ftloop.model.build_skeleton); `gpu_bytes` is each GPU's memory, or with `measured_free` what was free on it
    once the process group existed."""
    f, o, m, t, data = cfg.fsdp, cfg.optim, cfg.model, cfg.train, cfg.data
    strategy = "NO_SHARD" if world_size == 1 else f.sharding_strategy  # FSDP itself does this at world size 1
    shards = shard_group_size(strategy, world_size, gpus_per_node)
    pb = DTYPES[m.param_dtype].itemsize
    fb = DTYPES[base_dtype(cfg)].itemsize  # a frozen element (a LoRA base is held in bf16)
    cb = 2 if f.bf16 else pb
    rb = DTYPES[f.reduce_dtype].itemsize if f.bf16 else pb
    units = fsdp_units(skeleton)
    root, layers = units[-1], units[:-1]
    # FSDP pads each flat parameter to the shard count; a unit is all trainable (gradients, optimizer state) or
    # all frozen.
    local_trainable = sum(math.ceil(u.trainable / shards) for u in units)
    local_frozen = sum(math.ceil((u.numel - u.trainable) / shards) for u in units)
    local = local_trainable + local_frozen
    offloaded = f.cpu_offload  # shards, gradients and the optimizer live in host memory
    where = " (on the host)" if offloaded else ""
    parameters = Term(0 if offloaded else local_trainable * pb + local_frozen * fb,
                      f"{local / 1e9:.2f}B local elements x {pb} B{where}" if fb == pb else
                      f"{local_trainable / 1e9:.3f}B trainable x {pb} B + {local_frozen / 1e9:.2f}B frozen x {fb} B"
                      f"{where}")
    gradients = Term(0 if offloaded else local_trainable * pb, f"the same: FSDP reduces into the master dtype{where}")
    if offloaded and t.gradient_accumulation_steps > 1:  # no_sync: unsharded on the GPU until the last micro-batch
        gradients = Term(sum(u.trainable for u in units) * cb,
                         "unsharded on the GPU across micro-batches (no_sync: FSDP1 cannot accumulate offloaded)")
    if o.optim == "adafactor":
        stats = sum(u.matrix_stats for u in units) * 4 + sum(math.ceil(u.vector_numel / shards) for u in units) * 4
        kahan = local_trainable * 2 if m.param_dtype == "bf16" and o.bf16_master_rounding == "kahan" else 0
        state = Term(stats + kahan, "Adafactor row/column statistics + sliced vector moments" +
                     (" + bf16 Kahan buffer" if kahan else ""))
    else:
        state = Term(2 * local_trainable * pb, "AdamW: two moments per local element")
    if offloaded:
        state.nbytes = 0

    gathered = cb if (f.bf16 or shards > 1) else 0  # bytes per element of a gathered copy
    biggest = max(layers, key=lambda u: u.numel, default=root)
    reduce_copy = rb if rb != cb else 0
    unit_grad = biggest.trainable * (cb + reduce_copy) + math.ceil(biggest.trainable / shards) * rb
    if strategy == "SHARD_GRAD_OP":  # no reshard after forward: every unit stays gathered until its backward
        largest = Term(sum(u.numel for u in layers) * gathered + unit_grad,
                       "every unit gathered from forward to backward (SHARD_GRAD_OP) + gradient")
    else:
        gradient = (f" + gradient {cb} B" + (f" + reduce copy {reduce_copy} B" if reduce_copy else "")
                    if biggest.trainable else " (frozen: no gradient)")
        largest = Term(2 * biggest.numel * gathered + unit_grad,
                       f"{biggest.numel / 1e6:.0f}M parameters: 2 gathered x {gathered} B" + gradient)
    root_unit = Term(root.numel * gathered + root.trainable * cb,
                     f"{root.numel / 1e6:.0f}M parameters: gathered {gathered} B" +
                     (f" + gradient {cb} B" if root.trainable else " (frozen: no gradient)"))

    tokens = t.per_device_train_batch_size * data.sequence_tokens
    text, vision = skeleton.model.config.text_config, skeleton.model.config.vision_config
    kernels = linear_attention_kernels()
    layer_bytes = [per_token * tokens for per_token in layer_activation_bytes(text, cb, kernels)]
    patches = tokens * vision.spatial_merge_size**2
    per_block = vision_block_activation_bytes(vision, cb) * patches
    around = tokens * (4 * text.hidden_size + 3 * cb * text.hidden_size)  # embeddings, final norm, lm_head input

    def activations(checkpointed: bool) -> int:
        if checkpointed:  # each layer's input, plus one layer recomputed and its gradients
            return (text.num_hidden_layers * tokens * text.hidden_size * cb + 2 * max(layer_bytes)
                    + vision.depth * patches * vision.hidden_size * cb + 2 * per_block + around)
        return sum(layer_bytes) + max(layer_bytes) + (vision.depth + 1) * per_block + around

    packed_mask = None
    if data.packing and m.attention(f.bf16) != "flash_attention_2":
        # sdpa attends by a dense mask built from the packed positions: a boolean per (query, key) pair, converted
        # to the query dtype.
        pairs = t.per_device_train_batch_size * data.sequence_tokens**2
        packed_mask = Term(pairs * (1 + cb), f"{t.per_device_train_batch_size} x {data.sequence_tokens}^2 x (1 + {cb}) "
                                             "B (sdpa)")
    hybrid = "linear_attention" in (getattr(text, "layer_types", None) or [])
    deltanet = f"DeltaNet layers as {'the kernels' if kernels else 'the torch path'} run them, " if hybrid else ""
    acts = Term(activations(m.gradient_checkpointing), f"{tokens} tokens, {patches} patches at most, {deltanet}"
                f"gradient checkpointing {'on' if m.gradient_checkpointing else 'off'}")
    logits = loss_bytes(tokens, m.loss_chunk_size, text, cb, training=True)
    eval_tokens = t.per_device_eval_batch_size * data.max_seq_length
    eval_logits = loss_bytes(eval_tokens, m.loss_chunk_size, text, cb, training=False)
    export = Term(max(root.numel, biggest.numel) * pb, f"the largest unit gathered in {pb} B (the exports)")
    middle = (root_unit.nbytes + largest.nbytes + acts.nbytes + logits.nbytes
              + (packed_mask.nbytes if packed_mask else 0))
    root_reduce = root.trainable * (cb + reduce_copy) + math.ceil(root.trainable / shards) * rb
    evaluation = root.numel * gathered + 2 * biggest.numel * gathered + eval_logits.nbytes
    persistent = parameters.nbytes + gradients.nbytes + state.nbytes
    exporting = parameters.nbytes + state.nbytes + export.nbytes
    peak = max(persistent + max(middle, root_reduce, evaluation), exporting)
    reserve = reserve_bytes(strategy, peak, measured_free)
    plan = MemoryPlan(parameters, gradients, state, largest, root_unit, acts, packed_mask, logits, eval_logits,
                      export, reserve, activations(not m.gradient_checkpointing), peak + reserve.nbytes, gpu_bytes,
                      measured_free, shards, sum(u.numel for u in units))
    if strategy != f.sharding_strategy:
        plan.notes.append("one process: FSDP runs NO_SHARD")
    return plan


def _replace(cfg: Config, group: str, **values) -> Config:
    return dataclasses.replace(cfg, **{group: dataclasses.replace(getattr(cfg, group), **values)})


def _changes(cfg: Config) -> list[tuple[str, Config]]:
    """Single changes of flags that lower the peak, in the order they cost the user least, with their config."""
    changes = []
    if cfg.model.param_dtype == "fp32" and cfg.optim.optim == "adafactor":
        changes.append(("--param-dtype bf16", _replace(cfg, "model", param_dtype="bf16")))
    if not cfg.model.gradient_checkpointing:
        changes.append(("--gradient-checkpointing", _replace(cfg, "model", gradient_checkpointing=True)))
    if cfg.fsdp.sharding_strategy != "FULL_SHARD":
        changes.append(("--sharding-strategy FULL_SHARD", _replace(cfg, "fsdp", sharding_strategy="FULL_SHARD")))
    if cfg.fsdp.bf16 and cfg.fsdp.reduce_dtype == "fp32":
        changes.append(("--reduce-dtype bf16", _replace(cfg, "fsdp", reduce_dtype="bf16")))
    batch = cfg.train.per_device_train_batch_size
    if batch > 1:  # the same global batch in more, smaller micro-batches
        accumulation = cfg.train.gradient_accumulation_steps * 2
        changes.append((f"--per-device-train-batch-size {batch // 2} --gradient-accumulation-steps {accumulation}",
                        _replace(cfg, "train", per_device_train_batch_size=batch // 2,
                                 gradient_accumulation_steps=accumulation)))
    return changes


def fitting_change(skeleton: Skeleton, cfg: Config, world_size: int, gpus_per_node: int,
                   gpu_bytes: int, measured_free: bool = False) -> tuple[str, MemoryPlan] | None:
    """The first single change of flags whose plan fits; failing that, the fewest of them applied one after
    the other; None when even all of them do not fit. (None of the changes changes which units there are, so the
    skeleton serves them all.)"""
    for flags, changed in _changes(cfg):
        plan = plan_memory(skeleton, changed, world_size, gpus_per_node, gpu_bytes, measured_free)
        if plan.fits():
            return flags, plan
    applied, current = [], cfg
    while changes := _changes(current):
        flags, current = changes[0]
        applied.append(flags)
        plan = plan_memory(skeleton, current, world_size, gpus_per_node, gpu_bytes, measured_free)
        if plan.fits():
            return " ".join(applied), plan
    return None


def verdict(skeleton: Skeleton, plan: MemoryPlan, cfg: Config, world_size: int, gpus_per_node: int) -> str:
    """One line: the peak against the GPU, and when it does not fit, what would."""
    line = f"memory plan: {gib(plan.peak_bytes)} per GPU of {gib(plan.gpu_bytes)} on {world_size} GPU(s)"
    if plan.fits():
        return line + f": fits, {gib(plan.gpu_bytes - plan.peak_bytes)} to spare"
    shown = [(name, term) for name, term in plan.terms()
             if name not in ("eval logits", "export", "reserve", "packed mask")]
    line += f": does not fit ({', '.join(f'{name} {gib(term.nbytes)}' for name, term in shown)})"
    found = fitting_change(skeleton, cfg, world_size, gpus_per_node, plan.gpu_bytes, plan.measured_free)
    if found:
        flags, better = found
        return line + f"; {flags} brings it to {gib(better.peak_bytes)}"
    return line + "; no flag makes it fit: use more GPUs (--nnodes) or a smaller --max-seq-length"


def check_fits(skeleton: Skeleton, cfg: Config, world_size: int, gpus_per_node: int, free_bytes: int) -> None:
    """Raise ConfigError (one line, the figures and the flag to change) when the run cannot fit its GPUs, each with
    `free_bytes` free once the process group exists (`torch.cuda.mem_get_info`)."""
    plan = plan_memory(skeleton, cfg, world_size, gpus_per_node, free_bytes, measured_free=True)
    if not plan.fits():
        raise ConfigError(verdict(skeleton, plan, cfg, world_size, gpus_per_node))


def gib(nbytes: int | None) -> str:
    return "?" if nbytes is None else f"{nbytes / GIB:.1f} GiB"


def report(plan: MemoryPlan) -> str:
    """The per-GPU table `python -m ftloop.plan` prints."""
    rows = [f"{'sharded over':<20} {plan.shards} GPU(s), {plan.parameters / 1e9:.2f}B parameters"]
    for name, term in plan.terms():
        rows.append(f"{name:<20} {gib(term.nbytes):>10}   {term.detail}")
    other = "off" if plan.activations.detail.endswith("on") else "on"
    rows.append(f"{'  checkpointing ' + other:<20} {gib(plan.activations_other):>10}   the activations with "
                f"gradient checkpointing {other}")
    rows.append(f"{'peak':<20} {gib(plan.peak_bytes):>10}   persistent + max(mid-backward, root reduce, evaluation)"
                " + reserve")
    return "\n".join(rows + [f"note: {n}" for n in plan.notes])


@dataclass
class GPUArgs:
    nproc_per_node: int = 8
    """GPUs (processes) per node."""
    nnodes: int = 1
    """Nodes."""
    gpu_memory_gib: float = 80.0
    """Memory of one GPU in GiB (an 80 GB H100 has 79.6)."""


@dataclass
class PlanCommand:
    gpus: GPUArgs = field(default_factory=GPUArgs)
    run: Config = field(default_factory=Config)

    def check(self) -> None:
        """The run's flags as ftloop.train checks them (data flags are not needed, but given ones must exist), and
        the GPUs'."""
        self.run.check(need_data=False)
        check_sources(self.run.data)
        if self.gpus.nproc_per_node < 1 or self.gpus.nnodes < 1 or self.gpus.gpu_memory_gib <= 0:
            raise ConfigError("--nproc-per-node and --nnodes must be positive, --gpu-memory-gib above 0")

    @property
    def world_size(self) -> int:
        return self.gpus.nproc_per_node * self.gpus.nnodes

    def plan(self) -> tuple[Skeleton, MemoryPlan]:
        """The skeleton the run would wrap (from its config.json alone), and its plan."""
        skeleton = build_skeleton(self.run, load_config(self.run.model))
        return skeleton, plan_memory(skeleton, self.run, self.world_size, self.gpus.nproc_per_node,
                                     int(self.gpus.gpu_memory_gib * GIB))


def parse(argv: list[str] | None) -> PlanCommand:
    return tyro.cli(PlanCommand, args=argv, config=(tyro.conf.OmitArgPrefixes,), prog="python -m ftloop.plan",
                    description=__doc__.split("\n\n")[0])


def main(argv: list[str] | None = None) -> int:
    """Print the plan; 0 when it fits, 2 when it does not (ftloop.cli.run_command leaves with it)."""
    command = parse(argv)
    command.check()
    skeleton, plan = command.plan()
    print(f"{command.run.model.model_name_or_path}: per GPU, {command.world_size} GPU(s) of "
          f"{command.gpus.gpu_memory_gib:g} GiB")
    print(report(plan))
    print(verdict(skeleton, plan, command.run, command.world_size, command.gpus.nproc_per_node))
    return 0 if plan.fits() else 2


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_command(main)
