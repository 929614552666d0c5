"""Numeric formats and execution knobs of the DiTs: fp16, fp8 weight storage, attention backends, compile.

fp16: the official fp16 run overflows (NaN, black video; FACTS 8.1) because the residual streams and the
branch outputs added to them exceed 65504. The DiTs here keep the residual streams in fp32 whenever the
compute dtype is fp16 (`configure_dit(model, residual_dtype=...)`, default automatic); every Linear and
attention kernel still runs in fp16 (see `pyramid_core.models.layers.Linear`).

fp8: Linear weights stored as float8_e4m3fn plus an fp32 scale (per output row or per tensor), dequantised
to the compute dtype (bf16 or fp16) at each call. Parameter names stay the official ones
(`...to_q.weight`); the scale is an extra buffer `...to_q.weight_scale`. Kijai's unscaled fp8 files
(loaded with `load_dit(..., dtype=None)`) are wrapped with a unit scale (`wrap_fp8_checkpoint`).
"""
from __future__ import annotations

import fnmatch
import inspect
import types
import warnings
from typing import Callable, Iterable

import torch
from torch import nn

from .settings import FP8_GRANULARITIES
from .models.attention import attention_backends, register_attention_backend, set_attention_backend
from .models.dit import DiTSettings, configure_dit
from .models.layers import mixed_precision_linear, residual_dtype_for
from .models.operations import on_device_of

__all__ = [
    "DEFAULT_FP8_KEEP",
    "DiTSettings",
    "FP8_GRANULARITIES",
    "Fp8Linear",
    "apply_fp8_storage",
    "attention_backends",
    "compile_blocks",
    "configure_dit",
    "configure_dit_precision",
    "fp8_dequantize",
    "fp8_quantize",
    "has_fp8_weights",
    "quantize_linear_fp8",
    "register_attention_backend",
    "residual_dtype_for",
    "set_attention_backend",
    "set_residual_dtype",
    "wrap_fp8_checkpoint",
]

FP8_MAX = 448.0  # largest finite float8_e4m3fn
# embedders, final norm/projection: small, and they set the scale of everything downstream
DEFAULT_FP8_KEEP = ("x_embedder", "context_embedder", "time_text_embed", "pos_embed", "norm_out", "proj_out")
_HALF = (torch.float16, torch.bfloat16)


FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)  # torch >= 2.1, the floor


