"""X-MDPT: the cross-view masked diffusion transformer (Pham et al., ICML 2024).

Reads top-down like DiT's `models.py`: helpers, embedders, attention, blocks, final layer, the paper's two modules
(`AggregationNetwork`, `SideInterpolater`), the additions beyond the paper, the model, presets. Inside those modules,
parameter names are the public code's, and `rename_legacy_keys` maps the public checkpoints' flat names onto this
layout when they load (see `xmdpt.models.convert`). Unlike the public code, nothing assumes a square token grid:
every table is built for the configured (height, width) grid, so 32x32 (stretched 256x256), 32x22 (native 256x176)
and 64x44 (512x352) latents all work.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

if TYPE_CHECKING:
    from xmdpt.models.cache import FeatureCache

#################################################################################
#                                    Helpers                                    #
#################################################################################


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation: x * (1 + scale) + shift, broadcast over tokens."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_1d(embed_dim: int, positions: np.ndarray) -> np.ndarray:
    """MAE's 1-D sin-cos table: [sin | cos] over embed_dim // 2 frequencies."""
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", positions.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(embed_dim: int, grid_size: tuple[int, int]) -> np.ndarray:
    """MAE's 2-D sin-cos table for a (height, width) grid, row-major, shape (H * W, D).

    The first half encodes the column and the second half the row, as MAE's `meshgrid(w, h)` does; on a square grid
    this equals the public code's table exactly.
    """
    if embed_dim % 4:
        raise ValueError(f"hidden size {embed_dim} must be divisible by 4 for the 2-D sin-cos table")
    grid_h, grid_w = grid_size
    cols, rows = np.meshgrid(np.arange(grid_w, dtype=np.float32), np.arange(grid_h, dtype=np.float32))
    return np.concatenate([sincos_1d(embed_dim // 2, cols), sincos_1d(embed_dim // 2, rows)], axis=1)


def relative_position_index(grid_size: tuple[int, int]) -> torch.Tensor:
    """BEiT's relative position index for a (height, width) grid, shape (N, N), int64.

    index = (dh + H - 1) * (2W - 1) + (dw + W - 1) for the row/column offsets (dh, dw) of a query/key pair.
    """
    grid_h, grid_w = grid_size
    coords = torch.stack(torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")).flatten(1)
    rel = coords[:, :, None] - coords[:, None, :]  # (2, N, N)
    return (rel[0] + grid_h - 1) * (2 * grid_w - 1) + (rel[1] + grid_w - 1)


def random_masking(
    batch_size: int,
    num_tokens: int,
    mask_ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """MAE's per-sample random masking by argsort of uniform noise; returns the kept indices (B, int(N * (1 - r))).

    The kept indices are in shuffled order, as in MAE; the side-interpolater scatters tokens back to their positions.
    """
    num_keep = int(num_tokens * (1 - mask_ratio))
    noise = torch.rand(batch_size, num_tokens, generator=generator, device=device)
    return torch.argsort(noise, dim=1)[:, :num_keep]


def _compute(name: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """A block layer's output without a feature cache: computed."""
    return compute()


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x[b, ids[b]] for every sample: (B, N, D) -> (B, K, D)."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def scatter_tokens(x: torch.Tensor, ids: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """x with x[b, ids[b]] = tokens[b]: (B, N, D), (B, K), (B, K, D) -> (B, N, D); gather_tokens' inverse."""
    return x.scatter(1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]), tokens.to(x.dtype))


@dataclass
class TokenRoute:
    """Token routing (TREAD, Krause et al. 2025; training only): the tokens at `ids` (B, R), positions in the pass's
    token sequence (of N, or of the masked pass's K kept tokens), run blocks [start, end); the others skip those
    blocks and rejoin, unchanged, before block `end`. No parameters: sampling runs every token through every block."""

    ids: torch.Tensor  # (B, R)
    start: int
    end: int


def route_span(route_blocks: Sequence[int] | None, depth: int, decode_layers: int) -> tuple[int, int]:
    """The blocks [start, end) that routed tokens skip. They must lie within the first split = depth - decode_layers
    blocks: the masked pass runs those on its kept tokens and the side-interpolater puts the dropped ones back at
    block `split`, so every token is reinserted by then (in both passes, one rule). None: TREAD's choice, from the
    third block (the first two see every token) to `split`, as far as the model is deep."""
    split = depth - decode_layers
    if route_blocks is None:
        if split < 1:
            raise ValueError(f"no block to route around: depth {depth} - decode_layers {decode_layers} = 0")
        return min(2, split - 1), split
    if len(route_blocks) != 2 or any(isinstance(b, bool) or int(b) != b for b in route_blocks):
        raise ValueError(f"route_blocks must be [start, end], two block indices, got {list(route_blocks)}")
    start, end = (int(b) for b in route_blocks)
    if not 0 <= start < end <= split:
        raise ValueError(
            f"route_blocks=[{start}, {end}] must satisfy 0 <= start < end <= depth - decode_layers = {split} "
            "(routed tokens rejoin before the side-interpolater)"
        )
    return start, end


#################################################################################
#                               Embedding layers                                #
#################################################################################


class PatchEmbed(nn.Module):
    """Latent (B, C, H, W) -> tokens (B, H/p * W/p, D) by a conv with kernel = stride = patch."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> D-vectors: 256 sinusoidal features (cos half first, as GLIDE/DiT) and a 2-layer MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))  # (B, D)


def token_mixer(num_tokens: int, hidden_size: int) -> nn.Sequential:
    """Reduces a token sequence (B, T, D) to one vector (B, 1, D): a learned weighted sum over tokens (Conv1d with the
    token axis as channels), GELU, LayerNorm. One per branch of the aggregation network (paper Sec. 3.2)."""
    return nn.Sequential(nn.Conv1d(num_tokens, 1, kernel_size=1), nn.GELU(), nn.LayerNorm(hidden_size, eps=1e-12))


def feature_projection(in_features: int, hidden_size: int) -> nn.Sequential:
    """Projects frozen encoder features to the model width: Linear, GELU, LayerNorm (the public `mlp_dino_*`)."""
    return nn.Sequential(nn.Linear(in_features, hidden_size), nn.GELU(), nn.LayerNorm(hidden_size, eps=1e-12))


#################################################################################
#                                   Attention                                   #
#################################################################################


class RelativePositionBias(nn.Module):
    """BEiT relative position bias: a learned (2H-1)(2W-1)+3 by heads table (the 3 extra rows are BEiT's class-token
    slots, unused here but kept for checkpoint compatibility) read through a fixed (N, N) index."""

    def __init__(self, grid_size: tuple[int, int], num_heads: int):
        super().__init__()
        grid_h, grid_w = grid_size
        num_distances = (2 * grid_h - 1) * (2 * grid_w - 1) + 3
        self.relative_position_bias_table = nn.Parameter(torch.zeros(num_distances, num_heads))
        # Persistent so that checkpoints carry it, as the public ones do; the converter checks it against ours.
        self.register_buffer("relative_position_index", relative_position_index(grid_size), persistent=True)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        """The bias (1, heads, N, N), or with kept indices (B, K) the bias gathered on both axes (B, heads, K, K)."""
        index = self.relative_position_index
        if ids_keep is None:
            return self.relative_position_bias_table[index].permute(2, 0, 1).unsqueeze(0)  # (1, h, N, N)
        index = index[ids_keep[:, :, None], ids_keep[:, None, :]]  # (B, K, K)
        return self.relative_position_bias_table[index].permute(0, 3, 1, 2)  # (B, h, K, K)


class Attention(nn.Module):
    """Multi-head self-attention with the relative position bias added to the logits."""

    def __init__(self, hidden_size: int, num_heads: int, grid_size: tuple[int, int]):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=True)
        self.proj = nn.Linear(hidden_size, hidden_size)
        self.rel_pos_bias = RelativePositionBias(grid_size, num_heads)

    def forward(self, x: torch.Tensor, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        bias = self.rel_pos_bias(ids_keep).to(q.dtype)  # scale is SDPA's default, head_dim ** -0.5
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, h, N, d)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class CrossAttention(nn.Module):
    """Target tokens attend to reference tokens. The side-interpolater's cross-view step adds the relative position
    bias (`grid_size`); reference attention (`grid_size=None`) has none, since the reference is in another pose and
    its own positions are already in its tokens."""

    def __init__(self, hidden_size: int, num_heads: int, grid_size: tuple[int, int] | None):
        super().__init__()
        self.num_heads = num_heads
        self.to_q = nn.Linear(hidden_size, hidden_size, bias=True)
        self.to_kv = nn.Linear(hidden_size, 2 * hidden_size, bias=True)
        self.proj = nn.Linear(hidden_size, hidden_size)
        self.rel_pos_bias = RelativePositionBias(grid_size, num_heads) if grid_size is not None else None

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        h = self.num_heads
        q = self.to_q(x).reshape(B, N, h, D // h).transpose(1, 2)  # (B, h, N, d)
        k, v = self.to_kv(context).reshape(B, context.shape[1], 2, h, D // h).permute(2, 0, 3, 1, 4)
        bias = self.rel_pos_bias().to(q.dtype) if self.rel_pos_bias is not None else None
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, h, N, d)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    """Transformer MLP with tanh-GELU (DiT's choice), keys `fc1` / `fc2` as timm's."""

    def __init__(self, hidden_size: int, mlp_ratio: float):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, int(hidden_size * mlp_ratio))
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(int(hidden_size * mlp_ratio), hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


#################################################################################
#                                 Core blocks                                   #
#################################################################################


class XMDPTBlock(nn.Module):
    """DiT block with adaLN-Zero conditioning; attention optionally on a subset of tokens (kept indices).

    With `cross_attention` (reference attention, beyond the paper) a cross-attention to the reference memory sits
    between self-attention and MLP, as in PixArt-alpha's blocks. Its output projection starts at zero, so such a
    block computes exactly the plain block's function until it trains (a plain model's weights fine-tune from there).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        grid_size: tuple[int, int],
        mlp_ratio: float = 4.0,
        cross_attention: bool = False,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, grid_size)
        if cross_attention:
            self.norm_cross = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
            self.cross_attn = CrossAttention(hidden_size, num_heads, None)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        ids_keep: torch.Tensor | None = None,
        memory: torch.Tensor | None = None,
        memory_gate: torch.Tensor | None = None,
        layer: Callable[[str, Callable[[], torch.Tensor]], torch.Tensor] = _compute,
    ) -> torch.Tensor:
        """memory: (B, M, D) reference tokens for blocks built with cross_attention; memory_gate: (B, 1, 1), 0 where
        the condition is dropped (the unconditional model of guidance sees no reference). layer(name, compute): how
        each layer's output is had, computed or reused (FORA; see `xmdpt.models.cache`)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        attn = layer("attn", lambda: self.attn(modulate(self.norm1(x), shift_msa, scale_msa), ids_keep))
        x = x + gate_msa.unsqueeze(1) * attn  # (B, N or K, D)
        if memory is not None:
            cross = layer("cross", lambda: self.cross_attn(self.norm_cross(x), memory))  # (B, N or K, D)
            x = x + (cross if memory_gate is None else memory_gate * cross)
        x = x + gate_mlp.unsqueeze(1) * layer("mlp", lambda: self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))
        return x  # (B, N or K, D)

    def modulated_input(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The timestep-modulated input of self-attention (B, N, D): what TeaCache watches change between steps."""
        shift_msa, scale_msa = self.adaLN_modulation(c).chunk(6, dim=1)[:2]
        return modulate(self.norm1(x), shift_msa, scale_msa)


class XMDPTCrossBlock(nn.Module):
    """adaLN-Zero block whose attention is cross-attention to the reference tokens (un-normalised keys/values)."""

    def __init__(self, hidden_size: int, num_heads: int, grid_size: tuple[int, int], mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = CrossAttention(hidden_size, num_heads, grid_size)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), context)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x  # (B, N, D)


class FinalLayer(nn.Module):
    """LayerNorm, adaLN (shift, scale), Linear to p * p * out_channels."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (B, N, p * p * C_out)


#################################################################################
#                  The paper's modules: aggregation, side-interpolater          #
#################################################################################


class AggregationNetwork(nn.Module):
    """Paper Sec. 3.2: folds the target pose, the reference's global features and its local latent tokens into one
    vector, y = mlp_final(v_P + v_G + v_L). Each branch is reduced to one vector by its own token mixer; the pose and
    global branches first project the frozen DINOv2 features to the model width."""

    def __init__(
        self,
        hidden_size: int,
        num_tokens: int,
        pose_feature_dim: int,
        pose_num_tokens: int,
        reference_feature_dim: int,
        reference_num_tokens: int,
    ):
        super().__init__()
        D = hidden_size
        self.mlp_dino_pose = feature_projection(pose_feature_dim, D)
        self.mlp_dino_img = feature_projection(reference_feature_dim, D)
        self.conv1d_pose = token_mixer(pose_num_tokens, D)
        self.conv1d_global = token_mixer(reference_num_tokens, D)
        self.conv1d_local = token_mixer(num_tokens, D)
        self.mlp_final = feature_projection(D, D)

    def forward(
        self, pose_features: torch.Tensor, reference_features: torch.Tensor, reference_tokens: torch.Tensor
    ) -> torch.Tensor:
        v_pose = self.conv1d_pose(self.mlp_dino_pose(pose_features))  # (B, 1, D)
        v_global = self.conv1d_global(self.mlp_dino_img(reference_features))  # (B, 1, D)
        v_local = self.conv1d_local(reference_tokens)  # (B, 1, D)
        # squeeze(1), not squeeze(): the public code's squeeze() breaks batch size 1.
        return self.mlp_final((v_pose + v_global + v_local).squeeze(1))  # (B, D)


class SideInterpolater(nn.Module):
    """Paper Sec. 3.3 (mask cross-prediction, training only): the masked pass runs the first depth - decode_layers
    blocks on the kept tokens; this module puts them back in place, fills the dropped positions with the mask token,
    runs one self-attention block and one cross-attention block to the reference tokens, and keeps the result only
    where tokens were dropped (the masked shortcut)."""

    def __init__(self, hidden_size: int, num_heads: int, grid_size: tuple[int, int], mlp_ratio: float):
        super().__init__()
        self.num_tokens = grid_size[0] * grid_size[1]
        self.mask_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.sideblocks = nn.ModuleList([XMDPTBlock(hidden_size, num_heads, grid_size, mlp_ratio)])
        self.sideblocks_cross = nn.ModuleList([XMDPTCrossBlock(hidden_size, num_heads, grid_size, mlp_ratio)])

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        ids_keep: torch.Tensor,
        context: torch.Tensor,
        decoder_pos_embed: torch.Tensor,
    ) -> torch.Tensor:
        B, _, D = x.shape
        full = self.mask_token.to(x.dtype).expand(B, self.num_tokens, D).clone()
        full = full.scatter(1, ids_keep.unsqueeze(-1).expand(-1, -1, D), x)  # unshuffle: (B, N, D)
        dropped = torch.ones(B, self.num_tokens, 1, device=x.device, dtype=x.dtype)
        dropped = dropped.scatter(1, ids_keep.unsqueeze(-1), 0.0)  # 1 where the token was masked
        x_before = full + decoder_pos_embed
        x = x_before
        for block in self.sideblocks:
            x = block(x, c)
        for block in self.sideblocks_cross:
            x = block(x, c, context)
        return dropped * x + (1 - dropped) * x_before  # (B, N, D)


#################################################################################
#                  Additions beyond the paper (each off by default)             #
#################################################################################


class ReferenceBlock(nn.Module):
    """A plain pre-norm ViT block over the reference tokens (reference attention's memory encoder): it sees neither
    the timestep nor the target, so a sampler runs it once per image."""

    def __init__(self, hidden_size: int, num_heads: int, grid_size: tuple[int, int], mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, grid_size)
        self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.mlp = Mlp(hidden_size, mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))  # (B, N, D)


class ReferenceMemory(nn.Module):
    """Reference attention's memory: the reference tokens through a few plain ViT blocks, then a LayerNorm. Every
    denoiser block cross-attends to it (`XMDPTBlock(cross_attention=True)`), so that fine detail such as a garment's
    pattern need not pass through the one vector y. Depends only on the reference: computed once per image."""

    def __init__(self, hidden_size: int, num_heads: int, grid_size: tuple[int, int], mlp_ratio: float, depth: int):
        super().__init__()
        self.blocks = nn.ModuleList(
            [ReferenceBlock(hidden_size, num_heads, grid_size, mlp_ratio) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(hidden_size, eps=1e-6)

    def forward(self, reference_tokens: torch.Tensor) -> torch.Tensor:
        x = reference_tokens
        for block in self.blocks:
            x = block(x)
        return self.norm(x)  # (B, N, D)


class Refiner(nn.Module):
    """A small convolutional head on the latent grid (beyond the paper): from the unpatchified prediction and the
    noisy input x_t, two 3x3 convolutions, the first modulated by c (FiLM: the timestep says how far to trust x_t),
    add a correction to the prediction channels. Patch tokens of 8x8 pixels blur what a convolution sees directly
    (U-ViT ends in a 3x3 convolution for the same reason). The last convolution starts at zero: identity at first."""

    def __init__(self, in_channels: int, out_channels: int, hidden_size: int, channels: int):
        super().__init__()
        self.in_channels = in_channels
        self.conv_in = nn.Conv2d(out_channels + in_channels, channels, 3, padding=1)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * channels))
        self.conv_out = nn.Conv2d(channels, in_channels, 3, padding=1)

    def forward(self, prediction: torch.Tensor, sample: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(torch.cat([prediction, sample], dim=1))  # (B, channels, H, W)
        shift, scale = self.modulation(c)[..., None, None].chunk(2, dim=1)
        h = F.silu(h * (1 + scale) + shift)
        C = self.in_channels
        refined = prediction[:, :C] + self.conv_out(h)  # (B, C, H, W)
        return torch.cat([refined, prediction[:, C:]], dim=1)  # the variance channels pass unchanged


class DenseSparseFusion(nn.Module):
    """SPRINT's dense-sparse residual fusion (Park et al. 2025), around the token route's span: the tokens as they
    entered the span (every token: the dense path) and as they leave it, concatenated per token and projected back
    to D. In training the tokens routed around the span come back as a learned mask token, so the span is truly
    sparse and the dense path carries them; in sampling every token runs the span. Starts as the identity on the
    span's output, so at step 0 the model computes what the same model without the fusion does."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.mask_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.proj = nn.Linear(2 * hidden_size, hidden_size)

    def forward(self, dense: torch.Tensor, deep: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """dense (B, N, D), the span's input; deep (B, N, D), its output, or (B, R, D) at positions ids (B, R)."""
        if ids is not None:
            deep = scatter_tokens(self.mask_token.to(dense.dtype).expand_as(dense), ids, deep)  # (B, N, D)
        return self.proj(torch.cat([dense, deep.to(dense.dtype)], dim=-1))  # (B, N, D)


#################################################################################
#                                  The model                                    #
#################################################################################


@dataclass
class Conditions:
    """Everything the denoiser needs besides (x_t, t), from `XMDPT.encode_conditions`: it depends only on the
    reference and the target pose, so a sampler computes it once per image and training once per step."""

    y: torch.Tensor  # (B, D) the aggregation network's vector
    reference_tokens: torch.Tensor  # (B, N, D) the embedded reference latent (the side-interpolater's context)
    reference_memory: torch.Tensor | None = None  # (B, N, D) reference attention's memory
    pose_map: torch.Tensor | None = None  # (B, pose_map_channels, h, w) the rendered pose on the latent grid

    def map(self, fn) -> Conditions:
        return Conditions(*(None if v is None else fn(v) for v in vars(self).values()))

    def __getitem__(self, index) -> Conditions:
        return self.map(lambda v: v[index])

    def repeat(self, n: int) -> Conditions:
        """The batch n times over (classifier-free guidance runs the conditional and unconditional halves at once)."""
        return self.map(lambda v: torch.cat([v] * n))


class XMDPT(ModelMixin, ConfigMixin):
    """The X-MDPT denoiser: maps (x_t, t, conditions) to the noise prediction and the variance interpolation v.

    `encode_conditions` runs the aggregation network once per image; `forward` takes its `Conditions`. Passing
    `ids_keep` runs the training-only masked pass (mask cross-prediction, paper Sec. 3.3).

    Three additions beyond the paper, each off by default (then the model is the paper's, and public checkpoints
    load), each with one hook: `pose_map_channels` > 0 adds the rendered target pose to the noisy tokens
    (`pose_embedder`); `reference_layers` > 0 builds `reference_memory`, which every block cross-attends to;
    `refine_channels` > 0 ends the model in a small convolutional head that sees x_t (`refiner`).
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        sample_size: tuple[int, int] | list[int] = (32, 22),
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        learn_sigma: bool = True,
        decode_layers: int = 2,
        side_interpolater: bool = True,
        pose_feature_dim: int = 768,
        pose_num_tokens: int = 257,
        reference_feature_dim: int = 1536,
        reference_num_tokens: int = 257,
        pose_map_channels: int = 0,
        reference_layers: int = 0,
        refine_channels: int = 0,
        fusion_blocks: list[int] | None = None,
    ):
        super().__init__()
        latent_h, latent_w = sample_size
        if latent_h % patch_size or latent_w % patch_size:
            raise ValueError(f"latent size {latent_h}x{latent_w} is not divisible by the patch size {patch_size}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}")
        if pose_map_channels < 0 or pose_map_channels % 3:
            raise ValueError(f"pose_map_channels={pose_map_channels} must be 3 x (image size / latent size)^2")
        if refine_channels < 0:
            raise ValueError(f"refine_channels={refine_channels} must be >= 0 (0: no refiner)")
        if reference_layers < 0:
            raise ValueError(f"reference_layers={reference_layers} must be >= 0 (0: no reference attention)")
        if not 1 <= decode_layers <= depth:
            raise ValueError(f"decode_layers={decode_layers} must lie in [1, depth={depth}]")
        if fusion_blocks is not None:
            route_span(fusion_blocks, depth, decode_layers)  # the same rule as a token route's span
        self.grid_size = (latent_h // patch_size, latent_w // patch_size)
        self.num_tokens = self.grid_size[0] * self.grid_size[1]
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        grid, D = self.grid_size, hidden_size

        # Registered in the order the earlier flat layout registered its parameters, so that optimizer states
        # (which name parameters by their position) of runs saved before still line up. Beyond the paper: the pose
        # map embedder, reference attention's memory and the refiner (None when off).
        cross = reference_layers > 0
        self.x_embedder = PatchEmbed(patch_size, in_channels, D)
        self.pose_embedder = PatchEmbed(patch_size, pose_map_channels, D) if pose_map_channels else None
        self.t_embedder = TimestepEmbedder(D)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, D))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, D))
        self.blocks = nn.ModuleList([XMDPTBlock(D, num_heads, grid, mlp_ratio, cross) for _ in range(depth)])
        self.reference_memory = ReferenceMemory(D, num_heads, grid, mlp_ratio, reference_layers) if cross else None
        self.interpolater = SideInterpolater(D, num_heads, grid, mlp_ratio) if side_interpolater else None
        self.final_layer = FinalLayer(D, patch_size, self.out_channels)
        self.refiner = Refiner(in_channels, self.out_channels, D, refine_channels) if refine_channels else None
        self.aggregation = AggregationNetwork(
            D, self.num_tokens, pose_feature_dim, pose_num_tokens, reference_feature_dim, reference_num_tokens
        )
        self.fusion = DenseSparseFusion(D) if fusion_blocks is not None else None
        self.fusion_span = None if fusion_blocks is None else tuple(int(b) for b in fusion_blocks)

        self.initialize_weights()
        # Folders and checkpoints saved before the paper's modules were classes name their tensors the public way.
        self.register_load_state_dict_pre_hook(_rename_legacy_keys_hook)

    def initialize_weights(self) -> None:
        """The public code's initialisation (reference Sec. 2), written out."""

        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        table = torch.from_numpy(sincos_2d(self.config.hidden_size, self.grid_size)).float().unsqueeze(0)
        self.pos_embed.data.copy_(table)
        self.decoder_pos_embed.data.copy_(table)
        # Patch embeddings initialised like a Linear layer (DiT).
        for embedder in (self.x_embedder, self.pose_embedder):
            if embedder is not None:
                w = embedder.proj.weight.data
                nn.init.xavier_uniform_(w.view(w.shape[0], -1))
                nn.init.zeros_(embedder.proj.bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every block starts as the identity, and the final layer outputs zeros.
        for block in self.adaln_blocks():
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)
        if self.refiner is not None:  # the refiner starts as the identity on the prediction
            nn.init.zeros_(self.refiner.conv_out.weight)
            nn.init.zeros_(self.refiner.conv_out.bias)
            nn.init.zeros_(self.refiner.modulation[-1].weight)
            nn.init.zeros_(self.refiner.modulation[-1].bias)
        # Reference attention starts switched off (zero output projection), like adaLN-Zero's gates.
        for block in self.blocks if self.reference_memory is not None else []:
            nn.init.zeros_(block.cross_attn.proj.weight)
            nn.init.zeros_(block.cross_attn.proj.bias)
        if self.interpolater is not None:
            nn.init.normal_(self.interpolater.mask_token, std=0.02)
        if self.fusion is not None:  # [0 | I]: the span's output, unchanged
            D = self.config.hidden_size
            nn.init.zeros_(self.fusion.proj.weight)
            nn.init.zeros_(self.fusion.proj.bias)
            self.fusion.proj.weight.data[:, D:] = torch.eye(D)
        agg = self.aggregation
        for layer in (agg.mlp_dino_pose, agg.mlp_dino_img, agg.mlp_final):
            nn.init.normal_(layer[0].weight, std=0.02)
        for layer in (agg.conv1d_pose, agg.conv1d_global, agg.conv1d_local):
            nn.init.normal_(layer[0].weight, std=0.02)

    def adaln_blocks(self) -> list[nn.Module]:
        blocks = list(self.blocks)
        if self.interpolater is not None:
            blocks += list(self.interpolater.sideblocks) + list(self.interpolater.sideblocks_cross)
        return blocks

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False, inference: bool = False):
        """Parameter count; `inference=True` leaves out the training-only side blocks (as the README's 33.5M)."""
        count = super().num_parameters(only_trainable=only_trainable, exclude_embeddings=exclude_embeddings)
        if inference and self.interpolater is not None:  # the published count keeps the mask token
            count -= sum(
                p.numel()
                for m in (self.interpolater.sideblocks, self.interpolater.sideblocks_cross)
                for p in m.parameters()
            )
        return count

    # ---- conditions: once per image --------------------------------------------------------------------------

    def embed_latent(self, latent: torch.Tensor) -> torch.Tensor:
        """Latent (B, C, H, W) -> position-embedded tokens (B, N, D); shared by the noisy target and the reference."""
        return self.x_embedder(latent) + self.pos_embed

    def pose_map(self, pose_image: torch.Tensor) -> torch.Tensor:
        """The rendered target pose (B, 3, H, W) in [0, 1] -> (B, pose_map_channels, h, w) on the latent grid, by
        pixel-unshuffle (lossless, codec-independent), in [-1, 1]."""
        h, w = self.config.sample_size
        H, W = pose_image.shape[-2:]
        factor = H // h
        if H != h * factor or W != w * factor or 3 * factor * factor != self.config.pose_map_channels:
            raise ValueError(
                f"a {H}x{W} pose image does not give {self.config.pose_map_channels} channels on the {h}x{w} grid"
            )
        return F.pixel_unshuffle(pose_image * 2 - 1, factor)

    def encode_conditions(
        self,
        pose_features: torch.Tensor,
        reference_features: torch.Tensor,
        reference_latent: torch.Tensor,
        pose_image: torch.Tensor | None = None,
    ) -> Conditions:
        """The per-image conditions from the encoders' features (B, T, W), the reference latent (B, C, H, W) and,
        for a model with a pose map, the rendered target pose (B, 3, H', W') in [0, 1]."""
        if (pose_image is None) != (self.pose_embedder is None):
            need = "needs" if self.pose_embedder is not None else "was built without"
            raise ValueError(f"this model {need} a pose image (pose_map_channels={self.config.pose_map_channels})")
        reference_tokens = self.embed_latent(reference_latent)  # (B, N, D)
        return Conditions(
            y=self.aggregation(pose_features, reference_features, reference_tokens),  # (B, D)
            reference_tokens=reference_tokens,
            reference_memory=None if self.reference_memory is None else self.reference_memory(reference_tokens),
            pose_map=None if pose_image is None else self.pose_map(pose_image).to(reference_tokens.dtype),
        )

    # ---- the denoiser ----------------------------------------------------------------------------------------

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        conditions: Conditions,
        drop_condition: torch.Tensor | None = None,
        ids_keep: torch.Tensor | None = None,
        cache: FeatureCache | None = None,
        route: TokenRoute | None = None,
    ) -> torch.Tensor:
        """Predict (B, out_channels, H, W) from the noisy latent `sample` (B, C, H, W) at `timestep` (B,) or ().

        drop_condition: (B,) bool, True where y and the reference memory are dropped: the unconditional model of
            classifier-free guidance (the pose map stays, as in PIDM). The objective draws it (p = 0.1).
        ids_keep: (B, K) kept token indices from `random_masking`: the masked pass of training.
        cache: a sampling call's feature cache (`xmdpt.models.cache`), which may reuse the blocks' work of earlier
            steps: the whole stack's residual (TeaCache) or each layer's output (FORA).
        route: token routing of training (`TokenRoute`): blocks route.start .. route.end - 1 see only route.ids.
        """
        x = self.embed_latent(sample)  # (B, N, D)
        if self.pose_embedder is not None:
            x = x + self.pose_embedder(conditions.pose_map)  # (B, N, D)
        y, memory, gate = conditions.y, conditions.reference_memory, None
        if drop_condition is not None:
            keep = (~drop_condition).to(y.dtype)  # (B,)
            y, gate = y * keep[:, None], keep.view(-1, 1, 1)
        c = self.t_embedder(timestep.expand(sample.shape[0])) + y  # (B, D)
        split, masked, context = self.config.depth - self.config.decode_layers, ids_keep is not None, None
        if masked:  # mask cross-prediction: the first `split` blocks see the kept tokens only
            x = gather_tokens(x, ids_keep)  # (B, K, D)
            context = self.reference_context(conditions.reference_tokens, c)  # (B, N, D)
        if cache is not None and (masked or route is not None):
            raise ValueError("a feature cache is for sampling; the masked pass and token routing are training's")
        if route is not None and not 0 <= route.start < route.end <= split:
            raise ValueError(f"a token route over blocks [{route.start}, {route.end}) must end by block {split}")
        if route is not None and self.fusion_span not in (None, (route.start, route.end)):
            raise ValueError(
                f"a token route over [{route.start}, {route.end}) in a model fused over {self.fusion_span}"
            )
        if cache is not None and cache.skip_blocks(x, lambda: self.blocks[0].modulated_input(x, c)):
            x = cache.residual(x)  # (B, N, D) TeaCache: the stack's residual from the last full step
        else:
            x = self.run_blocks(x, c, memory, gate, ids_keep, context, route, cache)  # (B, N, D)
        x = self.unpatchify(self.final_layer(x, c))  # (B, C_out, H, W)
        return x if self.refiner is None else self.refiner(x, sample, c)  # (B, C_out, H, W)

    def run_blocks(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        memory: torch.Tensor | None,
        gate: torch.Tensor | None,
        ids_keep: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        route: TokenRoute | None = None,
        cache: FeatureCache | None = None,
        num_blocks: int | None = None,
    ) -> torch.Tensor:
        """The block stack on tokens x (B, N or K, D) -> (B, N, D): the side-interpolater (masked pass) or the decoder
        position embedding before block depth - decode_layers, the token route's span and the fusion after it, the
        cache's layer reuse. num_blocks: only the first that many blocks (None: all)."""
        x_in, split = x, self.config.depth - self.config.decode_layers
        # Token routing: all tokens as the span starts, and the routed ones' grid positions; the fusion's dense input.
        skipped = routed = entering = None
        fused = self.fusion_span or (None, None)
        for i, block in enumerate(self.blocks[:num_blocks]):
            if i == split and ids_keep is not None:
                x = self.interpolater(x, c, ids_keep, context, self.decoder_pos_embed)  # (B, N, D)
            elif i == split:
                x = x + self.decoder_pos_embed
            if i == fused[0]:
                entering = x  # (B, K or N, D)
            keep = ids_keep if i < split else None
            if route is not None and i == route.start:
                skipped, x = x, gather_tokens(x, route.ids)  # (B, R, D)
                # The relative position bias needs the routed tokens' positions on the grid.
                routed = route.ids if keep is None else torch.gather(keep, 1, route.ids)  # (B, R)
            if route is not None and route.start <= i < route.end:
                keep = routed
            layer = _compute if cache is None else partial(cache.layer, i)
            x = block(x, c, keep, memory, gate, layer)  # (B, K, R or N, D)
            if i + 1 == fused[1]:  # SPRINT: the span's input and output, fused; routed-around tokens as the mask token
                x = self.fusion(entering, x, None if route is None else route.ids)  # (B, K or N, D)
            elif route is not None and i + 1 == route.end:  # the routed tokens rejoin the ones that skipped the span
                x = scatter_tokens(skipped, route.ids, x)  # (B, K or N, D)
        if cache is not None:
            cache.store_residual(x_in, x)
        return x  # (B, N, D)

    @torch.no_grad()
    def reference_context(self, reference_tokens: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The reference tokens after the first depth - decode_layers blocks, without gradient (as published): the
        keys and values of the side-interpolater's cross-attention. Only the masked pass needs them."""
        if self.interpolater is None:
            raise ValueError("the masked pass needs a model built with side_interpolater=True")
        split = self.config.depth - self.config.decode_layers
        return self.run_blocks(reference_tokens, c, None, None, num_blocks=split).detach()  # (B, N, D)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, p * p * C) -> (B, C, H, W) for the configured, possibly non-square, grid."""
        p, c = self.config.patch_size, self.out_channels
        grid_h, grid_w = self.grid_size
        x = x.reshape(x.shape[0], grid_h, grid_w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, grid_h * p, grid_w * p)

    def _fix_state_dict_keys_on_load(self, state_dict: dict) -> None:
        """diffusers' `from_pretrained` hook (it bypasses `load_state_dict`'s pre-hooks): rename legacy keys."""
        rename_legacy_keys(state_dict)
        super()._fix_state_dict_keys_on_load(state_dict)


#################################################################################
#                      Public and earlier checkpoint key names                  #
#################################################################################

# The public code (and this package before the paper's modules became classes) kept the aggregation network, the
# side-interpolater and reference attention's memory encoder as loose attributes of the model.
LEGACY_PREFIXES = {
    **{f"{name}.": f"aggregation.{name}." for name in (
        "mlp_dino_pose", "mlp_dino_img", "conv1d_pose", "conv1d_global", "conv1d_local", "mlp_final"
    )},
    "mask_token": "interpolater.mask_token",
    "sideblocks.": "interpolater.sideblocks.",
    "sideblocks_cross.": "interpolater.sideblocks_cross.",
    "reference_blocks.": "reference_memory.blocks.",
    "reference_norm.": "reference_memory.norm.",
}  # fmt: skip


def rename_legacy_keys(state_dict: dict, prefix: str = "") -> dict:
    """Rename, in place, the public code's key names under `prefix` to this module layout; returns the dict."""
    for key in list(state_dict):
        if not key.startswith(prefix):
            continue
        name = key[len(prefix) :]
        for old, new in LEGACY_PREFIXES.items():
            if name.startswith(old) and not name.startswith(new):
                state_dict[prefix + new + name[len(old) :]] = state_dict.pop(key)
                break
    return state_dict


def _rename_legacy_keys_hook(module, state_dict, prefix, *args) -> None:
    rename_legacy_keys(state_dict, prefix)


#################################################################################
#                                    Presets                                    #
#################################################################################

# Depth, width and heads of the published sizes; all use patch 2.
XMDPT_PRESETS: dict[str, dict[str, int]] = {
    "S/2": dict(depth=12, hidden_size=384, num_heads=6),
    "B/2": dict(depth=12, hidden_size=768, num_heads=12),
    "L/2": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL/2": dict(depth=28, hidden_size=1152, num_heads=16),
}


def xmdpt_from_preset(name: str, **kwargs) -> XMDPT:
    """Build a preset ("S/2", "B/2", "L/2", "XL/2"); keyword arguments override the rest of the config."""
    if name not in XMDPT_PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(XMDPT_PRESETS)}")
    return XMDPT(patch_size=2, **XMDPT_PRESETS[name], **kwargs)
