"""LlamaGen networks in PyTorch, written for this project from a reading of the original
(FoundationVision/LlamaGen: autoregressive/models/gpt.py, tokenizer/tokenizer_image/vq_model.py).

Parameter names equal the original state-dict keys, so weights trained or generated here load
in the Rust app through the same code path as the published checkpoints. Used for the parity
fixtures (make_fixtures.py) and for training the default model.

Inference semantics follow the original exactly: a zero-initialised KV cache indexed by slot,
a causal mask over slots (never-written slots stay visible with zero K/V), and 2D RoPE whose
condition positions have cos = sin = 0.
"""

from dataclasses import dataclass, field
from typing import List, Optional

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def round_up(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - n % k


@dataclass
class GptArgs:
    dim: int = 256
    n_layer: int = 4
    n_head: int = 4
    vocab_size: int = 1024
    num_classes: int = 1000
    cls_token_num: int = 1
    caption_dim: Optional[int] = None
    multiple_of: int = 256
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    grid_h: int = 16
    grid_w: int = 16
    class_dropout_prob: float = 0.1
    dropout: float = 0.0

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def ffn_hidden(self) -> int:
        return round_up(int(2 * 4 * self.dim / 3), self.multiple_of)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.type_as(x) * self.weight


def rope_table_2d(args: GptArgs) -> torch.Tensor:
    """[T + h*w, head_dim/2, 2] (cos, sin); zero rows for the condition slots."""
    half = args.head_dim // 2
    quarter = half // 2
    inv = 1.0 / (args.rope_base ** (torch.arange(0, half, 2)[:quarter].float() / half))
    rows = torch.outer(torch.arange(args.grid_h).float(), inv)  # [h, quarter]
    cols = torch.outer(torch.arange(args.grid_w).float(), inv)  # [w, quarter]
    ang = torch.cat(
        [
            rows[:, None, :].expand(-1, args.grid_w, -1),
            cols[None, :, :].expand(args.grid_h, -1, -1),
        ],
        dim=-1,
    ).reshape(args.grid_h * args.grid_w, half)
    table = torch.stack([ang.cos(), ang.sin()], dim=-1)
    return torch.cat([torch.zeros(args.cls_token_num, half, 2), table])


def rotate(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """x: [B, S, H, D]; table: [S, D/2, 2]; interleaved pairs, computed in f32."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    t = table.view(1, pairs.size(1), 1, pairs.size(3), 2)
    a, b = pairs[..., 0], pairs[..., 1]
    out = torch.stack([a * t[..., 0] - b * t[..., 1], b * t[..., 0] + a * t[..., 1]], dim=-1)
    return out.flatten(3).type_as(x)


class Attention(nn.Module):
    def __init__(self, args: GptArgs):
        super().__init__()
        self.args = args
        self.wqkv = nn.Linear(args.dim, 3 * args.dim, bias=False)
        self.wo = nn.Linear(args.dim, args.dim, bias=False)
        self.cache_k = None
        self.cache_v = None
        # set to True to keep the last cached pass's attention probabilities [B, H, k, S]
        self.record = False
        self.last_probs = None

    def forward(self, x, table, slots=None, mask=None):
        b, s, _ = x.shape
        a = self.args
        q, k, v = self.wqkv(x).split([a.dim, a.dim, a.dim], dim=-1)
        q = rotate(q.view(b, s, a.n_head, a.head_dim), table)
        k = rotate(k.view(b, s, a.n_head, a.head_dim), table)
        v = v.view(b, s, a.n_head, a.head_dim)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if self.cache_k is not None:
            self.cache_k[:, :, slots] = k
            self.cache_v[:, :, slots] = v
            k, v = self.cache_k, self.cache_v
        if self.record and mask is not None:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(a.head_dim)
            self.last_probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        # without a cache: raster-causal, or a training context mask [B, 1, s, s]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.wo(out.transpose(1, 2).reshape(b, s, a.dim))


class FeedForward(nn.Module):
    def __init__(self, args: GptArgs):
        super().__init__()
        hid = args.ffn_hidden
        self.w1 = nn.Linear(args.dim, hid, bias=False)
        self.w3 = nn.Linear(args.dim, hid, bias=False)
        self.w2 = nn.Linear(hid, args.dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, args: GptArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.drop = nn.Dropout(args.dropout)

    def forward(self, x, table, slots=None, mask=None):
        h = x + self.drop(self.attention(self.attention_norm(x), table, slots, mask))
        return h + self.drop(self.feed_forward(self.ffn_norm(h)))


class LabelEmbedder(nn.Module):
    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        # the last row is the null class used for classifier-free guidance
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels, drop_prob: float = 0.0):
        if drop_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < drop_prob
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels).unsqueeze(1)


class CaptionMLP(nn.Module):
    def __init__(self, cin: int, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(cin, dim, bias=False)
        self.fc2 = nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class CaptionEmbedder(nn.Module):
    def __init__(self, cin: int, dim: int, tokens: int):
        super().__init__()
        self.cap_proj = CaptionMLP(cin, dim)
        self.register_buffer("uncond_embedding", torch.randn(tokens, cin) / cin**0.5)

    def forward(self, caption, drop_prob: float = 0.0):
        if drop_prob > 0:
            drop = torch.rand(caption.shape[0], device=caption.device) < drop_prob
            caption = torch.where(drop[:, None, None], self.uncond_embedding, caption)
        return self.cap_proj(caption)


class Gpt(nn.Module):
    def __init__(self, args: GptArgs):
        super().__init__()
        self.args = args
        if args.caption_dim is None:
            self.cls_embedding = LabelEmbedder(args.num_classes, args.dim)
        else:
            self.cls_embedding = CaptionEmbedder(args.caption_dim, args.dim, args.cls_token_num)
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layer))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.register_buffer("rope", rope_table_2d(args), persistent=False)

    def null_condition(self, cond):
        if self.args.caption_dim is None:
            return torch.full_like(cond, self.args.num_classes)
        return torch.zeros_like(cond) + self.cls_embedding.uncond_embedding

    # -- training / teacher forcing: the whole raster sequence at once, causal ------------
    def forward(self, cond, tokens, drop_prob: float = 0.0, mask=None):
        """cond: labels [B] or captions [B, T, C]; tokens: [B, n] (n <= h*w - 1 for
        prediction of n + 1 cells). Returns logits [B, n + 1, vocab] predicting cells 0..n.
        mask: optional boolean attention mask [B, 1, T + n, T + n] (True = may attend) in
        place of the raster-causal one."""
        t = self.args.cls_token_num
        c = self.cls_embedding(cond, drop_prob)[:, :t]
        x = torch.cat([c, self.tok_embeddings(tokens)], dim=1)
        table = self.rope[: x.shape[1]]
        for layer in self.layers:
            x = layer(x, table, mask=mask)
        return self.output(self.norm(x)).float()[:, t - 1 :]

    # -- inference with the slot-indexed cache ------------------------------------------
    def setup_cache(self, batch: int):
        a = self.args
        slots = a.cls_token_num + a.grid_h * a.grid_w
        for layer in self.layers:
            shape = (batch, a.n_head, slots, a.head_dim)
            layer.attention.cache_k = torch.zeros(shape)
            layer.attention.cache_v = torch.zeros(shape)
        self.causal = torch.tril(torch.ones(slots, slots, dtype=torch.bool))
        self.written = torch.zeros(slots, dtype=torch.bool)

    def drop_cache(self):
        for layer in self.layers:
            layer.attention.cache_k = None
            layer.attention.cache_v = None

    def step(self, x, slots: torch.Tensor, mask_unwritten: bool = False):
        """x: embeddings [B, k, dim] fed at absolute slots [k]; logits [B, k, vocab]."""
        self.written[slots] = True
        mask = self.causal[slots]
        if mask_unwritten:
            mask = mask & self.written[None, :]
        mask = mask[None, None].expand(x.shape[0], 1, -1, -1)
        table = self.rope[slots]
        for layer in self.layers:
            x = layer(x, table, slots, mask)
        return self.output(self.norm(x)).float()

    def prefill(self, cond, mask_unwritten: bool = False):
        t = self.args.cls_token_num
        x = self.cls_embedding(cond)[:, :t]
        return self.step(x, torch.arange(t), mask_unwritten)[:, -1]

    def feed(self, tokens: List[int], positions: List[int], batch: int, mask_unwritten=False):
        ids = torch.tensor(tokens)[None].expand(batch, -1)
        slots = torch.tensor(positions) + self.args.cls_token_num
        return self.step(self.tok_embeddings(ids), slots, mask_unwritten)


# -------------------------------------------------------------------------------------
# VQ tokenizer
# -------------------------------------------------------------------------------------
@dataclass
class VqArgs:
    codebook_size: int = 1024
    codebook_embed_dim: int = 8
    z_channels: int = 64
    ch: int = 32
    ch_mult: List[int] = field(default_factory=lambda: [1, 2, 2])
    num_res_blocks: int = 1
    norm_groups: int = 32
    dropout: float = 0.0
    # "llamagen": LlamaGen's VQ (attention in the lowest-resolution decoder level, l2-normalised
    # codebook). "taming": taming-transformers' VQGAN as Chameleon / Lumina-mGPT use it (no
    # attention outside the middle block, the codebook used as stored); `taming_names` maps
    # the state dict to its key names.
    style: str = "llamagen"


def group_norm(args: VqArgs, c: int) -> nn.GroupNorm:
    return nn.GroupNorm(args.norm_groups, c, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, args: VqArgs, cin: int, cout: int):
        super().__init__()
        self.norm1 = group_norm(args, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = group_norm(args, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.drop = nn.Dropout(args.dropout)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)
        else:
            self.nin_shortcut = None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    def __init__(self, args: VqArgs, c: int):
        super().__init__()
        self.norm = group_norm(args, c)
        self.q = nn.Conv2d(c, c, 1)
        self.k = nn.Conv2d(c, c, 1)
        self.v = nn.Conv2d(c, c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x):
        b, c, hh, ww = x.shape
        n = self.norm(x)
        q = self.q(n).reshape(b, c, hh * ww).transpose(1, 2)
        k = self.k(n).reshape(b, c, hh * ww)
        v = self.v(n).reshape(b, c, hh * ww)
        att = torch.softmax(torch.bmm(q, k) * c**-0.5, dim=2)
        out = torch.bmm(v, att.transpose(1, 2)).reshape(b, c, hh, ww)
        return x + self.proj_out(out)


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Level(nn.Module):
    pass


class Encoder(nn.Module):
    def __init__(self, a: VqArgs):
        super().__init__()
        levels = len(a.ch_mult)
        self.conv_in = nn.Conv2d(3, a.ch, 3, padding=1)
        self.conv_blocks = nn.ModuleList()
        block_in = a.ch
        for i in range(levels):
            lvl = Level()
            lvl.res = nn.ModuleList()
            lvl.attn = nn.ModuleList()
            block_out = a.ch * a.ch_mult[i]
            for _ in range(a.num_res_blocks):
                lvl.res.append(ResnetBlock(a, block_in, block_out))
                block_in = block_out
                if i == levels - 1:
                    lvl.attn.append(AttnBlock(a, block_in))
            if i != levels - 1:
                lvl.downsample = Downsample(block_in)
            self.conv_blocks.append(lvl)
        self.mid = nn.ModuleList(
            [ResnetBlock(a, block_in, block_in), AttnBlock(a, block_in), ResnetBlock(a, block_in, block_in)]
        )
        self.norm_out = group_norm(a, block_in)
        self.conv_out = nn.Conv2d(block_in, a.z_channels, 3, padding=1)
        self.levels = levels

    def forward(self, x):
        h = self.conv_in(x)
        for i, lvl in enumerate(self.conv_blocks):
            for j, res in enumerate(lvl.res):
                h = res(h)
                if len(lvl.attn) > 0:
                    h = lvl.attn[j](h)
            if i != self.levels - 1:
                h = lvl.downsample(h)
        for m in self.mid:
            h = m(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, a: VqArgs):
        super().__init__()
        levels = len(a.ch_mult)
        block_in = a.ch * a.ch_mult[-1]
        self.conv_in = nn.Conv2d(a.z_channels, block_in, 3, padding=1)
        self.mid = nn.ModuleList(
            [ResnetBlock(a, block_in, block_in), AttnBlock(a, block_in), ResnetBlock(a, block_in, block_in)]
        )
        self.conv_blocks = nn.ModuleList()
        for i in reversed(range(levels)):
            lvl = Level()
            lvl.res = nn.ModuleList()
            lvl.attn = nn.ModuleList()
            block_out = a.ch * a.ch_mult[i]
            for _ in range(a.num_res_blocks + 1):
                lvl.res.append(ResnetBlock(a, block_in, block_out))
                block_in = block_out
                if i == levels - 1 and a.style == "llamagen":
                    lvl.attn.append(AttnBlock(a, block_in))
            if i != 0:
                lvl.upsample = Upsample(block_in)
            self.conv_blocks.append(lvl)
        self.norm_out = group_norm(a, block_in)
        self.conv_out = nn.Conv2d(block_in, 3, 3, padding=1)
        self.levels = levels

    def forward(self, z):
        h = self.conv_in(z)
        for m in self.mid:
            h = m(h)
        for i, lvl in enumerate(self.conv_blocks):
            for j, res in enumerate(lvl.res):
                h = res(h)
                if len(lvl.attn) > 0:
                    h = lvl.attn[j](h)
            if i != self.levels - 1:
                h = lvl.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Quantizer(nn.Module):
    def __init__(self, a: VqArgs):
        super().__init__()
        self.embedding = nn.Embedding(a.codebook_size, a.codebook_embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / a.codebook_size, 1.0 / a.codebook_size)
        self.l2 = a.style == "llamagen"

    def codebook(self):
        if not self.l2:
            return self.embedding.weight
        return F.normalize(self.embedding.weight, p=2, dim=-1)

    def forward(self, z):
        """z: [B, C, h, w] -> (quantised with straight-through grads, codes [B, h, w], losses)."""
        zf = F.normalize(z.permute(0, 2, 3, 1), p=2, dim=-1)
        cb = self.codebook()
        d = (zf.reshape(-1, zf.shape[-1]) @ cb.t()).neg()  # cosine distance ranking
        codes = d.argmin(dim=1).view(zf.shape[:-1])
        zq = cb[codes]
        vq_loss = (zq - zf.detach()).pow(2).mean()
        commit = (zq.detach() - zf).pow(2).mean()
        zq = zf + (zq - zf).detach()
        return zq.permute(0, 3, 1, 2), codes, vq_loss, commit

    def lookup(self, codes):
        """codes: [B, h, w] -> [B, C, h, w]"""
        return self.codebook()[codes].permute(0, 3, 1, 2)


class VqModel(nn.Module):
    def __init__(self, a: VqArgs):
        super().__init__()
        self.args = a
        self.encoder = Encoder(a)
        self.decoder = Decoder(a)
        self.quantize = Quantizer(a)
        self.quant_conv = nn.Conv2d(a.z_channels, a.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(a.codebook_embed_dim, a.z_channels, 1)

    def encode(self, x):
        return self.quantize(self.quant_conv(self.encoder(x)))

    def decode_code(self, codes):
        return self.decoder(self.post_quant_conv(self.quantize.lookup(codes)))

    def forward(self, x):
        zq, codes, vq_loss, commit = self.encode(x)
        return self.decoder(self.post_quant_conv(zq)), codes, vq_loss, commit


def taming_names(sd: dict, levels: int) -> dict:
    """A decoder state dict of this module with taming-transformers' key names: `mid.0/1/2` ->
    `mid.block_1/attn_1/block_2`, decoder level `conv_blocks.L` (lowest resolution first) ->
    `up.{levels-1-L}` with `res` -> `block`."""
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        if parts[:2] == ["decoder", "mid"]:
            parts[2] = ["block_1", "attn_1", "block_2"][int(parts[2])]
        elif parts[:2] == ["decoder", "conv_blocks"]:
            parts[1:3] = ["up", str(levels - 1 - int(parts[2]))]
            if parts[3] == "res":
                parts[3] = "block"
        out[".".join(parts)] = v
    return out


def to_uint8(img: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> uint8 the way LlamaGen's samplers save images."""
    return ((img.clamp(-1, 1) + 1) * 127.5 + 0.5).clamp(0, 255).to(torch.uint8)
