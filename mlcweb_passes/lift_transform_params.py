"""Weight lifting: move every computation that depends only on weights out of the model.

Imported models re-do weight-only work on each call: ``permute_dims`` of linear weights, casts to
float16 inserted by mixed precision, constant folding that could not fold because the weights are
inputs. ``relax.transform.LiftTransformParams`` collects that work into ``<func>_transform_params``;
:func:`split_transform_params` then separates it into its own module so the transform can be run once
at build time (on the CPU) and only the deploy module is compiled for the device. The deploy module's
weight arguments are the transform's outputs, in the same order.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import tvm
from tvm import relax

from .module_utils import RemoveUnusedFunctions
from .pipeline import pipeline

__all__ = ["LiftedModules", "apply_transform_params", "compile_transform", "split_transform_params"]

TRANSFORM_SUFFIX = "_transform_params"


@dataclass(frozen=True)
class LiftedModules:
    """The two halves of a lifted module.

    ``transform`` holds ``<func>_transform_params`` for each lifted function: it takes the original
    weights as one tuple and returns the deploy weights as a tuple. ``deploy`` holds the rewritten
    functions, whose trailing arguments (after ``num_input``) are those deploy weights.
    """

    transform: tvm.IRModule
    deploy: tvm.IRModule

    def transform_functions(self) -> list[str]:
        return sorted(gv.name_hint for gv in self.transform.get_global_vars())


def split_transform_params(mod: tvm.IRModule) -> LiftedModules:
    """Lift weight-only computation of every function with ``num_input`` and split the module.

    Functions without a ``num_input`` attribute are left in the deploy module untouched.
    """
    lifted = relax.transform.LiftTransformParams()(mod)
    names = [gv.name_hint for gv in lifted.get_global_vars()]
    transform_names = sorted(n for n in names if n.endswith(TRANSFORM_SUFFIX))
    if not transform_names:
        raise ValueError(
            "no function has a 'num_input' attribute, so there are no weights to lift; "
            "import the model with keep_params_as_input=True"
        )
    deploy_names = [n for n in names if n not in transform_names]
    transform = RemoveUnusedFunctions(transform_names)(lifted)
    deploy_entries = [n for n in deploy_names if isinstance(lifted[n], relax.Function) and _is_public(lifted[n])]
    deploy = RemoveUnusedFunctions(deploy_entries)(_without(lifted, transform_names))
    return LiftedModules(transform=transform, deploy=deploy)


def compile_transform(transform: tvm.IRModule, *, target: str = "llvm") -> relax.VirtualMachine:
    """Compile the transform module for the CPU once; pass the result to :func:`apply_transform_params`
    for each lifted function instead of recompiling the module per function."""
    tgt = tvm.target.Target(target)
    exe = tvm.compile(transform, tgt, relax_pipeline=pipeline(tgt))
    return relax.VirtualMachine(exe, tvm.cpu())


def apply_transform_params(
    transform: tvm.IRModule | relax.VirtualMachine,
    params: Sequence[tvm.runtime.Tensor] | OrderedDict[str, tvm.runtime.Tensor],
    func_name: str = "main",
    *,
    target: str = "llvm",
) -> list[tvm.runtime.Tensor]:
    """Run ``<func_name>_transform_params`` on ``params``, compiling ``transform`` first if it is a module.

    Returns the deploy weights, ready to pass after the user inputs of the deploy function.
    """
    values = list(params.values()) if isinstance(params, OrderedDict) else list(params)
    vm = transform if isinstance(transform, relax.VirtualMachine) else compile_transform(transform, target=target)
    out = vm[func_name + TRANSFORM_SUFFIX](values)
    return [out[i] for i in range(len(out))]


def _is_public(func: relax.Function) -> bool:
    return func.attrs is not None and "global_symbol" in func.attrs


def _without(mod: tvm.IRModule, names: Sequence[str]) -> tvm.IRModule:
    out = tvm.IRModule({gv: f for gv, f in mod.functions.items() if gv.name_hint not in names}, attrs=mod.attrs)
    return out
