"""Model families and their configs: the released configs as typed dataclasses, family detection from tensor
names, and the constructor config of a checkpoint (from config.json, embedded metadata, or tensor shapes)."""
from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping, Protocol

from .checkpoint import CheckpointError

__all__ = [
    "FAMILIES",
    "FamilySpec",
    "FluxConfig",
    "MMDiTConfig",
    "VAEConfig",
    "derive_config",
    "detect_family",
    "family_from_class_name",
    "family_spec",
    "finish_config",
    "loader_extras",
    "official_config",
    "read_config_json",
]


class ShapeSource(Protocol):
    """What config derivation reads: tensor names and shapes (a `CheckpointReader`, or a table of them)."""

    source: object

    def keys(self) -> list[str]: ...

    def __contains__(self, key: object) -> bool: ...

    def shape(self, key: str) -> tuple[int, ...]: ...

    def embedded_config(self) -> dict[str, Any] | None: ...


def _arg(default: Any, *, pipeline: bool = False, in_json: bool = True) -> Any:
    """A constructor argument. `pipeline`: the official pipeline passes the default itself, over config.json
    (FACTS 1.4); `in_json`: the released config.json holds the key."""
    return field(default=default, metadata={"pipeline": pipeline, "in_json": in_json})


@dataclass(frozen=True)
class FluxConfig:
    """Constructor arguments of the miniFLUX DiT (`PyramidFluxTransformer`); defaults: the released model."""

    attention_head_dim: int = _arg(64)
    axes_dims_rope: tuple[int, ...] = _arg((16, 24, 24), pipeline=True)
    in_channels: int = _arg(64)
    interp_condition_pos: bool = _arg(True, pipeline=True)
    joint_attention_dim: int = _arg(4096)
    num_attention_heads: int = _arg(30)
    num_layers: int = _arg(8)
    num_single_layers: int = _arg(16)
    patch_size: int = _arg(1)
    pooled_projection_dim: int = _arg(768)
    use_flash_attn: bool = _arg(False, pipeline=True)
    use_gradient_checkpointing: bool = _arg(False, pipeline=True)
    use_temporal_causal: bool = _arg(True, pipeline=True)


@dataclass(frozen=True)
class MMDiTConfig:
    """Constructor arguments of the SD3-style DiT (`PyramidMMDiT`); defaults: the released model. Four of them
    are not in its config.json: the official pipeline passes them (without them no temporal RoPE is built)."""

    add_temp_pos_embed: bool = _arg(True, pipeline=True, in_json=False)
    attention_head_dim: int = _arg(64)
    caption_projection_dim: int = _arg(1536)
    in_channels: int = _arg(16)
    interp_condition_pos: bool = _arg(True, pipeline=True, in_json=False)
    joint_attention_dim: int = _arg(4096)
    max_num_frames: int = _arg(200)
    num_attention_heads: int = _arg(24)
    num_layers: int = _arg(24)
    patch_size: int = _arg(2)
    pooled_projection_dim: int = _arg(2048)
    pos_embed_max_size: int = _arg(192)
    pos_embed_type: str = _arg("sincos")
    qk_norm: str = _arg("rms_norm")
    sample_size: int = _arg(128)
    temp_pos_embed_type: str = _arg("rope", pipeline=True, in_json=False)
    use_flash_attn: bool = _arg(False, pipeline=True)
    use_gradient_checkpointing: bool = _arg(False, pipeline=True)
    use_t5_mask: bool = _arg(True, pipeline=True, in_json=False)
    use_temporal_causal: bool = _arg(True, pipeline=True)


@dataclass(frozen=True)
class VAEConfig:
    """Constructor arguments of the causal video VAE (`CausalVideoVAE`); defaults: the released model."""

    add_post_quant_conv: bool = _arg(True)
    decoder_act_fn: str = _arg("silu")
    decoder_block_dropout: tuple[float, ...] = _arg((0.0, 0.0, 0.0, 0.0))
    decoder_block_out_channels: tuple[int, ...] = _arg((128, 256, 512, 512))
    decoder_in_channels: int = _arg(16)
    decoder_layers_per_block: tuple[int, ...] = _arg((3, 3, 3, 3))
    decoder_norm_num_groups: int = _arg(32)
    decoder_out_channels: int = _arg(3)
    decoder_spatial_up_sample: tuple[bool, ...] = _arg((True, True, True, False))
    decoder_temporal_up_sample: tuple[bool, ...] = _arg((True, True, True, False))
    decoder_type: str = _arg("causal_vae_conv")
    decoder_up_block_types: tuple[str, ...] = _arg(("UpDecoderBlockCausal3D",) * 4)
    downsample_scale: int = _arg(8)
    encoder_act_fn: str = _arg("silu")
    encoder_block_dropout: tuple[float, ...] = _arg((0.0, 0.0, 0.0, 0.0))
    encoder_block_out_channels: tuple[int, ...] = _arg((128, 256, 512, 512))
    encoder_double_z: bool = _arg(True)
    encoder_down_block_types: tuple[str, ...] = _arg(("DownEncoderBlockCausal3D",) * 4)
    encoder_in_channels: int = _arg(3)
    encoder_layers_per_block: tuple[int, ...] = _arg((2, 2, 2, 2))
    encoder_norm_num_groups: int = _arg(32)
    encoder_out_channels: int = _arg(16)
    encoder_spatial_down_sample: tuple[bool, ...] = _arg((True, True, True, False))
    encoder_temporal_down_sample: tuple[bool, ...] = _arg((True, True, True, False))
    encoder_type: str = _arg("causal_vae_conv")
    interpolate: bool = _arg(False, pipeline=True)
    sample_size: int = _arg(256)
    scaling_factor: float = _arg(0.13025)


