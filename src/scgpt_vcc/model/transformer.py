"""scGPT's perturbation model (``TransformerGenerator``), re-implemented on current torch.

The module tree, parameter names and shapes follow ``scgpt.model.generation_model.
TransformerGenerator`` of scgpt 0.2.4 exactly, so a state dict moves between this class and
the upstream class with ``strict=True`` in both directions. Upstream cannot be imported on
current torch (its package ``__init__`` pulls in torchtext); the test suite loads its model
module directly and checks numerical parity.

Computation per position ``i`` of a cell (no positional encoding, no ``<cls>`` token)::

    x_i  = enc_norm(E[gene_i]) + value_encoder(value_i) + P[flag_i]
    h    = N post-norm ReLU transformer encoder layers (x)
    pred = coeff(h_i) * value_i + bias(h_i)        # coeff, bias: MLP d -> d -> d -> 1

Differences from upstream that do not change the parameters or the fp32 result:

* attention goes through :func:`torch.nn.functional.scaled_dot_product_attention`, which
  picks flash / memory-efficient kernels on GPU and works under autocast;
* no attention mask is built when no position is padding (the common case here: every
  cell carries the same gene set), so the fused kernels stay eligible;
* only the plain affine decoder is implemented (upstream's defaults: no explicit zero
  probability, no decoder activation, no adaptive bias); ``cls_decoder`` is built for
  state-dict compatibility and never called, as upstream does for perturbation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "AffineExprDecoder",
    "ClsDecoder",
    "ContinuousValueEncoder",
    "EncoderLayer",
    "ExprDecoder",
    "GeneEncoder",
    "SelfAttention",
    "TransformerEncoder",
    "TransformerGenerator",
]


class GeneEncoder(nn.Module):
    """Gene-token embedding followed by a LayerNorm (keys ``embedding``, ``enc_norm``)."""

    def __init__(self, ntoken: int, d_model: int, padding_idx: int | None = None) -> None:
        super().__init__()
        self.embedding = nn.Embedding(ntoken, d_model, padding_idx=padding_idx)
        self.enc_norm = nn.LayerNorm(d_model)

    def forward(self, gene_ids: Tensor) -> Tensor:
        return self.enc_norm(self.embedding(gene_ids))


class ContinuousValueEncoder(nn.Module):
    """Embed one scalar per position: ``dropout(norm(linear2(relu(linear1(min(x, max))))))``.

    Values are clipped from above at ``max_value`` (512, as upstream) so that a stray
    raw count cannot blow up the embedding; log1p inputs never reach the clip.
    """

    def __init__(self, d_model: int, dropout: float = 0.1, max_value: float = 512.0) -> None:
        super().__init__()
        self.dropout = nn.Dropout(p=dropout)
        self.linear1 = nn.Linear(1, d_model)
        self.activation = nn.ReLU()
        self.linear2 = nn.Linear(d_model, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.max_value = max_value

    def forward(self, values: Tensor) -> Tensor:
        x = torch.clamp(values.unsqueeze(-1), max=self.max_value)
        x = self.linear2(self.activation(self.linear1(x)))
        return self.dropout(self.norm(x))


class SelfAttention(nn.Module):
    """Multi-head self-attention with torch ``MultiheadAttention``'s parameter layout.

    ``in_proj_weight`` stacks the query, key and value projections ([q; k; v], each
    ``d_model`` rows, heads contiguous inside each block): the same layout as flash-attn
    1.x's ``Wqkv``, which is why the pretrained checkpoint loads by renaming only.
    """

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % nhead != 0:
            raise ValueError(f"d_model={d_model} is not divisible by nhead={nhead}")
        self.nhead = nhead
        self.head_dim = d_model // nhead
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d_model, d_model))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * d_model))
        self.out_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Same initialisation as torch.nn.MultiheadAttention.
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """``x``: [B, L, d]; ``attn_mask``: bool [B, 1, 1, L], True = may attend, or None."""
        batch, length, d_model = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        # [B, L, 3, H, Dh] -> 3 x [B, H, L, Dh]
        q, k, v = qkv.view(batch, length, 3, self.nhead, self.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )
        out = out.transpose(1, 2).reshape(batch, length, d_model)
        return self.out_proj(out)


class EncoderLayer(nn.Module):
    """Post-norm transformer encoder layer with ReLU feed-forward.

    Same parameters and arithmetic as ``torch.nn.TransformerEncoderLayer(d_model, nhead,
    d_hid, dropout, batch_first=True)`` (the layer upstream builds without flash-attn):
    ``x = norm1(x + drop1(attn(x)))``; ``x = norm2(x + drop2(linear2(drop(relu(linear1(x))))))``.
    Attention weights get the same dropout probability, as in torch's layer.
    """

    def __init__(self, d_model: int, nhead: int, d_hid: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.self_attn = SelfAttention(d_model, nhead, dropout)
        self.linear1 = nn.Linear(d_model, d_hid)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_hid, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        x = self.norm1(x + self.dropout1(self.self_attn(x, attn_mask)))
        ff = self.linear2(self.dropout(F.relu(self.linear1(x))))
        return self.norm2(x + self.dropout2(ff))


class TransformerEncoder(nn.Module):
    """A stack of :class:`EncoderLayer` under the key ``layers`` (no final norm, as upstream)."""

    def __init__(self, d_model: int, nhead: int, d_hid: int, nlayers: int, dropout: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            EncoderLayer(d_model, nhead, d_hid, dropout) for _ in range(nlayers)
        )

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        for layer in self.layers:
            x = layer(x, attn_mask)
        return x


class ExprDecoder(nn.Module):
    """Per-position MLP ``d -> d -> d -> 1`` with LeakyReLU (keys ``fc.0``, ``fc.2``, ``fc.4``)."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.fc = nn.Sequential(
            nn.Linear(d_model, d_model),
            nn.LeakyReLU(),
            nn.Linear(d_model, d_model),
            nn.LeakyReLU(),
            nn.Linear(d_model, 1),
        )

    def forward(self, h: Tensor) -> Tensor:
        return self.fc(h).squeeze(-1)


