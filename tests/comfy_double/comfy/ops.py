"""Double of `comfy.ops` (ComfyUI 0.33.0 signatures): the layer namespaces and weight casting ComfyUI's loader uses.

`cast_bias_weight` / `uncast_bias_weight` / `CastBiasWeightContext` have the 2026 shapes; tests emulate older
ComfyUI versions by removing `CastBiasWeightContext` or swapping in a two-value `cast_bias_weight`. Casts are
recorded in `CASTS` (layer class name, dtype) so tests can see that ComfyUI's path ran.
"""
from __future__ import annotations

import torch

from . import model_management

CASTS: list[tuple[str, torch.dtype]] = []


def run_every_op():
    model_management.throw_exception_if_processing_interrupted()


def cast_bias_weight(s, input=None, dtype=None, device=None, bias_dtype=None, offloadable=False, compute_dtype=None,
                     want_requant=False):
    if input is not None:
        dtype = input.dtype if dtype is None else dtype
        bias_dtype = dtype if bias_dtype is None else bias_dtype
        device = input.device if device is None else device
    CASTS.append((type(s).__name__, dtype))
    weight = s.weight.to(device=device, dtype=dtype, copy=True)
    bias = s.bias.to(device=device, dtype=bias_dtype, copy=True) if s.bias is not None else None
    for f in s.weight_function:
        weight = f(weight)
    for f in s.bias_function:
        bias = f(bias)
    return (weight, bias, (None, None, None)) if offloadable else (weight, bias)


def uncast_bias_weight(s, weight, bias, offload_stream):
    if offload_stream is None:
        return


class CastBiasWeightContext:
    def __init__(self, *args, **kwargs):
        self.slf = args[0] if len(args) else None
        self.state = (None, None) if self.slf is None else cast_bias_weight(*args, **kwargs)

    def __enter__(self):
        return self.state[:2]

    def __exit__(self, *_args) -> None:
        if self.slf is not None and len(self.state) == 3:
            uncast_bias_weight(self.slf, *self.state)


class CastWeightBiasOp:
    comfy_cast_weights = False
    weight_function = []
    bias_function = []


class disable_weight_init:
    class Linear(torch.nn.Linear, CastWeightBiasOp):
        def reset_parameters(self):
            return None

        def forward_comfy_cast_weights(self, input):
            with CastBiasWeightContext(self, input, offloadable=True) as (weight, bias):
                return torch.nn.functional.linear(input, weight, bias)

        def forward(self, *args, **kwargs):
            run_every_op()
            if self.comfy_cast_weights or len(self.weight_function) > 0 or len(self.bias_function) > 0:
                return self.forward_comfy_cast_weights(*args, **kwargs)
            return super().forward(*args, **kwargs)

    class Conv2d(torch.nn.Conv2d, CastWeightBiasOp):
        def reset_parameters(self):
            return None

        def forward_comfy_cast_weights(self, input):
            with CastBiasWeightContext(self, input, offloadable=True) as (weight, bias):
                return self._conv_forward(input, weight, bias)

        def forward(self, *args, **kwargs):
            run_every_op()
            if self.comfy_cast_weights or len(self.weight_function) > 0 or len(self.bias_function) > 0:
                return self.forward_comfy_cast_weights(*args, **kwargs)
            return super().forward(*args, **kwargs)

    class Conv3d(torch.nn.Conv3d, CastWeightBiasOp):
        def reset_parameters(self):
            return None

        def _conv_forward(self, input, weight, bias, autopad=None, *args, **kwargs):
            return super()._conv_forward(input, weight, bias, *args, **kwargs)

        def forward_comfy_cast_weights(self, input, autopad=None):
            with CastBiasWeightContext(self, input, offloadable=True) as (weight, bias):
                return self._conv_forward(input, weight, bias, autopad=autopad)

        def forward(self, *args, **kwargs):
            run_every_op()
            if self.comfy_cast_weights or len(self.weight_function) > 0 or len(self.bias_function) > 0:
                return self.forward_comfy_cast_weights(*args, **kwargs)
            return super().forward(*args, **kwargs)


class manual_cast(disable_weight_init):
    class Linear(disable_weight_init.Linear):
        comfy_cast_weights = True

    class Conv2d(disable_weight_init.Conv2d):
        comfy_cast_weights = True

    class Conv3d(disable_weight_init.Conv3d):
        comfy_cast_weights = True


def pick_operations(weight_dtype, compute_dtype, load_device=None, disable_fast_fp8=False, fp8_optimizations=False,
                    model_config=None):
    if compute_dtype is None or weight_dtype == compute_dtype:
        return disable_weight_init
    return manual_cast