@dataclass(frozen=True)
class FamilySpec:
    """What the loader knows about one model family."""

    title: str  # for messages: "miniFLUX DiT"
    model: tuple[str, str]  # (module, class) of the pyramid_core model
    config: type  # the typed constructor config; its defaults are the released values
    class_names: tuple[str, ...]  # config.json `_class_name` values of this family
    ignorable_keys: tuple[str, ...] = ()  # file keys dropped when the model has no such tensor (FACTS 1.5)

    def argument_names(self) -> frozenset[str]:
        """The constructor arguments the loader passes (every other config key is dropped)."""
        return frozenset(f.name for f in fields(self.config))


FAMILIES: Mapping[str, FamilySpec] = MappingProxyType({
    "flux": FamilySpec("miniFLUX DiT", ("pyramid_core.models.flux", "PyramidFluxTransformer"), FluxConfig,
                       ("PyramidFluxTransformer",)),
    "mmdit": FamilySpec("SD3-style MMDiT DiT", ("pyramid_core.models.mmdit", "PyramidMMDiT"), MMDiTConfig,
                        ("PyramidDiffusionMMDiT",), ignorable_keys=("pos_embed.temp_pos_embed",)),
    "vae": FamilySpec("causal video VAE", ("pyramid_core.models.vae", "CausalVideoVAE"), VAEConfig,
                      ("CausalVideoVAE",)),
})


def family_spec(family: str) -> FamilySpec:
    """The table entry of `family` ("flux", "mmdit" or "vae")."""
    try:
        return FAMILIES[family]
    except KeyError:
        raise CheckpointError(f"unknown model family {family!r}; expected one of {tuple(FAMILIES)}") from None


def _json_value(value: Any) -> Any:
    """Tuples as lists, as config.json and the embedded metadata spell them."""
    return [_json_value(v) for v in value] if isinstance(value, tuple) else value


def _defaults(family: str, keep: Callable[[Mapping[str, Any]], bool]) -> dict[str, Any]:
    spec = family_spec(family)
    return {f.name: _json_value(f.default) for f in fields(spec.config) if f.default is not MISSING and keep(f.metadata)}


def official_config(family: str) -> dict[str, Any]:
    """The released config.json values of a family (without `_class_name`), as a fresh dict."""
    return _defaults(family, lambda meta: meta["in_json"])


def loader_extras(family: str) -> dict[str, Any]:
    """Constructor arguments the official pipeline sets itself for this family, over config.json."""
    return _defaults(family, lambda meta: meta["pipeline"])


def read_config_json(path: Path) -> dict[str, Any]:
    """A config.json as a dict; unreadable or non-object files are a `CheckpointError`."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return data


def family_from_class_name(config: Mapping[str, Any]) -> str | None:
    """The family a config.json's `_class_name` names, or None."""
    name = config.get("_class_name")
    return next((family for family, spec in FAMILIES.items() if name in spec.class_names), None)


# --------------------------------------------------------------------------------------------
# family detection


def _keys_with_prefix(keys: Iterable[str], prefix: str) -> list[str]:
    return [k for k in keys if k.startswith(prefix)]


