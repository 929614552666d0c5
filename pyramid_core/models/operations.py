"""The layer classes the models are built from: an injectable `operations` namespace.

Every DiT and VAE constructor takes `operations` (as ComfyUI's own models do): a class whose attributes
`Linear`, `Conv2d` and `Conv3d` are the layer types to build. `TorchOperations` (the default) gives
pyramid_core's own: a `Linear` that takes activations wider than its weights (`mixed_precision_linear`) and
a `Conv3d` whose fp32 CPU calls always run oneDNN. A host passes its own (the ComfyUI nodes pass layers
built on `comfy.ops`, so ComfyUI's loader can partially load and cast them); such layers must keep the
same parameter names and the same call semantics (see `Operations`).
"""
from __future__ import annotations

from typing import Optional, Protocol

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "Conv3d", "Linear", "Operations", "TorchOperations", "conv3d_onednn", "mixed_precision_linear", "on_device_of",
    "pow2_scale", "use_onednn",
]


def on_device_of(t: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """`t` on `x`'s device for one call: `t` itself when it is there already (the usual case: no copy), else an
    asynchronous copy. The small weights outside the `operations` layers (norms, position tables) read through
    it, so a host's partial load (ComfyUI's, which may leave such weights on the offload device) still runs."""
    return t if t is None or t.device == x.device else t.to(x.device, non_blocking=True)


def pow2_scale(x: torch.Tensor, dim, limit: float = 1.0) -> torch.Tensor:
    """Power-of-two divisor per slice (over `dim`) bringing max|x| to <= `limit`; exact to apply and undo."""
    amax = torch.linalg.vector_norm(x.detach(), ord=float("inf"), dim=dim, keepdim=True).float()
    return torch.exp2(torch.ceil(torch.log2(amax.clamp_min(torch.finfo(torch.float32).tiny) / limit)))


def mixed_precision_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ weight.T + bias`, the product in the weight's dtype, the result in x's dtype.

    Equal dtypes: plain `F.linear`. fp16 weights with wider activations: each input row is divided by a
    power of two >= its max magnitude, so the fp16 operand holds no inf and every output element is
    bounded by the L1 norm of a weight row; the scale is undone and the bias added in x's dtype.
    """
    if x.dtype == weight.dtype:
        return F.linear(x, weight, bias)
    if weight.dtype == torch.float16 and x.dtype in (torch.float32, torch.float64):
        scale = pow2_scale(x, -1).to(x.dtype)
        operand = torch.empty(x.shape, dtype=torch.float16, device=x.device)
        torch.div(x, scale, out=operand)  # scale and narrow in one pass
        product = F.linear(operand, weight)
        if bias is None:
            return torch.mul(product, scale)  # widens to x's dtype
        return torch.addcmul(bias.to(x.dtype), product, scale)
    out = F.linear(x.to(weight.dtype), weight, None if bias is None else bias.to(weight.dtype))
    return out.to(x.dtype)


class Linear(nn.Linear):
    """nn.Linear that also takes activations wider than its weights (see `mixed_precision_linear`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mixed_precision_linear(x, self.weight, self.bias)


def use_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a CPU 3-D convolution of `x` with `weight` should call oneDNN directly.

    torch picks oneDNN for fp32 CPU convolutions only above a size threshold on N*C*D*H (W is left out), so
    narrow layers fall back to ATen's im2col `slow_conv3d`, about 10x slower (an 8-channel 10x194x258 input:
    0.82 s against 0.08 s on a 2-core AVX2 CPU); wide layers already run oneDNN. fp32 only (bf16 oneDNN
    needs native bf16), and only while `torch.backends.mkldnn` is enabled.
    """
    return (
        x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and not x.requires_grad
        and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
    )


def conv3d_onednn(conv: nn.Conv3d, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor | None:
    """`conv`'s convolution of x through oneDNN where `use_onednn` says so, else None (the caller runs its own)."""
    explicit = conv.padding_mode == "zeros" and isinstance(conv.padding, tuple)  # not 'same' / 'valid'
    if not (explicit and use_onednn(x, weight)):
        return None
    return torch.mkldnn_convolution(
        x.contiguous(), weight.contiguous(), bias, conv.padding, conv.stride, conv.dilation, conv.groups
    )


class Conv3d(nn.Conv3d):
    """`nn.Conv3d` whose fp32 CPU calls always run oneDNN (see `use_onednn`); elsewhere unchanged."""

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        out = conv3d_onednn(self, input, weight, bias)
        return out if out is not None else super()._conv_forward(input, weight, bias)


class Operations(Protocol):
    """What a model needs of an operations namespace: layer classes with torch's constructor signatures.

    `Linear(in, out, bias=True)` must accept activations wider than its weights and return them in the
    activation dtype (as `mixed_precision_linear`); `Conv2d` / `Conv3d` as torch's.
    """

    Linear: type[nn.Linear]
    Conv2d: type[nn.Conv2d]
    Conv3d: type[nn.Conv3d]


class TorchOperations:
    """pyramid_core's own layers (the default everywhere outside ComfyUI)."""

    Linear = Linear
    Conv2d = nn.Conv2d
    Conv3d = Conv3d