class AffineExprDecoder(nn.Module):
    """``pred = coeff(h) * input_value + bias(h)``.

    Predicting an affine map of the input value (rather than the value itself) makes
    "no change" easy to represent (coeff 1, bias 0), which suits perturbation responses
    that leave most genes near their control level.
    """

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.coeff_decoder = ExprDecoder(d_model)
        self.bias_decoder = ExprDecoder(d_model)

    def forward(self, h: Tensor, values: Tensor) -> Tensor:
        return self.coeff_decoder(h) * values + self.bias_decoder(h)


class ClsDecoder(nn.Module):
    """Cell-classification head; present only so state dicts match upstream (never called).

    ``nlayers - 1`` blocks of (Linear, ReLU, LayerNorm) under ``_decoder`` plus
    ``out_layer``; parameter keys are ``_decoder.{0,2,3,5,...}`` and ``out_layer``.
    """

    def __init__(self, d_model: int, n_cls: int, nlayers: int = 3) -> None:
        super().__init__()
        self._decoder = nn.ModuleList()
        for _ in range(nlayers - 1):
            self._decoder.append(nn.Linear(d_model, d_model))
            self._decoder.append(nn.ReLU())
            self._decoder.append(nn.LayerNorm(d_model))
        self.out_layer = nn.Linear(d_model, n_cls)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self._decoder:
            x = layer(x)
        return self.out_layer(x)


