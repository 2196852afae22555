"""LoRA weights fused into the networks at build time, so the compiled model runs at full speed.

``--lora FILE[:SCALE]`` (repeatable) names a ``.safetensors`` LoRA in the diffusers / PEFT format
(``unet.<module>.lora_A.weight`` / ``lora_B``, or the older ``lora.down`` / ``lora.up``) or the kohya-ss
format (``lora_unet_<module_with_underscores>.lora_down.weight`` / ``lora_up`` / ``alpha``; ``lora_te_``,
``lora_te1_``, ``lora_te2_`` for the text encoders). Each pair's product is added to the layer's weight
with the LoRA's scale, one LoRA after the other (their deltas add up): what is exported is the plain
networks with changed weights, so the compiled model runs at full speed. A LoRA that does not fit (made
for another architecture: a layer this model lacks, or other shapes) is one error naming the file and
the layer, and changes nothing.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mlcweb.errors import MlcwebError

if TYPE_CHECKING:
    from .models import Networks

__all__ = ["LoraSpec", "fuse_loras", "parse_lora"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoraSpec:
    path: Path
    scale: float = 1.0

    def sha256(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


def parse_lora(text: object) -> LoraSpec:
    """``FILE`` or ``FILE:SCALE`` (a scale from -10 to 10; the file must exist)."""
    if not isinstance(text, str) or not text:
        raise MlcwebError(f"--lora {text!r} is not FILE or FILE:SCALE")
    path, scale = text, 1.0
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            scale = float(tail)
            path = head
        except ValueError:
            pass  # a colon inside the path, no scale
    if not -10 <= scale <= 10:
        raise MlcwebError(f"--lora {text}: the scale must be between -10 and 10, not {scale}")
    file = Path(path).expanduser()
    if not file.is_file():
        raise MlcwebError(f"--lora {file} does not exist; pass a LoRA .safetensors file")
    return LoraSpec(file, scale)


# Key prefixes of the formats: diffusers / PEFT ("unet.", "text_encoder.", "text_encoder_2.") and
# kohya-ss ("lora_unet_", "lora_te_" or "lora_te1_", "lora_te2_"), to the network they address.
_DIFFUSERS_PREFIXES = {"unet.": "unet", "text_encoder.": "clip", "text_encoder_2.": "clip2"}
_KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "clip", "lora_te1_": "clip", "lora_te2_": "clip2"}
# The two matrices of a pair, by the suffix each format gives them: (down/A, up/B).
_PAIR_SUFFIXES = (
    (".lora_A.weight", ".lora_B.weight"),
    (".lora.down.weight", ".lora.up.weight"),
    (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),
    (".lora_down.weight", ".lora_up.weight"),
)


@dataclass
class _Pair:
    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None


def _read(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise MlcwebError(f"--lora {path} is not a readable .safetensors file ({err})") from err


def _pairs(tensors: dict[str, torch.Tensor], path: Path) -> dict[tuple[str, str], _Pair]:
    """``(network, layer key) -> pair``; the layer key is a module path (diffusers) or its kohya
    spelling (dots as underscores), resolved against the network later."""
    pairs: dict[tuple[str, str], _Pair] = {}
    for key, value in tensors.items():
        for down_suffix, up_suffix in _PAIR_SUFFIXES:
            if not key.endswith(down_suffix):
                continue
            stem = key[: -len(down_suffix)]
            up = tensors.get(stem + up_suffix)
            if up is None:
                raise MlcwebError(f"--lora {path}: {key} has no matching {stem + up_suffix}")
            alpha = tensors.get(stem + ".alpha")
            for prefixes in (_DIFFUSERS_PREFIXES, _KOHYA_PREFIXES):
                prefix = next((p for p in prefixes if stem.startswith(p)), None)
                if prefix is not None:
                    network = prefixes[prefix]
                    pairs[(network, stem[len(prefix) :])] = _Pair(
                        value.float(), up.float(), None if alpha is None else float(alpha)
                    )
                    break
            else:
                raise MlcwebError(f"--lora {path}: {key} addresses no network this plugin knows (UNet, text encoders)")
    if not pairs:
        raise MlcwebError(f"--lora {path} holds no LoRA pairs (lora_A/lora_B, lora_down/lora_up, ...)")
    return pairs


def _delta(pair: _Pair, shape: torch.Size, scale: float) -> torch.Tensor:
    rank = pair.down.shape[0]
    factor = scale * ((pair.alpha if pair.alpha is not None else rank) / rank)
    delta = pair.up.flatten(1) @ pair.down.flatten(1)
    return (factor * delta).reshape(shape)


def _apply(nets: Networks, lora: LoraSpec) -> int:
    modules = {"unet": nets.unet, "clip": nets.clip, "clip2": nets.clip2}
    by_name: dict[str, dict[str, torch.nn.Module]] = {}
    for network, module in modules.items():
        if module is None:
            continue
        named = dict(module.named_modules())
        # kohya spells module paths with underscores; text encoders' paths start at "text_model."
        by_name[network] = {**{n.replace(".", "_"): m for n, m in named.items()}, **named}
    updates: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    for (network, layer), pair in _pairs(_read(lora.path), lora.path).items():
        target = by_name.get(network, {}).get(layer)
        if target is None:
            raise MlcwebError(
                f"--lora {lora.path} does not fit this model: it changes {layer} of the "
                f"{network}, which has no such layer (a LoRA for another architecture?)"
            )
        weight = getattr(target, "weight", None)
        if not isinstance(weight, torch.nn.Parameter) or pair.up.shape[0] * pair.down[0].numel() != weight.numel():
            shape = None if weight is None else tuple(weight.shape)
            raise MlcwebError(
                f"--lora {lora.path} does not fit this model: {layer} of the {network} has weights of shape "
                f"{shape}, the LoRA's are {tuple(pair.up.shape)} x {tuple(pair.down.shape)}"
            )
        updates.append((weight, _delta(pair, weight.shape, lora.scale)))
    with torch.no_grad():  # only after every pair was checked: a bad file changes nothing
        for weight, delta in updates:
            weight.add_(delta.to(weight.dtype))
    return len(updates)


def fuse_loras(nets: Networks, loras: list[LoraSpec]) -> None:
    """Fuse each LoRA into ``nets`` (in place) with its scale: ``W += scale * alpha / rank * up @ down``
    (alpha defaults to the rank, as PEFT's does)."""
    for lora in loras:
        count = _apply(nets, lora)
        log.info("fused %s (scale %g) into %d weights", lora.path, lora.scale, count)
