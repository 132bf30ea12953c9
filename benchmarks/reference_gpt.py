"""The baseline GPT of ``prior_step.py`` and ``sampling.py``: minGPT as the reference release has it.

Explicit ``q k^T``, ``masked_fill`` with the causal mask buffer, softmax and ``att @ v`` (ours runs
``F.scaled_dot_product_attention``), and the reference's ``forward_with_past`` for cached decoding:
each step's keys/values are concatenated to the past ones with ``torch.cat``. Parameter names are
minGPT's and therefore ours, so a ``vqgan_cli`` GPT's state dict loads with ``strict=True`` and
both compute the same logits (``tests/benchmarks/test_benchmarks.py`` checks it).

The plain forward (training) does not stack the keys/values a cache would keep, so the training
baseline does no work the comparison does not need.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.nn import functional as F

from vqgan_cli.models.gpt import GPT, GPTConfig


class RefAttention(nn.Module):
    """minGPT attention; with ``layer_past`` (2, B, nh, T_past, hs) the new keys/values are
    concatenated to the past ones and the mask is not applied (one new token attends to all)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        C = cfg.n_embd
        self.key, self.query, self.value, self.proj = (nn.Linear(C, C) for _ in range(4))
        self.attn_drop, self.resid_drop = nn.Dropout(0.0), nn.Dropout(0.0)  # identity in eval, called as minGPT does
        self.n_head = cfg.n_head
        self.register_buffer("mask", torch.tril(torch.ones(cfg.block_size, cfg.block_size))
                             .view(1, 1, cfg.block_size, cfg.block_size))

    def forward(self, x: torch.Tensor, layer_past: torch.Tensor | None = None,
                present: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T, C = x.shape
        nh = self.n_head
        k = self.key(x).view(B, T, nh, C // nh).transpose(1, 2)  # (B, nh, T, hs)
        q = self.query(x).view(B, T, nh, C // nh).transpose(1, 2)
        v = self.value(x).view(B, T, nh, C // nh).transpose(1, 2)
        kv = torch.stack((k, v)) if present else None  # (2, B, nh, T, hs)
        if layer_past is not None:
            past_key, past_value = layer_past
            k = torch.cat((past_key, k), dim=-2)
            v = torch.cat((past_value, v), dim=-2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, nh, T, T_all)
        if layer_past is None:
            att = att.masked_fill(self.mask[:, :, :T, :T] == 0, float("-inf"))
        att = self.attn_drop(F.softmax(att, dim=-1))
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_drop(self.proj(y)), kv


class RefBlock(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        C = cfg.n_embd
        self.ln1, self.ln2 = nn.LayerNorm(C), nn.LayerNorm(C)
        self.attn = RefAttention(cfg)
        self.mlp = nn.Sequential(nn.Linear(C, 4 * C), nn.GELU(), nn.Linear(4 * C, C), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor, layer_past: torch.Tensor | None = None,
                present: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        a, kv = self.attn(self.ln1(x), layer_past, present)
        x = x + a
        return x + self.mlp(self.ln2(x)), kv


class RefGPT(nn.Module):
    """minGPT's GPT with the same parameter names as ours, so one state dict fits both."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = nn.Parameter(torch.zeros(1, cfg.block_size, cfg.n_embd))
        self.drop = nn.Dropout(0.0)
        self.blocks = nn.ModuleList(RefBlock(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, vocab) of the whole sequence, as in training."""
        x = self.drop(self.tok_emb(idx) + self.pos_emb[:, :idx.shape[1]])
        for block in self.blocks:
            x, _ = block(x)
        return self.head(self.ln_f(x))

    def forward_with_past(self, idx: torch.Tensor, past: torch.Tensor | None = None,
                          past_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """As the reference: ``past`` (n_layer, 2, B, nh, past_length, hs) or None; returns the
        logits and this call's keys/values (n_layer, 2, B, nh, T, hs)."""
        x = self.tok_emb(idx)
        if past is not None:
            x = x + self.pos_emb[:, past_length, :]
        else:
            x = x + self.pos_emb[:, :idx.shape[1], :]
        x = self.drop(x)
        presents = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, layer_past=past[i] if past is not None else None, present=True)
            presents.append(kv)
        return self.head(self.ln_f(x)), torch.stack(presents)


def reference_model(gpt: GPT) -> RefGPT:
    """A RefGPT holding ``gpt``'s very weights, in ``gpt``'s train/eval mode."""
    ref = RefGPT(gpt.cfg).train(gpt.training)
    ref.load_state_dict(gpt.state_dict(), strict=True)
    return ref