class TransformerGenerator(nn.Module):
    """scGPT perturbation-response model; state-dict compatible with scgpt 0.2.4.

    Args:
        ntoken: vocabulary size (rows of the gene embedding), ``len(vocab.json)``.
        d_model: embedding size (``embsize`` in args.json).
        nhead: attention heads (``nheads``).
        d_hid: feed-forward width (``d_hid``).
        nlayers: encoder layers (``nlayers``).
        nlayers_cls: depth of the unused ``cls_decoder`` (``n_layers_cls``).
        n_cls: output width of the unused ``cls_decoder`` (1 in the perturbation tutorial).
        dropout: dropout of the value encoder, attention weights and encoder layers.
        pad_token_id: vocabulary id of ``<pad>``; its embedding row is zero and gets no
            gradient.
        pert_pad_id: perturbation flag whose embedding is fixed at zero. Flags are
            0 = not perturbed, 1 = perturbed; the tutorial passes 0, so "not perturbed"
            adds nothing and only the "perturbed" vector is learnt. Index 2 is unused
            unless ``pert_pad_id`` is 2 (upstream's default).
    """

    def __init__(
        self,
        ntoken: int,
        d_model: int,
        nhead: int,
        d_hid: int,
        nlayers: int,
        *,
        nlayers_cls: int = 3,
        n_cls: int = 1,
        dropout: float = 0.0,
        pad_token_id: int,
        pert_pad_id: int = 0,
    ) -> None:
        super().__init__()
        if not 0 <= pad_token_id < ntoken:
            raise ValueError(f"pad_token_id={pad_token_id} outside the vocabulary of {ntoken}")
        self.ntoken = ntoken
        self.d_model = d_model
        self.nhead = nhead
        self.d_hid = d_hid
        self.nlayers = nlayers
        self.nlayers_cls = nlayers_cls
        self.n_cls = n_cls
        self.pad_token_id = pad_token_id
        self.pert_pad_id = pert_pad_id

        self.encoder = GeneEncoder(ntoken, d_model, padding_idx=pad_token_id)
        self.value_encoder = ContinuousValueEncoder(d_model, dropout)
        self.pert_encoder = nn.Embedding(3, d_model, padding_idx=pert_pad_id)
        self.transformer_encoder = TransformerEncoder(d_model, nhead, d_hid, nlayers, dropout)
        self.decoder = AffineExprDecoder(d_model)
        self.cls_decoder = ClsDecoder(d_model, n_cls, nlayers=nlayers_cls)
        self._init_gene_embedding()

    def _init_gene_embedding(self) -> None:
        # Upstream draws the gene embedding from U(-0.1, 0.1); the <pad> row is kept at
        # zero here (upstream overwrites it too, but it never receives a gradient).
        with torch.no_grad():
            self.encoder.embedding.weight.uniform_(-0.1, 0.1)
            self.encoder.embedding.weight[self.pad_token_id].zero_()

    def encode(
        self,
        gene_ids: Tensor,
        values: Tensor,
        pert_flags: Tensor,
        padding_mask: Tensor | None = None,
    ) -> Tensor:
        """Transformer output [B, L, d] for the inputs of :meth:`forward`."""
        x = self.encoder(gene_ids) + self.value_encoder(values) + self.pert_encoder(pert_flags)
        attn_mask = None
        # One host sync per batch; it keeps the mask-free fast path when nothing is padded.
        if padding_mask is not None and bool(padding_mask.any()):
            if padding_mask.shape != gene_ids.shape:
                raise ValueError(
                    f"padding_mask shape {tuple(padding_mask.shape)} differs from "
                    f"gene_ids shape {tuple(gene_ids.shape)}"
                )
            # SDPA boolean masks mean "may attend"; broadcast over heads and queries.
            attn_mask = ~padding_mask.bool()[:, None, None, :]
        return self.transformer_encoder(x, attn_mask)

    def freeze_cls_head(self) -> TransformerGenerator:
        """Stop training ``cls_decoder``: it is kept for checkpoint compatibility, but the
        perturbation objective never calls it (DDP would wait for its gradients)."""
        self.cls_decoder.requires_grad_(False)
        return self

    def forward(
        self,
        gene_ids: Tensor,
        values: Tensor,
        pert_flags: Tensor,
        padding_mask: Tensor | None = None,
    ) -> Tensor:
        """Predict expression for every input position.

        Args:
            gene_ids: LongTensor [B, L] of vocabulary ids.
            values: FloatTensor [B, L] of input (control) expression, log1p scale.
            pert_flags: LongTensor [B, L]; 1 where the gene is perturbed, else 0.
            padding_mask: optional BoolTensor [B, L], True at padding positions. Padded
                positions are ignored as attention keys; their outputs are meaningless
                and must be masked out of any loss.

        Returns:
            FloatTensor [B, L] of predicted expression (same scale as ``values``).
        """
        h = self.encode(gene_ids, values, pert_flags, padding_mask)
        return self.decoder(h, values)
