"""An independent, deliberately plain re-statement of the public X-MDPT forward (reference Sec. 2-4), with its key
names: manual attention with the full bias table, MAE's cat + gather unshuffle, square grid only. Used to check that
converted checkpoints compute the same function. Written from the reference facts, not copied."""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def sincos(D, side):
    def one(d, pos):
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2))
        out = pos.reshape(-1, 1).double() * omega
        return torch.cat([out.sin(), out.cos()], 1)

    w, h = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="xy")
    return torch.cat([one(D // 2, w), one(D // 2, h)], 1).float()


class RelBias(nn.Module):
    def __init__(self, side, heads):
        super().__init__()
        self.side = side
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * side - 1) ** 2 + 3, heads))
        idx = torch.zeros(side * side, side * side, dtype=torch.long)
        for q in range(side * side):
            for k in range(side * side):
                dh, dw = q // side - k // side, q % side - k % side
                idx[q, k] = (dh + side - 1) * (2 * side - 1) + dw + side - 1
        self.register_buffer("relative_position_index", idx)

    def forward(self):
        n = self.side**2
        return self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1).permute(2, 0, 1)


def attend(q, k, v, bias, heads):
    B, N, D = q.shape
    q, k, v = (z.reshape(B, z.shape[1], heads, D // heads).transpose(1, 2) for z in (q, k, v))
    logits = q @ k.transpose(-2, -1) * (D // heads) ** -0.5 + bias
    return (logits.softmax(-1) @ v).transpose(1, 2).reshape(B, N, D)


class Attn(nn.Module):
    def __init__(self, D, heads, side, cross=False):
        super().__init__()
        self.heads, self.cross = heads, cross
        if cross:
            self.to_q, self.to_kv = nn.Linear(D, D), nn.Linear(D, 2 * D)
        else:
            self.qkv = nn.Linear(D, 3 * D)
        self.proj = nn.Linear(D, D)
        self.rel_pos_bias = RelBias(side, heads)

    def forward(self, x, ids_keep=None, context=None):
        bias = self.rel_pos_bias().unsqueeze(0).repeat(x.shape[0], 1, 1, 1)
        if ids_keep is not None:
            h = bias.shape[1]
            bias = torch.gather(bias, 2, ids_keep[:, None, :, None].repeat(1, h, 1, bias.shape[-1]))
            bias = torch.gather(bias, 3, ids_keep[:, None, None, :].repeat(1, h, ids_keep.shape[1], 1))
        if self.cross:
            q, (k, v) = self.to_q(x), self.to_kv(context).chunk(2, -1)
        else:
            q, k, v = self.qkv(x).chunk(3, -1)
        return self.proj(attend(q, k, v, bias, self.heads))


class Mlp(nn.Module):
    def __init__(self, D):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(D, 4 * D), nn.Linear(4 * D, D)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, D, heads, side, cross=False):
        super().__init__()
        self.attn, self.mlp = Attn(D, heads, side, cross), Mlp(D)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))

    def forward(self, x, c, ids_keep=None, context=None):
        s1, sc1, g1, s2, sc2, g2 = (z.unsqueeze(1) for z in self.adaLN_modulation(c).chunk(6, 1))
        ln = lambda z: F.layer_norm(z, z.shape[-1:], eps=1e-6)  # noqa: E731
        x = x + g1 * self.attn(ln(x) * (1 + sc1) + s1, ids_keep, context)
        return x + g2 * self.mlp(ln(x) * (1 + sc2) + s2)


def head(i, o):
    return nn.Sequential(nn.Linear(i, o), nn.GELU(), nn.LayerNorm(o, eps=1e-12))


def mixer(n, o):
    return nn.Sequential(nn.Conv1d(n, 1, 1), nn.GELU(), nn.LayerNorm(o, eps=1e-12))