def fp8_quantize(weight: torch.Tensor, granularity: str = "row") -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] -> (float8_e4m3fn weight, fp32 scale) with weight ~= q * scale.

    granularity 'row': one scale per output channel, shape [out, 1]; 'tensor': one scale, shape [].
    """
    fp8 = torch.float8_e4m3fn
    if granularity not in FP8_GRANULARITIES:
        raise ValueError(f"fp8 granularity must be one of {FP8_GRANULARITIES}, got {granularity!r}")
    if weight.dim() != 2:
        raise ValueError(f"fp8_quantize expects a 2-D Linear weight, got shape {tuple(weight.shape)}")
    w = weight.detach().float()
    amax = w.abs().amax(dim=1, keepdim=True) if granularity == "row" else w.abs().amax()
    scale = (amax / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    q = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(fp8)
    return q, scale


def fp8_dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """q * scale in `dtype` (fp8 -> bf16/fp16 is exact; one rounding for the product)."""
    return q.to(dtype) * scale.to(dtype)


def _scaled_mm_supported(device: torch.device) -> bool:
    if device.type != "cuda" or not hasattr(torch, "_scaled_mm"):
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


class Fp8Linear(nn.Module):
    """A Linear whose weight is stored in float8_e4m3fn with an fp32 scale; computes in `compute_dtype`.

    State dict: `weight` (fp8, official name), `bias` (compute dtype), `weight_scale` (fp32, [out, 1] or []).
    `.to(device)` moves all three. (`.to(dtype)` would upcast the stored fp8 weight; still correct, no saving.)
    `use_scaled_mm`: on CUDA sm89+, run torch._scaled_mm with fp8 activations (per-token scales) instead of
    dequantising; faster, less accurate, experimental - falls back to dequantising if the kernel refuses.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        scale: torch.Tensor,
        bias: torch.Tensor | None,
        compute_dtype: torch.dtype = torch.bfloat16,
        use_scaled_mm: bool = False,
    ):
        super().__init__()
        if weight.dtype not in FP8_DTYPES:
            raise ValueError(f"Fp8Linear needs a float8 weight, got {weight.dtype}")
        self.out_features, self.in_features = weight.shape
        self.compute_dtype = compute_dtype
        self.use_scaled_mm = use_scaled_mm
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(compute_dtype), requires_grad=False)
        self.register_buffer("weight_scale", scale.detach().float())

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight in `dtype` (default: compute dtype)."""
        return fp8_dequantize(self.weight, self.weight_scale, dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_scaled_mm and self._scaled_mm_applies(x):
            try:
                return self._scaled_mm(x)
            except (RuntimeError, NotImplementedError) as exc:  # shape/arch the kernel refuses: dequantise from now on
                warnings.warn(f"torch._scaled_mm unavailable ({exc}); Fp8Linear falls back to dequantising")
                self.use_scaled_mm = False
        bias = None if self.bias is None else on_device_of(self.bias, x).to(self.compute_dtype)
        weight = fp8_dequantize(on_device_of(self.weight, x), on_device_of(self.weight_scale, x), self.compute_dtype)
        return mixed_precision_linear(x, weight, bias)

    def _scaled_mm_applies(self, x: torch.Tensor) -> bool:
        return (x.dtype == self.compute_dtype == torch.bfloat16 and self.weight.dtype == torch.float8_e4m3fn
                and _scaled_mm_supported(x.device))

    def _scaled_mm(self, x: torch.Tensor) -> torch.Tensor:
        fp8 = self.weight.dtype
        rows = x.reshape(-1, self.in_features)
        x_scale = (rows.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp_min(1e-12)
        x_q = (rows / x_scale).clamp(-FP8_MAX, FP8_MAX).to(fp8)
        w_scale = self.weight_scale.reshape(-1, 1).expand(self.out_features, 1).reshape(1, -1).contiguous()
        out = torch._scaled_mm(
            x_q, self.weight.t(), scale_a=x_scale, scale_b=w_scale, bias=self.bias, out_dtype=torch.bfloat16
        )
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        granularity = "tensor" if self.weight_scale.numel() == 1 else "row"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"{self.weight.dtype}, scale={granularity}, compute={self.compute_dtype}")


def quantize_linear_fp8(
    linear: nn.Linear, granularity: str = "row", compute_dtype: torch.dtype | None = None, use_scaled_mm: bool = False
) -> Fp8Linear:
    """An `Fp8Linear` holding `linear`'s weight in fp8 with per-row ('row') or per-tensor ('tensor') scale.

    A weight already stored in fp8 (Kijai's files) is wrapped as is with a unit scale.
    compute_dtype default: the weight's dtype when half, else bf16.
    """
    weight = linear.weight
    if compute_dtype is None:
        compute_dtype = weight.dtype if weight.dtype in _HALF else torch.bfloat16
    if weight.dtype in FP8_DTYPES:
        q, scale = weight.detach(), torch.ones((), dtype=torch.float32, device=weight.device)
    else:
        q, scale = fp8_quantize(weight, granularity)
    return Fp8Linear(q, scale, linear.bias, compute_dtype, use_scaled_mm)


def _kept(name: str, keep: Iterable[str]) -> bool:
    return any(name == k or name.startswith(k + ".") or fnmatch.fnmatchcase(name, k) for k in keep)


def _cast_rest(model: nn.Module, dtype: torch.dtype) -> None:
    """Every floating tensor outside Fp8Linear storage -> `dtype` (fp8 leftovers included)."""
    for module in model.modules():
        if isinstance(module, Fp8Linear):
            if module.bias is not None and module.bias.dtype != dtype:
                module.bias = nn.Parameter(module.bias.detach().to(dtype), requires_grad=False)
            module.compute_dtype = dtype
            continue
        for name, param in list(module._parameters.items()):
            if param is not None and param.is_floating_point() and param.dtype != dtype:
                module._parameters[name] = nn.Parameter(param.detach().to(dtype), requires_grad=False)
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.is_floating_point() and buf.dtype != dtype:
                module._buffers[name] = buf.to(dtype)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, (nn.ModuleList, nn.Sequential)):
        parent[int(attr)] = new
    else:
        setattr(parent, attr, new)


def apply_fp8_storage(
    model: nn.Module,
    granularity: str = "row",
    keep: Iterable[str] = DEFAULT_FP8_KEEP,
    compute_dtype: torch.dtype = torch.bfloat16,
    use_scaled_mm: bool = False,
) -> nn.Module:
    """Store every Linear weight of `model` in fp8 (in place); returns the model.

    keep: module names (or fnmatch patterns, e.g. '*.norm1.linear') left unquantised; a name also keeps its
    submodules. Everything not stored in fp8 (kept modules, norms, biases, buffers) is cast to
    `compute_dtype`, which is also the dtype to run the model in (latents/text embeddings in that dtype).
    Weights that are already fp8 are wrapped with a unit scale (kept modules are upcast instead).
    """
    if granularity not in FP8_GRANULARITIES:
        raise ValueError(f"fp8 granularity must be one of {FP8_GRANULARITIES}, got {granularity!r}")
    if compute_dtype not in (*_HALF, torch.float32):
        raise ValueError(f"compute_dtype must be bf16, fp16 or fp32, got {compute_dtype}")
    keep = tuple(keep)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and not _kept(name, keep):
            _replace(model, name, quantize_linear_fp8(module, granularity, compute_dtype, use_scaled_mm))
    _cast_rest(model, compute_dtype)
    return model


def wrap_fp8_checkpoint(model: nn.Module, compute_dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Make a model loaded from an unscaled fp8 file (Kijai's, `load_dit(..., dtype=None)`) runnable, in place.

    Linears with fp8 weights become `Fp8Linear` with a unit scale (no extra memory); every other tensor
    (norms, biases, conv, buffers; fp8 or not) is cast to `compute_dtype`. Linears stored in higher precision
    stay as they are (cast to `compute_dtype`).
    """
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and module.weight.dtype in FP8_DTYPES:
            _replace(model, name, quantize_linear_fp8(module, compute_dtype=compute_dtype))
    _cast_rest(model, compute_dtype)
    return model


def has_fp8_weights(model: nn.Module) -> bool:
    """Whether any parameter is stored in a float8 dtype."""
    return any(p.dtype in FP8_DTYPES for p in model.parameters())


def set_residual_dtype(model: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    """Residual-stream dtype of a DiT: None = automatic (fp32 under fp16 compute, else the compute dtype).

    torch.float16 reproduces the official fp16 flow (overflows on the real weights); torch.float32 under
    bf16 compute is a slightly more accurate, slightly slower variant of the official bf16 flow. Shorthand
    for `configure_dit(model, residual_dtype=dtype)`.
    """
    return configure_dit(model, residual_dtype=dtype)


def configure_dit_precision(
    model: nn.Module,
    compute_dtype: torch.dtype = torch.bfloat16,
    *,
    fp8: str | None = None,
    keep: Iterable[str] = DEFAULT_FP8_KEEP,
    residual_dtype: torch.dtype | None = None,
) -> nn.Module:
    """One call for the pipeline: weights/dtypes of a loaded DiT for running in `compute_dtype`.

    fp8=None: fp8 weights found in the model (Kijai file loaded with dtype=None) are wrapped with unit
    scales, everything else is cast to `compute_dtype`. fp8='row' | 'tensor': quantise Linear weights with
    that scale granularity (see `apply_fp8_storage`). The caller then feeds latents and text embeddings in
    `compute_dtype`. fp32 compute with fp8 storage is allowed (dequantised to fp32).
    """
    if compute_dtype not in (*_HALF, torch.float32):
        raise ValueError(f"compute_dtype must be bf16, fp16 or fp32, got {compute_dtype}")
    if fp8 is not None:
        apply_fp8_storage(model, fp8, keep, compute_dtype)
    elif has_fp8_weights(model):
        wrap_fp8_checkpoint(model, compute_dtype)
    else:
        _cast_rest(model, compute_dtype)
    set_residual_dtype(model, residual_dtype)
    return model


def compile_blocks(
    model: nn.Module, mode: str | None = None, *, backend: str | Callable = "inductor", dynamic: bool | None = True,
    recompile_limit: int | None = 64,
) -> nn.Module:
    """torch.compile each transformer block's `forward` in place; returns the model.

    Only `forward` is compiled (bound on the instance, so state-dict names are unchanged and
    `copy.deepcopy` rebinds it to the copy): the block's `__call__`, with its forward pre/post hooks (the
    memory manager's block-swap weight moves), runs eagerly around the graphs, never inside them. Blocks
    of one class share one compiled function, and so its graphs. The segmented attention (a Python loop
    over frames) is excluded via torch.compiler.disable, so each block compiles to graphs around it (not
    fullgraph). dynamic=True avoids a recompile per token count, which changes every unit and stage.
    `recompile_limit`: recompiles allowed per compiled function (dtype / layout variants), passed to
    torch.compile on torch versions that take it; older torch has only the process-wide dynamo limit,
    which is raised to at least this instead. None leaves dynamo's default. mode: torch.compile mode
    ('default', 'max-autotune', 'max-autotune-no-cudagraphs'; 'reduce-overhead' gains little here: the
    attention runs eagerly between graphs). Sets `model.compiled_blocks` (the settings used).
    """
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError(f"{type(model).__name__} has no `blocks`; compile_blocks expects a Pyramid Flow DiT")
    options = dict(backend=backend, mode=None if mode == "default" else mode, dynamic=dynamic)
    options.update(_recompile_limit_option(recompile_limit))
    compiled: dict[type, Callable] = {}
    for block in blocks:
        cls = type(block)
        if cls not in compiled:
            compiled[cls] = torch.compile(cls.forward, **options)
        block.forward = types.MethodType(compiled[cls], block)  # instance attribute: _call_impl calls it
    model.compiled_blocks = {"backend": backend, "mode": mode, "dynamic": dynamic}
    return model


def _recompile_limit_option(limit: int | None) -> dict[str, int]:
    """torch.compile's own `recompile_limit` where it exists; else raise dynamo's process-wide limit."""
    if limit is None:
        return {}
    if "recompile_limit" in inspect.signature(torch.compile).parameters:
        return {"recompile_limit": limit}
    import torch._dynamo as dynamo  # a plain `import torch._dynamo` would make `torch` local here

    dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, limit)
    return {}

