"""DINO's deformable encoder-decoder with two-stage mixed query selection.

Module and parameter names follow the official implementation so that ``state_dict()`` is the
official checkpoint layout (``transformer.encoder.layers.0.self_attn.sampling_offsets.weight`` ...).
Shapes: ``bs`` batch, ``S = sum(H_l W_l)`` tokens, ``C`` hidden size, ``nq`` queries (DN + matching).
"""
from __future__ import annotations

import copy
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import host_transfer
from .box_ops import inverse_sigmoid
from .deformable_attention import MSDeformAttn
from .layers import MLP
from .ops import is_exporting
from .position_encoding import sine_embed_boxes
from .query_selection import encoder_proposals, gather_tokens, select_topk_proposals, token_grid


class DeformableEncoderLayer(nn.Module):
    """Post-norm layer: deformable self-attention over all levels, then FFN."""

    def __init__(self, d_model: int, d_ffn: int, dropout: float, n_levels: int, n_heads: int, n_points: int):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index, padding_mask, level_shapes=None):
        """``src``/``pos`` ``[bs, S, C]``, ``reference_points`` ``[bs, S, L, 2]`` -> ``[bs, S, C]``."""
        src = self.norm1(src + self.dropout1(self.self_attn(
            src + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask, level_shapes)))
        src = self.norm2(src + self.dropout3(self.linear2(self.dropout2(F.relu(self.linear1(src))))))
        return src


class DeformableEncoder(nn.Module):
    def __init__(self, layer: DeformableEncoderLayer, num_layers: int, use_checkpoint: bool = False):
        super().__init__()
        self.layers = nn.ModuleList([copy.deepcopy(layer) for _ in range(num_layers)])
        self.use_checkpoint = use_checkpoint

    @staticmethod
    def reference_points(spatial_shapes: torch.Tensor, valid_ratios: torch.Tensor,
                         num_tokens: Optional[int] = None,
                         level_shapes: Optional[Sequence[Tuple[int, int]]] = None) -> torch.Tensor:
        """Token centres normalised by the valid region, seen from every level -> ``[bs, S, L, 2]``.

        While exporting (``num_tokens`` = S given) the level sizes are read in the graph from
        ``spatial_shapes``; the result is bit-identical to the eager loop's, which takes them from
        ``level_shapes`` (Python ints) when given, else reads ``spatial_shapes`` back.
        """
        if is_exporting() and num_tokens is not None:
            level, y, x = token_grid(spatial_shapes, num_tokens)
            sizes = spatial_shapes[level].to(torch.float32)  # [S, 2] (h, w)
            ref_y = (y.to(torch.float32) + 0.5)[None] / (valid_ratios[:, level, 1] * sizes[:, 0])
            ref_x = (x.to(torch.float32) + 0.5)[None] / (valid_ratios[:, level, 0] * sizes[:, 1])
            return torch.stack((ref_x, ref_y), -1)[:, :, None] * valid_ratios[:, None]
        points = []
        for level, (h, w) in enumerate(spatial_shapes.tolist() if level_shapes is None else level_shapes):
            ref_y, ref_x = torch.meshgrid(
                torch.linspace(0.5, h - 0.5, h, dtype=torch.float32, device=valid_ratios.device),
                torch.linspace(0.5, w - 0.5, w, dtype=torch.float32, device=valid_ratios.device),
                indexing="ij",
            )
            ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, level, 1] * h)
            ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, level, 0] * w)
            points.append(torch.stack((ref_x, ref_y), -1))
        return torch.cat(points, 1)[:, :, None] * valid_ratios[:, None]

    def forward(self, src, pos, spatial_shapes, level_start_index, valid_ratios, padding_mask, level_shapes=None):
        """``src``/``pos`` ``[bs, S, C]``, ``valid_ratios [bs, L, 2]``, ``padding_mask [bs, S]`` -> ``[bs, S, C]``.

        ``level_shapes``: ``spatial_shapes`` as Python ints, if known.
        """
        reference_points = self.reference_points(spatial_shapes, valid_ratios, src.shape[1], level_shapes)
        output = src
        for layer in self.layers:
            args = (output, pos, reference_points, spatial_shapes, level_start_index, padding_mask, level_shapes)
            if self.use_checkpoint and self.training:
                output = torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False)
            else:
                output = layer(*args)
        return output