def detect_family(reader: ShapeSource) -> str:
    """`"flux"`, `"mmdit"` or `"vae"` from the tensor names (and the MMDiT patch-embed shape)."""
    keys = reader.keys()
    if any(k.startswith(("encoder.conv_in.conv.", "decoder.conv_out.conv.", "post_quant_conv.conv.")) for k in keys):
        return "vae"
    if "x_embedder.weight" in reader or _keys_with_prefix(keys, "single_transformer_blocks."):
        return "flux"
    if "pos_embed.proj.weight" in reader and len(reader.shape("pos_embed.proj.weight")) == 4:
        return "mmdit"
    hint = ""
    if "shared.weight" in reader or _keys_with_prefix(keys, "encoder.block."):
        hint = " It looks like a T5 text encoder."
    elif _keys_with_prefix(keys, "text_model."):
        hint = " It looks like a CLIP text encoder."
    else:
        prefixed = [k for k in keys if re.search(r"(^|\.)(x_embedder|pos_embed\.proj|encoder\.conv_in\.conv)\.", k)]
        if prefixed:
            prefix = re.split(r"(x_embedder|pos_embed\.proj|encoder\.conv_in\.conv)\.", prefixed[0])[0]
            hint = f" Its keys carry the prefix {prefix!r}; re-save it without the prefix (save_single_file)."
    sample = ", ".join(keys[:5])
    raise CheckpointError(
        f"{reader.source} is not a Pyramid Flow DiT or VAE checkpoint (keys start with: {sample}).{hint}"
    )


# --------------------------------------------------------------------------------------------
# config derivation from tensor shapes


