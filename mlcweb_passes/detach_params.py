"""Parameter detaching: split the weights off a module imported with ``keep_params_as_input``.

Frontends such as ``relax.frontend.torch.from_exported_program(..., keep_params_as_input=True)``
produce a ``main`` whose trailing arguments are the model weights (``num_input`` counts the user
inputs) and keep the weight values in the function's ``params`` attribute. Compilers and artifact
writers need the two apart: a module without embedded tensors (cheap to copy, hash and print) and an
ordered name -> tensor mapping whose names are stable across runs, so tensor-cache files and manifests
are reproducible.
"""

from __future__ import annotations

import re
from collections import OrderedDict

import tvm
from tvm import relax

__all__ = ["ParamNameError", "detach_params", "param_names", "unique_param_names"]

_VALID = re.compile(r"[^0-9A-Za-z_.]")


class ParamNameError(ValueError):
    """Two parameters map to one name, or the module does not carry its parameters."""


def param_names(func: relax.Function) -> list[str]:
    """Names of the weight arguments of ``func`` (the arguments after ``num_input``), in order."""
    num_input = func.attrs["num_input"] if func.attrs and "num_input" in func.attrs else len(func.params)
    names = [_VALID.sub("_", p.name) for p in func.params[int(num_input) :]]
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in seen:
            raise ParamNameError(
                f"parameters {seen[name]} and {i} of the function are both named {name!r}; "
                "rename the module's weights so every name is unique"
            )
        seen[name] = i
    return names


def unique_param_names(func: relax.Function) -> list[str]:
    """Like :func:`param_names`, but repeated names get ``_1``, ``_2``... in argument order.

    For functions made by passes (``LiftTransformParams`` after ``ToMixedPrecision`` can give two lifted
    weights the same binding name); deterministic, so artifact names stay reproducible.
    """
    num_input = func.attrs["num_input"] if func.attrs and "num_input" in func.attrs else len(func.params)
    names: list[str] = []
    seen: set[str] = set()
    for p in func.params[int(num_input) :]:
        base = name = _VALID.sub("_", p.name)
        k = 0
        while name in seen:
            k += 1
            name = f"{base}_{k}"
        seen.add(name)
        names.append(name)
    return names


def detach_params(
    mod: tvm.IRModule, func_name: str = "main"
) -> tuple[tvm.IRModule, OrderedDict[str, tvm.runtime.Tensor]]:
    """Return ``(module without the params attribute, {name: tensor})`` for ``func_name``.

    The mapping is ordered like the function's weight arguments, so ``list(params.values())``
    can be passed straight after the user inputs. Names are the argument names with characters
    outside ``[0-9A-Za-z_.]`` replaced by ``_`` (torch.export already names them ``p_<path>``).
    """
    if func_name not in [gv.name_hint for gv in mod.get_global_vars()]:
        raise KeyError(f"module has no function {func_name!r}")
    func = mod[func_name]
    if not isinstance(func, relax.Function):
        raise TypeError(f"{func_name!r} is not a Relax function")
    names = param_names(func)
    stripped, detached = relax.frontend.detach_params(mod)
    values = list(detached.get(func_name, []))
    if len(values) != len(names):
        raise ParamNameError(
            f"{func_name!r} has {len(names)} weight arguments but carries {len(values)} values in its "
            "'params' attribute; import the model with keep_params_as_input=True"
        )
    return stripped, OrderedDict(zip(names, values, strict=True))