class DeformableDecoderLayer(nn.Module):
    """Self-attention among queries, deformable cross-attention into the memory, FFN (post-norm).

    Tensors are sequence-first (``[nq, bs, C]``) like ``nn.MultiheadAttention``'s default.
    """

    def __init__(self, d_model: int, d_ffn: int, dropout: float, n_levels: int, n_heads: int, n_points: int):
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt, query_pos, reference_points, memory, memory_padding_mask,
                level_start_index, spatial_shapes, self_attn_mask=None, level_shapes=None):
        """
        Args:
            tgt, query_pos: ``[nq, bs, C]``.
            reference_points: ``[nq, bs, L, 4]`` boxes scaled by each level's valid ratio.
            memory: ``[S, bs, C]``; memory_padding_mask ``[bs, S]``.
            self_attn_mask: ``[nq, nq]`` bool, True = may not attend (denoising groups).
            level_shapes: ``spatial_shapes`` as Python ints, if known.
        """
        q = k = tgt + query_pos
        tgt = self.norm2(tgt + self.dropout2(self.self_attn(q, k, tgt, attn_mask=self_attn_mask)[0]))
        attended = self.cross_attn((tgt + query_pos).transpose(0, 1), reference_points.transpose(0, 1).contiguous(),
                                   memory.transpose(0, 1), spatial_shapes, level_start_index, memory_padding_mask,
                                   level_shapes)
        tgt = self.norm1(tgt + self.dropout1(attended.transpose(0, 1)))
        tgt = self.norm3(tgt + self.dropout4(self.linear2(self.dropout3(F.relu(self.linear1(tgt))))))
        return tgt