def _count_indices(keys: Iterable[str], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    if found and found != set(range(len(found))):
        raise CheckpointError(f"{prefix}N blocks are not numbered 0..{len(found) - 1}: {sorted(found)}")
    return len(found)


def _require(reader: ShapeSource, key: str, family: str) -> tuple[int, ...]:
    if key not in reader:
        raise CheckpointError(
            f"{reader.source}: cannot derive the {family_spec(family).title} config, tensor {key!r} is missing"
        )
    return reader.shape(key)


def _heads(reader: ShapeSource, hidden: int, head_dim: int) -> int:
    if hidden % head_dim:
        raise CheckpointError(f"{reader.source}: hidden size {hidden} is not a multiple of head dim {head_dim}")
    return hidden // head_dim


def _derive_flux(reader: ShapeSource) -> dict[str, Any]:
    hidden, in_channels = _require(reader, "x_embedder.weight", "flux")
    norm_q = "transformer_blocks.0.attn.norm_q.weight"
    if norm_q not in reader:
        norm_q = "single_transformer_blocks.0.attn.norm_q.weight"
    head_dim = _require(reader, norm_q, "flux")[0]
    return official_config("flux") | dict(
        attention_head_dim=head_dim,
        num_attention_heads=_heads(reader, hidden, head_dim),
        in_channels=in_channels,
        joint_attention_dim=_require(reader, "context_embedder.weight", "flux")[1],
        pooled_projection_dim=_require(reader, "time_text_embed.text_embedder.linear_1.weight", "flux")[1],
        num_layers=_count_indices(reader.keys(), "transformer_blocks."),
        num_single_layers=_count_indices(reader.keys(), "single_transformer_blocks."),
    )


def _derive_mmdit(reader: ShapeSource) -> dict[str, Any]:
    hidden, in_channels, patch = _require(reader, "pos_embed.proj.weight", "mmdit")[:3]
    head_dim = _require(reader, "transformer_blocks.0.attn.norm_q.weight", "mmdit")[0]
    context = _require(reader, "context_embedder.weight", "mmdit")
    config = official_config("mmdit") | dict(
        attention_head_dim=head_dim,
        num_attention_heads=_heads(reader, hidden, head_dim),
        in_channels=in_channels,
        patch_size=patch,
        caption_projection_dim=context[0],
        joint_attention_dim=context[1],
        pooled_projection_dim=_require(reader, "time_text_embed.text_embedder.linear_1.weight", "mmdit")[1],
        num_layers=_count_indices(reader.keys(), "transformer_blocks."),
    )
    if "pos_embed.pos_embed" in reader:
        positions = reader.shape("pos_embed.pos_embed")[1]
        side = math.isqrt(positions)
        if side * side != positions:
            raise CheckpointError(f"{reader.source}: pos_embed.pos_embed has {positions} positions, not a square grid")
        config["pos_embed_max_size"] = side
    return config


def _vae_blocks(reader: ShapeSource, prefix: str, count: int) -> list[dict[str, Any]]:
    """Per block of `encoder.down_blocks` / `decoder.up_blocks`: output channels, resnets, samplers."""
    keys = reader.keys()
    sampler = "downsamplers" if prefix.startswith("encoder") else "upsamplers"
    blocks = []
    for i in range(count):
        resnets = _count_indices(keys, f"{prefix}.{i}.resnets.")
        blocks.append({
            "out": _require(reader, f"{prefix}.{i}.resnets.{resnets - 1}.conv2.conv.weight", "vae")[0],
            "layers": resnets,
            "spatial": bool(_keys_with_prefix(keys, f"{prefix}.{i}.{sampler}.")),
            "temporal": bool(_keys_with_prefix(keys, f"{prefix}.{i}.temporal_{sampler}.")),
        })
    return blocks


def _derive_vae(reader: ShapeSource) -> dict[str, Any]:
    n_down = _count_indices(reader.keys(), "encoder.down_blocks.")
    n_up = _count_indices(reader.keys(), "decoder.up_blocks.")
    if not n_down or not n_up:
        raise CheckpointError(
            f"{reader.source}: a VAE checkpoint needs both encoder.down_blocks.* and decoder.up_blocks.* tensors "
            f"(found {n_down} encoder and {n_up} decoder blocks)"
        )
    down = _vae_blocks(reader, "encoder.down_blocks", n_down)
    up = _vae_blocks(reader, "decoder.up_blocks", n_up)
    latent = _require(reader, "decoder.conv_in.conv.weight", "vae")[1]
    moments = _require(reader, "encoder.conv_out.conv.weight", "vae")[0]
    double_z = moments == 2 * latent
    config = official_config("vae") | dict(
        encoder_in_channels=_require(reader, "encoder.conv_in.conv.weight", "vae")[1],
        encoder_out_channels=moments // 2 if double_z else moments,
        encoder_double_z=double_z,
        encoder_block_out_channels=[b["out"] for b in down],
        encoder_layers_per_block=[b["layers"] for b in down],
        encoder_spatial_down_sample=[b["spatial"] for b in down],
        encoder_temporal_down_sample=[b["temporal"] for b in down],
        encoder_down_block_types=["DownEncoderBlockCausal3D"] * n_down,
        encoder_block_dropout=[0.0] * n_down,
        decoder_in_channels=latent,
        decoder_out_channels=_require(reader, "decoder.conv_out.conv.weight", "vae")[0],
        # The decoder walks its block_out_channels in reverse, so up block i has channels[-1 - i].
        decoder_block_out_channels=[b["out"] for b in reversed(up)],
        decoder_layers_per_block=[b["layers"] for b in up],
        decoder_spatial_up_sample=[b["spatial"] for b in up],
        decoder_temporal_up_sample=[b["temporal"] for b in up],
        decoder_up_block_types=["UpDecoderBlockCausal3D"] * n_up,
        decoder_block_dropout=[0.0] * n_up,
        add_post_quant_conv="post_quant_conv.conv.weight" in reader,
    )
    channels = set(config["encoder_block_out_channels"]) | set(config["decoder_block_out_channels"])
    groups = VAEConfig.encoder_norm_num_groups
    if any(c % groups for c in channels):
        raise CheckpointError(
            f"{reader.source}: VAE channels {sorted(channels)} are not multiples of the official {groups} norm "
            "groups and the group count cannot be read from tensor shapes; load the VAE from its folder "
            "(with config.json) or re-save it with save_single_file(..., config=<its config.json>)"
        )
    return config


_DERIVERS: Mapping[str, Callable[[ShapeSource], dict[str, Any]]] = MappingProxyType(
    {"flux": _derive_flux, "mmdit": _derive_mmdit, "vae": _derive_vae}
)


# --------------------------------------------------------------------------------------------
# the constructor config


def finish_config(family: str, config: Mapping[str, Any], source: object) -> dict[str, Any]:
    """The constructor arguments from a config: `_`-private keys dropped, the official pipeline's own values
    set, keys the model does not take dropped (with a warning, as diffusers does), and the RoPE axes checked."""
    known = family_spec(family).argument_names()
    public = {k: v for k, v in config.items() if not k.startswith("_")}
    unknown = sorted(set(public) - known)
    if unknown:
        warnings.warn(f"{source}: config keys {', '.join(unknown)} are not arguments of the "
                      f"{family_spec(family).title}; they are ignored", stacklevel=3)
    finished = {k: v for k, v in public.items() if k in known} | loader_extras(family)
    if family == "flux" and finished.get("attention_head_dim") != sum(finished["axes_dims_rope"]):
        raise CheckpointError(
            f"{source}: miniFLUX RoPE axes {finished['axes_dims_rope']} need attention_head_dim "
            f"{sum(finished['axes_dims_rope'])}, but the checkpoint has {finished.get('attention_head_dim')}"
        )
    return finished


def derive_config(family: str, reader: ShapeSource) -> dict[str, Any]:
    """Constructor config for a single file: its embedded JSON `config` metadata if present, else derived from
    tensor shapes (non-derivable keys take the official values); the official pipeline's own values always set."""
    family_spec(family)
    embedded = reader.embedded_config()
    config = embedded if embedded is not None else _DERIVERS[family](reader)
    return finish_config(family, config, reader.source)
