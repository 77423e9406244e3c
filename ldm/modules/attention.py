"""Cross-attention and the spatial transformer that the SD v1 UNet puts at its attention resolutions."""

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.diffusionmodules.util import GroupNorm32, checkpoint, zero_module
from ldm.util import default


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    chunk: int | None = None,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale) v for q [..., N, d] over k, v [..., M, d] -> [..., N, d]; every attention of the
    model (UNet cross- and self-attention, the VAE's mid-block attention) runs through here.

    `mask` (bool, broadcastable to [..., N, M]) marks the keys to attend to; `scale` defaults to d**-0.5.
    With `chunk`, `chunk` queries at a time: the same result (each query attends independently) with an
    attention matrix of at most chunk x M entries."""
    if chunk is None or q.shape[-2] <= chunk:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    parts = q.split(chunk, dim=-2)
    return torch.cat(
        [F.scaled_dot_product_attention(p, k, v, attn_mask=mask, scale=scale) for p in parts], dim=-2
    )


class GEGLU(nn.Module):
    """Gated GELU: one projection to 2*dim_out, the second half gating the first through GELU."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """Transformer MLP [..., dim] -> [..., dim_out], hidden width mult*dim, GEGLU or GELU input layer."""

    def __init__(
        self, dim: int, dim_out: int | None = None, mult: int = 4, glu: bool = False, dropout: float = 0.0
    ):
        super().__init__()
        inner_dim = int(dim * mult)
        project_in = GEGLU(dim, inner_dim) if glu else nn.Sequential(nn.Linear(dim, inner_dim), nn.GELU())
        self.net = nn.Sequential(project_in, nn.Dropout(dropout), nn.Linear(inner_dim, default(dim_out, dim)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CrossAttention(nn.Module):
    """Multi-head attention of queries x [B, N, query_dim] over context [B, M, context_dim] (x itself if None)."""

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
    ):
        super().__init__()
        inner_dim = dim_head * heads
        context_dim = default(context_dim, query_dim)
        self.scale = dim_head**-0.5
        self.heads = heads
        self.chunk: int | None = None  # queries per attention call (see `attention`)
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Attend and project back: [B, N, query_dim]. `mask` [B, ...] (bool) marks the context tokens to keep."""
        context = default(context, x)
        b, n, _ = x.shape
        q = self.to_q(x).view(b, n, self.heads, -1).transpose(1, 2)
        k = self.to_k(context).view(b, context.shape[1], self.heads, -1).transpose(1, 2)
        v = self.to_v(context).view(b, context.shape[1], self.heads, -1).transpose(1, 2)
        if mask is not None:
            mask = mask.reshape(b, 1, 1, -1)
        out = self.attend(q, k, v, mask)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """The attention itself, q [B, H, N, d] over k, v [B, H, M, d] -> [B, H, N, d] (`attention`); the runtime
        may install a faster kernel for its machine (ldm.runtime.fast_paths)."""
        return attention(q, k, v, self.chunk, mask=mask, scale=self.scale)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the context, and a gated feed-forward, each residual."""

    def __init__(
        self,
        dim: int,
        n_heads: int,
        d_head: int,
        dropout: float = 0.0,
        context_dim: int | None = None,
        gated_ff: bool = True,
        checkpoint: bool = True,
    ):
        super().__init__()
        self.attn1 = CrossAttention(query_dim=dim, heads=n_heads, dim_head=d_head, dropout=dropout)
        self.ff = FeedForward(dim, dropout=dropout, glu=gated_ff)
        self.attn2 = CrossAttention(
            query_dim=dim, context_dim=context_dim, heads=n_heads, dim_head=d_head, dropout=dropout
        )
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.checkpoint = checkpoint

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens x [B, N, dim], context [B, M, context_dim] -> [B, N, dim]."""
        return checkpoint(self._forward, (x, context), self.parameters(), self.checkpoint)

    def _forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context=context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map: [B, C, H, W] -> [B, C, H, W], residual.

    GroupNorm, a 1x1 conv to n_heads*d_head channels, `depth` transformer blocks on the H*W tokens,
    and a zero-initialized 1x1 conv back to C channels. `use_checkpoint` (an addition to the original
    signature) lets the UNet turn off the blocks' gradient checkpointing.
    """

    def __init__(
        self,
        in_channels: int,
        n_heads: int,
        d_head: int,
        depth: int = 1,
        dropout: float = 0.0,
        context_dim: int | None = None,
        use_checkpoint: bool = True,
    ):
        super().__init__()
        self.in_channels = in_channels
        inner_dim = n_heads * d_head
        self.norm = GroupNorm32(32, in_channels, eps=1e-6)
        self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(
                inner_dim,
                n_heads,
                d_head,
                dropout=dropout,
                context_dim=context_dim,
                checkpoint=use_checkpoint,
            )
            for _ in range(depth)
        )
        self.proj_out = zero_module(nn.Conv2d(inner_dim, in_channels, kernel_size=1))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Feature map x [B, C, H, W] (NCHW or channels_last), context [B, M, context_dim]."""
        b, _, h, w = x.shape
        tokens = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)
        for block in self.transformer_blocks:
            tokens = block(tokens, context=context)
        # [B, H*W, C] -> [B, C, H, W] is a free view (channels_last strides); the sum takes x's layout.
        return x + self.proj_out(tokens.transpose(1, 2).reshape(b, -1, h, w))