class DeformableDecoder(nn.Module):
    """Iterative box refinement with look-forward-twice (DINO §3.5).

    ``bbox_embed``/``class_embed`` are the detector's (shared) heads, attached after construction.
    """

    def __init__(self, layer: DeformableDecoderLayer, num_layers: int, d_model: int, use_checkpoint: bool = False):
        super().__init__()
        self.layers = nn.ModuleList([copy.deepcopy(layer) for _ in range(num_layers)])
        self.norm = nn.LayerNorm(d_model)
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)
        self.d_model = d_model
        self.use_checkpoint = use_checkpoint
        self.bbox_embed: Optional[nn.ModuleList] = None
        self.class_embed: Optional[nn.ModuleList] = None

    def forward(self, tgt, memory, memory_padding_mask, refpoints_logit, level_start_index, spatial_shapes,
                valid_ratios, self_attn_mask=None, level_shapes=None):
        """
        Args:
            tgt: ``[nq, bs, C]`` content queries; memory ``[S, bs, C]``.
            refpoints_logit: ``[nq, bs, 4]`` initial anchors in logit space.
            valid_ratios: ``[bs, L, 2]``.
            level_shapes: ``spatial_shapes`` as Python ints, if known.

        Returns:
            hidden states: list of ``num_layers`` ``[bs, nq, C]`` (after the final norm);
            references: list of ``num_layers + 1`` ``[bs, nq, 4]`` sigmoid boxes — entry 0 the input
            anchors, entry ``i > 0`` layer ``i-1``'s refined boxes *before* detaching, which is what lets
            layer ``i``'s loss reach layer ``i-1``'s box head (look forward twice).
        """
        output = tgt
        hidden = []
        reference_points = refpoints_logit.sigmoid()
        references = [reference_points]
        ratios = torch.cat([valid_ratios, valid_ratios], -1)[None, :]
        for layer_id, layer in enumerate(self.layers):
            reference_input = reference_points[:, :, None] * ratios
            query_pos = self.ref_point_head(sine_embed_boxes(reference_input[:, :, 0, :], self.d_model // 2))
            args = (output, query_pos, reference_input, memory, memory_padding_mask, level_start_index,
                    spatial_shapes, self_attn_mask, level_shapes)
            if self.use_checkpoint and self.training:
                output = torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False)
            else:
                output = layer(*args)
            refined = (self.bbox_embed[layer_id](output) + inverse_sigmoid(reference_points)).sigmoid()
            reference_points = refined.detach()
            references.append(refined)
            hidden.append(self.norm(output))
        return [h.transpose(0, 1) for h in hidden], [r.transpose(0, 1) for r in references]


class DeformableTransformer(nn.Module):
    """Encoder, two-stage query selection and decoder (official ``DeformableTransformer`` layout)."""

    def __init__(self, d_model: int = 256, nhead: int = 8, num_queries: int = 900, num_encoder_layers: int = 6,
                 num_decoder_layers: int = 6, dim_feedforward: int = 2048, dropout: float = 0.0,
                 num_feature_levels: int = 4, enc_n_points: int = 4, dec_n_points: int = 4,
                 use_checkpoint: bool = False):
        super().__init__()
        self.d_model = d_model
        self.num_queries = num_queries
        self.num_feature_levels = num_feature_levels
        self.num_decoder_layers = num_decoder_layers
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        self.encoder = DeformableEncoder(
            DeformableEncoderLayer(d_model, dim_feedforward, dropout, num_feature_levels, nhead, enc_n_points),
            num_encoder_layers, use_checkpoint)
        self.decoder = DeformableDecoder(
            DeformableDecoderLayer(d_model, dim_feedforward, dropout, num_feature_levels, nhead, dec_n_points),
            num_decoder_layers, d_model, use_checkpoint)
        # mixed query selection: learnable content queries + encoder-selected anchors
        self.tgt_embed = nn.Embedding(num_queries, d_model)
        self.enc_output = nn.Linear(d_model, d_model)
        self.enc_output_norm = nn.LayerNorm(d_model)
        # heads for the encoder proposals, attached by the detector (separate from the decoder heads)
        self.enc_out_bbox_embed: Optional[nn.Module] = None
        self.enc_out_class_embed: Optional[nn.Module] = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        nn.init.normal_(self.level_embed)
        nn.init.normal_(self.tgt_embed.weight)

    @staticmethod
    def valid_ratio(mask: torch.Tensor) -> torch.Tensor:
        """Fraction of each map that is image, ``mask [bs, H, W]`` -> ``[bs, 2]`` ``(w, h)``."""
        _, h, w = mask.shape
        valid_h = torch.sum(~mask[:, :, 0], 1)
        valid_w = torch.sum(~mask[:, 0, :], 1)
        return torch.stack([valid_w.float() / w, valid_h.float() / h], -1)

    def forward(self, srcs: List[torch.Tensor], masks: List[torch.Tensor], pos_embeds: List[torch.Tensor],
                dn_query_boxes: Optional[torch.Tensor] = None, dn_query_labels: Optional[torch.Tensor] = None,
                attn_mask: Optional[torch.Tensor] = None, query_indices: Optional[torch.Tensor] = None):
        """
        Args:
            srcs, pos_embeds: per level ``[bs, C, H_l, W_l]``; masks per level ``[bs, H_l, W_l]``.
            dn_query_boxes: ``[bs, pad, 4]`` logit-space noised GT boxes (training) or None.
            dn_query_labels: ``[bs, pad, C]`` embedded noised labels, or None.
            attn_mask: ``[pad + nq, pad + nq]`` bool decoder self-attention mask, or None.
            query_indices: ``[bs, nq]`` int64 encoder token indices (into ``S``) to use as the
                selected proposals, in that order, instead of the top-``nq`` by score; None selects.

        Returns:
            ``(hidden, references, enc_hidden, enc_boxes, init_proposals)``: decoder hidden states
            (list of ``[bs, pad+nq, C]``), references (list of ``[bs, pad+nq, 4]``), the selected
            encoder tokens ``[bs, nq, C]``, their refined boxes ``[bs, nq, 4]`` (sigmoid, not detached)
            and the unrefined proposals ``[bs, nq, 4]`` (sigmoid).
        """
        src_flat, mask_flat, pos_flat, shapes = [], [], [], []
        for level, (src, mask, pos) in enumerate(zip(srcs, masks, pos_embeds)):
            shapes.append(tuple(src.shape[-2:]))
            src_flat.append(src.flatten(2).transpose(1, 2))
            mask_flat.append(mask.flatten(1))
            pos_flat.append(pos.flatten(2).transpose(1, 2) + self.level_embed[level].view(1, 1, -1))
        src_flat = torch.cat(src_flat, 1)
        mask_flat = torch.cat(mask_flat, 1)
        pos_flat = torch.cat(pos_flat, 1)
        level_shapes = None  # Python level sizes for eager runs: nothing is read back from the device
        if torch.jit.is_tracing():  # read in the graph, so an exported model is not frozen at the traced size
            spatial_shapes = torch.stack([torch._shape_as_tensor(src)[-2:] for src in srcs]).to(src_flat.device)
        elif is_exporting():  # (torch.export records the symbolic sizes itself)
            spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=src_flat.device)
        else:
            level_shapes = [(int(h), int(w)) for h, w in shapes]
            spatial_shapes = host_transfer.to_device(level_shapes, src_flat.device)
        level_start_index = torch.cat((spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1]))
        valid_ratios = torch.stack([self.valid_ratio(m) for m in masks], 1)

        memory = self.encoder(src_flat, pos_flat, spatial_shapes, level_start_index, valid_ratios, mask_flat,
                              level_shapes)

        # two-stage: score every encoder token as a proposal, keep the top num_queries as anchors
        output_memory, output_proposals = encoder_proposals(memory, mask_flat, spatial_shapes,
                                                            level_shapes=level_shapes)
        output_memory = self.enc_output_norm(self.enc_output(output_memory))
        enc_class = self.enc_out_class_embed(output_memory)
        enc_coord_logit = self.enc_out_bbox_embed(output_memory) + output_proposals
        if query_indices is None:
            topk = select_topk_proposals(enc_class, self.num_queries)
        else:
            if query_indices.shape != (memory.shape[0], self.num_queries):
                raise ValueError(f"query_indices must be [{memory.shape[0]}, {self.num_queries}], "
                                 f"got {tuple(query_indices.shape)}")
            topk = query_indices.to(device=enc_class.device, dtype=torch.long)
        anchors_undetached = gather_tokens(enc_coord_logit, topk)
        init_proposals = gather_tokens(output_proposals, topk).sigmoid()
        enc_hidden = gather_tokens(output_memory, topk)
        bs = memory.shape[0]
        # NOTE: mixed query selection — positions come from the encoder (detached), content from
        # learnable embeddings, not from the selected tokens.
        refpoints = anchors_undetached.detach()
        tgt = self.tgt_embed.weight[:, None, :].repeat(1, bs, 1).transpose(0, 1)
        if dn_query_boxes is not None:
            refpoints = torch.cat([dn_query_boxes, refpoints], dim=1)
            tgt = torch.cat([dn_query_labels, tgt], dim=1)

        hidden, references = self.decoder(
            tgt.transpose(0, 1), memory.transpose(0, 1), mask_flat, refpoints.transpose(0, 1),
            level_start_index, spatial_shapes, valid_ratios, self_attn_mask=attn_mask, level_shapes=level_shapes)
        return hidden, references, enc_hidden, anchors_undetached.sigmoid(), init_proposals
