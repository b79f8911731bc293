"""LoRA adapters through peft: put on the meta skeleton before FSDP wraps it, given their first values, written as
the folder `PeftModel.from_pretrained(base, folder)` loads, and merged into the base weights for export.

peft's `inject_adapter_in_model` replaces each targeted nn.Linear in place: the Linear moves to
`<name>.base_layer` (read from the model folder under its own name: `ftloop.model.clean_name` drops
`base_layer.`), beside two new matrices `<name>.lora_A.default` (rank x in) and `<name>.lora_B.default`
(out x rank), and every other parameter is frozen. FSDP1 flattens a unit into one tensor of one dtype and one
requires_grad, so each adapter matrix is wrapped as a unit of its own (trainable, in the master dtype) inside
its frozen decoder layer (in bf16 under --bf16: a frozen weight needs no fp32 master). peft is imported only
when adapters are asked for: it is an optional dependency (`pip install 'ftloop[lora]'`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import zlib

import torch
from torch import nn

from ftloop.config import Config, LoraArgs
from ftloop.errors import ConfigError

ADAPTER_NAME = "default"  # peft's name for the one adapter; its saved keys leave it out
ADAPTER_DIR = "adapter"  # `final/adapter`, `best/adapter`
ADAPTER_WEIGHTS = "adapter_model.safetensors"
SCOPES = (("--lora-target-modules", "lora_target_modules", r"model\.language_model\.layers\.\d+", "decoder layer"),
          ("--lora-vision-target-modules", "lora_vision_target_modules", r"model\.visual\.blocks\.\d+",
           "vision block"))


def _peft():
    try:
        import peft
    except ImportError:
        raise ConfigError("--lora-rank needs peft, an optional dependency: pip install 'ftloop[lora]'") from None
    return peft


def base_dtype(cfg: Config) -> str:
    """The dtype the model's own weights are held in: the master dtype, but bf16 for a frozen LoRA base under
    --bf16 (it is only ever read, in bf16)."""
    return "bf16" if cfg.lora.lora_rank and cfg.fsdp.bf16 else cfg.model.param_dtype


def target_pattern(args: LoraArgs) -> str:
    """The regex over module names (peft full-matches it) of the projections that get adapters."""
    parts = [rf"{scope}\.(?:.+\.)?(?:{'|'.join(map(re.escape, getattr(args, attribute)))})"
             for _, attribute, scope, _ in SCOPES if getattr(args, attribute)]
    return "|".join(f"(?:{part})" for part in parts)


def check_targets(hf_model: nn.Module, args: LoraArgs) -> None:
    """Every projection name given by flag must be a linear layer of some decoder layer (or vision block); of the
    default names, those a model lacks are skipped (Qwen2.5-VL has no DeltaNet), but one must be there."""
    linear = [name for name, module in hf_model.named_modules() if isinstance(module, nn.Linear)]
    for flag, attribute, scope, what in SCOPES:
        inside = [name for name in linear if re.match(rf"{scope}\.", name)]
        targets = getattr(args, attribute)
        default = targets == next(f.default for f in dataclasses.fields(LoraArgs) if f.name == attribute)
        missing = [target for target in targets
                   if not any(re.fullmatch(rf"{scope}\.(?:.+\.)?{re.escape(target)}", name) for name in inside)]
        if missing and (not default or len(missing) == len(targets)):
            known = sorted({re.sub(rf"^{scope}\.", "", name) for name in inside})
            raise ConfigError(f"{flag} {missing[0]}: no linear layer of that name in a {what} of "
                              f"{type(hf_model).__name__}; its {what}s have {', '.join(known)}")


def lora_config(args: LoraArgs, base_model_name_or_path: str | None = None):
    return _peft().LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                              target_modules=target_pattern(args), bias="none",
                              base_model_name_or_path=base_model_name_or_path)


def add_adapters(hf_model: nn.Module, args: LoraArgs, dtype: torch.dtype) -> set[nn.Module]:
    """Put adapters on a meta skeleton, in place (peft freezes everything else); returns the adapter matrices'
    modules, in `dtype`: FSDP wraps each as a unit of its own."""
    peft = _peft()
    check_targets(hf_model, args)
    peft.inject_adapter_in_model(lora_config(args), hf_model, adapter_name=ADAPTER_NAME)
    adapters = set()
    for module in hf_model.modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            # peft casts the input to the dtype `lora_A.weight` has when the layer runs: under FSDP the master's
            # (the adapter's unit gathers later), not the compute dtype its unit then runs in; the input already
            # has the compute dtype (its base layer's).
            module.cast_input_dtype_enabled = False
            for matrix in (module.lora_A[ADAPTER_NAME], module.lora_B[ADAPTER_NAME]):
                adapters.add(matrix.to(dtype))
    return adapters


def is_adapter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def initial_adapter(name: str, meta: torch.Tensor, seed: int) -> torch.Tensor | None:
    """An adapter matrix's first value (None for a parameter that is not one), as peft's default
    initialisation: A Kaiming-uniform (nn.Linear's own initialisation), B zero, so the adapted model starts as
    the base. Drawn from a generator seeded by the seed and the name: the same on every rank and at every world
    size, with nothing to broadcast."""
    if not is_adapter(name):
        return None
    if ".lora_B." in name:
        return torch.zeros(meta.shape, dtype=meta.dtype)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    value = torch.empty(meta.shape, dtype=torch.float32)
    nn.init.kaiming_uniform_(value, a=math.sqrt(5), generator=generator)
    return value.to(meta.dtype)


def adapter_key(name: str) -> str:
    """The key of adapter parameter `name` (the model's, as `clean_name` gives it) in adapter_model.safetensors:
    peft's, under its PeftModel prefix, without the adapter's name."""
    return "base_model.model." + name.replace(f".{ADAPTER_NAME}.", ".")


def merged(name: str, weight: torch.Tensor, adapters: dict[str, torch.Tensor], args: LoraArgs) -> torch.Tensor:
    """`weight` (the base tensor called `name`) with its adapter added, W + (alpha / rank) B A, in fp32; the
    weight itself when no adapter targets it."""
    path = name.removesuffix(".weight")
    a, b = adapters.get(f"{path}.lora_A.{ADAPTER_NAME}.weight"), adapters.get(f"{path}.lora_B.{ADAPTER_NAME}.weight")
    if a is None or b is None:
        return weight
    scale = args.lora_alpha / args.lora_rank
    return weight.float() + scale * (b.to(weight.device, torch.float32) @ a.to(weight.device, torch.float32))


def write_adapter_folder(folder: str, adapters: dict[str, torch.Tensor], args: LoraArgs,
                         base_model_name_or_path: str) -> None:
    """adapter_model.safetensors (fp32: adapters are small, and `best` is read back exactly) and
    adapter_config.json, as peft's save_pretrained writes them."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    save_file({adapter_key(name): tensor.float().contiguous() for name, tensor in adapters.items()},
              os.path.join(folder, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    lora_config(args, base_model_name_or_path).save_pretrained(folder)


class AdapterWeights:
    """An adapter folder's tensors by the model's parameter names (what `load_weights_into` reads); a folder
    without the tensors of every name in `expected` is one ConfigError."""

    def __init__(self, folder: str, expected: list[str]):
        from safetensors.torch import load_file

        path = os.path.join(folder, ADAPTER_WEIGHTS)
        if not os.path.isfile(path):
            raise ConfigError(f"{folder}: no {ADAPTER_WEIGHTS} (was the run's output folder moved?)")
        self.tensors = load_file(path)
        missing = [name for name in expected if adapter_key(name) not in self.tensors]
        if missing:
            raise ConfigError(f"{path}: holds no {adapter_key(missing[0])} (and {len(missing) - 1} more): not the "
                              "adapters of this run's --lora-rank and targets")

    def read(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        return self.tensors[adapter_key(name)].to(dtype)