class PublicXMDPT(nn.Module):
    def __init__(
        self,
        input_size=8,
        patch=2,
        C=4,
        D=32,
        depth=3,
        heads=2,
        pose_dim=16,
        pose_tokens=5,
        img_dim=24,
        img_tokens=7,
        decode_layer=2,
    ):
        super().__init__()
        side = input_size // patch
        self.side, self.patch, self.C, self.decode_layer, N = side, patch, C, decode_layer, side * side
        self.x_embedder = nn.Module()
        self.x_embedder.proj = nn.Conv2d(C, D, patch, patch)
        self.t_embedder = nn.Module()
        self.t_embedder.mlp = nn.Sequential(nn.Linear(256, D), nn.SiLU(), nn.Linear(D, D))
        self.pos_embed = nn.Parameter(sincos(D, side)[None])
        self.decoder_pos_embed = nn.Parameter(sincos(D, side)[None])
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D))
        self.blocks = nn.ModuleList([Block(D, heads, side) for _ in range(depth)])
        self.sideblocks = nn.ModuleList([Block(D, heads, side)])
        self.sideblocks_cross = nn.ModuleList([Block(D, heads, side, cross=True)])
        self.final_layer = nn.Module()
        self.final_layer.linear = nn.Linear(D, patch * patch * 2 * C)
        self.final_layer.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))
        self.mlp_dino_pose, self.mlp_dino_img, self.mlp_final = head(pose_dim, D), head(img_dim, D), head(D, D)
        self.conv1d_pose, self.conv1d_global, self.conv1d_local = (
            mixer(pose_tokens, D),
            mixer(img_tokens, D),
            mixer(N, D),
        )

    def embed(self, z):
        return self.x_embedder.proj(z).flatten(2).transpose(1, 2) + self.pos_embed

    def forward(self, x, t, pose, img, src, keep, mask_noise=None):
        """keep: (B,) 1 to keep the condition, 0 to drop it. mask_noise: (B, N) uniform noise for the masked pass."""
        half = 128
        freqs = torch.exp(-math.log(10000) * torch.arange(half) / half)
        args = t[:, None].float() * freqs[None]
        temb = self.t_embedder.mlp(torch.cat([args.cos(), args.sin()], -1))
        x = self.embed(x)
        src = self.embed(src)
        y = self.conv1d_pose(self.mlp_dino_pose(pose)) + self.conv1d_global(self.mlp_dino_img(img))
        y = self.mlp_final((y + self.conv1d_local(src))[:, 0])
        c = temb + keep.view(-1, 1) * y
        ids_keep = None
        if mask_noise is not None:
            B, N, D = x.shape
            shuffle = torch.argsort(mask_noise, 1)
            restore = torch.argsort(shuffle, 1)
            ids_keep = shuffle[:, : int(N * 0.7)]
            x = torch.gather(x, 1, ids_keep[..., None].repeat(1, 1, D))
            mask = torch.ones(B, N)
            mask[:, : ids_keep.shape[1]] = 0
            mask = torch.gather(mask, 1, restore)
        masked_stage = ids_keep is not None
        for i, block in enumerate(self.blocks):
            if i == len(self.blocks) - self.decode_layer:
                if masked_stage:
                    tokens = torch.cat([x, self.mask_token.repeat(x.shape[0], N - x.shape[1], 1)], 1)
                    x = torch.gather(tokens, 1, restore[..., None].repeat(1, 1, D)) + self.decoder_pos_embed
                    before = x
                    x = self.sideblocks[0](x, c)
                    x = self.sideblocks_cross[0](x, c, context=src.detach())
                    x = x * mask[..., None] + (1 - mask[..., None]) * before
                    masked_stage = False
                else:
                    x = x + self.decoder_pos_embed
            x = block(x, c, ids_keep if masked_stage else None)
            with torch.no_grad():
                src = block(src, c)
        shift, scale = self.final_layer.adaLN_modulation(c).chunk(2, 1)
        x = self.final_layer.linear(F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale[:, None]) + shift[:, None])
        B, p, s, C2 = x.shape[0], self.patch, self.side, 2 * self.C
        return x.reshape(B, s, s, p, p, C2).permute(0, 5, 1, 3, 2, 4).reshape(B, C2, s * p, s * p)
