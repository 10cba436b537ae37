"""Dual encoder for entity linking: one BERT encodes mentions and concept names; score = scale * cosine.

The model is a regular ``PreTrainedModel`` (save/load, Trainer) whose ``forward`` returns ``logits`` of shape
``[batch, K]`` over K candidate names and a cross-entropy ``loss``, so curvature (Fisher) code can treat it
like any K-way classifier. The encoder runs once per forward on all rows concatenated, and the rows of one
example are contiguous (see :meth:`DualEncoderModel.rows_per_example`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    AutoModel,
    AutoTokenizer,
    BertConfig,
    BertModel,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers import initialization as init
from transformers.configuration_utils import PreTrainedConfig
from transformers.utils import ModelOutput

from .dictionary import normalize_name


class DualEncoderConfig(PreTrainedConfig):
    """Configuration of :class:`DualEncoderModel`.

    ``encoder_config`` is the wrapped ``BertConfig`` (dict accepted), ``scale`` the fixed factor applied to
    cosine similarities (a temperature of 1/scale; stored as a buffer, never trained), ``max_length`` the
    token budget for mentions and names, ``tokenizer_name_or_path`` where :meth:`DualEncoderModel.encode`
    finds a tokenizer when none is attached or saved next to the weights.
    """

    model_type = "hf_continual_dual_encoder"
    sub_configs_defaults = {"encoder_config": BertConfig}

    encoder_config: BertConfig | dict | None = None
    scale: float = 20.0
    max_length: int = 25
    tokenizer_name_or_path: str | None = None


@dataclass
class DualEncoderOutput(ModelOutput):
    """``loss``: mean cross-entropy over the K candidates (when ``labels`` are given); ``logits``: [B, K]
    scaled cosines; ``mention_embeddings`` [B, H] and ``candidate_embeddings`` [B, K, H], L2-normalised."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    mention_embeddings: torch.Tensor | None = None
    candidate_embeddings: torch.Tensor | None = None


def _pad_to(
    ids: torch.Tensor, mask: torch.Tensor, length: int, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    extra = length - ids.shape[-1]
    if extra <= 0:
        return ids, mask
    return F.pad(ids, (0, extra), value=pad_id), F.pad(mask, (0, extra), value=0)


class DualEncoderModel(PreTrainedModel):
    """Mention/name dual encoder around one ``BertModel`` (mean pooling over the attention mask).

    Row layout (the contract with per-example curvature code): ``forward`` concatenates, for each example
    ``b``, the mention row followed by its K candidate rows, giving one encoder batch of ``B * (1 + K)``
    rows ordered ``[m_0, c_0_0 .. c_0_{K-1}, m_1, c_1_0, ...]``. Rows ``b*(1+K) .. (b+1)*(1+K)-1`` belong to
    example ``b``; :meth:`rows_per_example` returns ``1 + K``.
    """

    config_class = DualEncoderConfig
    config: DualEncoderConfig
    base_model_prefix = "encoder"
    main_input_name = "mention_input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["BertLayer"]

    def __init__(self, config: DualEncoderConfig) -> None:
        super().__init__(config)
        encoder_config = config.encoder_config
        # transformers 5.17 (the image of the GPU machines lent here) leaves a saved sub-config a dict
        if isinstance(encoder_config, dict):
            encoder_config = config.encoder_config = BertConfig(**encoder_config)
        self.encoder = BertModel(encoder_config, add_pooling_layer=False)
        self.register_buffer("scale", torch.tensor(float(config.scale)), persistent=True)
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """BERT's initialisation for encoder modules; the scale buffer is reset from the config."""
        std = self.config.encoder_config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None:
                init.zeros_(module.weight[module.padding_idx])
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif module.__class__.__name__ == "BertEmbeddings":
            init.copy_(module.position_ids, torch.arange(module.position_ids.shape[-1]).expand((1, -1)))
            init.zeros_(module.token_type_ids)
        elif isinstance(module, DualEncoderModel):
            init.constant_(module.scale, float(self.config.scale))

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_base(
        cls,
        name_or_path: str | Path,
        num_hidden_layers: int | None = None,
        scale: float = 20.0,
        max_length: int = 25,
        **from_pretrained_kwargs,
    ) -> DualEncoderModel:
        """Build a dual encoder from a pretrained BERT checkpoint (local path or Hub id), optionally keeping
        only its first ``num_hidden_layers`` layers, and attach that checkpoint's tokenizer."""
        name_or_path = str(name_or_path)
        bert = BertModel.from_pretrained(name_or_path, **from_pretrained_kwargs)
        bert.pooler = None  # mean pooling is used; drop the [CLS] pooler weights
        if num_hidden_layers is not None:
            if not 1 <= num_hidden_layers <= bert.config.num_hidden_layers:
                raise ValueError(f"num_hidden_layers must be in 1..{bert.config.num_hidden_layers}")
            bert.encoder.layer = bert.encoder.layer[:num_hidden_layers]
            bert.config.num_hidden_layers = num_hidden_layers
        config = DualEncoderConfig(
            encoder_config=bert.config,
            scale=scale,
            max_length=max_length,
            tokenizer_name_or_path=name_or_path,
        )
        model = cls(config)
        missing, unexpected = model.encoder.load_state_dict(bert.state_dict(), strict=False)
        if unexpected or [k for k in missing if not k.endswith(("position_ids", "token_type_ids"))]:
            raise RuntimeError(f"encoder weights did not match: missing={missing}, unexpected={unexpected}")
        model.tokenizer = AutoTokenizer.from_pretrained(name_or_path, **from_pretrained_kwargs)
        return model

    def get_tokenizer(self) -> PreTrainedTokenizerBase:
        """The attached tokenizer, else one saved next to the weights, else ``config.tokenizer_name_or_path``."""
        if self.tokenizer is None:
            for source in (self.config.name_or_path, self.config.tokenizer_name_or_path):
                if source:
                    try:
                        self.tokenizer = AutoTokenizer.from_pretrained(source)
                        break
                    except (OSError, ValueError):
                        continue
            else:
                raise ValueError(
                    "no tokenizer attached to the model and none found on disk; set model.tokenizer"
                )
        return self.tokenizer

    def save_pretrained(self, save_directory: str | Path, *args, **kwargs) -> None:
        """``PreTrainedModel.save_pretrained`` plus the attached tokenizer, so the folder is self-contained."""
        super().save_pretrained(save_directory, *args, **kwargs)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(save_directory)

    # ------------------------------------------------------------------ computation
    @staticmethod
    def rows_per_example(inputs: Mapping[str, torch.Tensor]) -> int:
        """Encoder rows per training example, ``1 + K``: one mention row then its K candidate rows.

        Per-example quantities (e.g. Fisher terms from layer hooks) are obtained by summing encoder rows in
        contiguous groups of this size.
        """
        return 1 + int(inputs["candidate_input_ids"].shape[1])

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Mean-pooled, L2-normalised embeddings [N, H] of token rows [N, L]."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return F.normalize(pooled, dim=-1)

    def forward(
        self,
        mention_input_ids: torch.Tensor,
        mention_attention_mask: torch.Tensor,
        candidate_input_ids: torch.Tensor,
        candidate_attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> DualEncoderOutput:
        """Score each mention [B, L] against its K candidates [B, K, L'] -> logits [B, K] (+ CE loss).

        Mentions and candidates are padded to a common length and encoded in ONE encoder call on
        ``B * (1 + K)`` rows, each example's rows contiguous (see the class docstring). No ``**kwargs``:
        the Trainer then averages the returned loss itself instead of rescaling it.
        """
        batch, k = candidate_input_ids.shape[:2]
        length = max(mention_input_ids.shape[-1], candidate_input_ids.shape[-1])
        pad_id = self.config.encoder_config.pad_token_id or 0
        m_ids, m_mask = _pad_to(mention_input_ids, mention_attention_mask, length, pad_id)
        c_ids, c_mask = _pad_to(candidate_input_ids, candidate_attention_mask, length, pad_id)
        ids = torch.cat([m_ids.unsqueeze(1), c_ids], dim=1).reshape(batch * (1 + k), length)
        mask = torch.cat([m_mask.unsqueeze(1), c_mask], dim=1).reshape(batch * (1 + k), length)
        emb = self.embed(ids, mask).reshape(batch, 1 + k, -1)
        mention_emb, cand_emb = emb[:, 0], emb[:, 1:]
        logits = self.scale * torch.einsum("bh,bkh->bk", mention_emb, cand_emb)
        loss = F.cross_entropy(logits, labels.to(logits.device).long()) if labels is not None else None
        return DualEncoderOutput(
            loss=loss, logits=logits, mention_embeddings=mention_emb, candidate_embeddings=cand_emb
        )

    @torch.no_grad()
    def encode(
        self,
        texts: Sequence[str],
        batch_size: int = 128,
        tokenizer: PreTrainedTokenizerBase | None = None,
        max_length: int | None = None,
        normalize: bool = True,
        show_progress: bool = False,
        desc: str = "encoding",
    ) -> torch.Tensor:
        """L2-normalised embeddings [N, H] (float32, CPU) of ``texts`` for retrieval.

        Texts go through :func:`normalize_name` first (``normalize=False`` to skip) and are encoded in
        batches sorted by length (less padding); the result is in input order. Eval mode is used and the
        previous training mode restored.
        """
        tokenizer = tokenizer or self.get_tokenizer()
        max_length = max_length or self.config.max_length
        prepared = [normalize_name(t) if normalize else t for t in texts]
        order = sorted(range(len(prepared)), key=lambda i: len(prepared[i]))
        out = torch.empty(len(prepared), self.config.encoder_config.hidden_size, dtype=torch.float32)
        was_training = self.training
        self.eval()
        try:
            starts = range(0, len(order), batch_size)
            for lo in tqdm(starts, desc=desc, disable=not show_progress, unit="batch"):
                idx = order[lo : lo + batch_size]
                enc = tokenizer(
                    [prepared[i] for i in idx],
                    padding=True,
                    truncation=True,
                    max_length=max_length,
                    return_tensors="pt",
                )
                emb = self.embed(enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device))
                out[torch.tensor(idx)] = emb.float().cpu()
        finally:
            self.train(was_training)
        return out


def register_auto_classes() -> None:
    """Register the dual encoder with ``AutoConfig``/``AutoModel`` (done when ``hf_continual`` is imported), so
    a saved linker loads with ``AutoModel.from_pretrained(dir)``; calling it again is harmless."""
    AutoConfig.register(DualEncoderConfig.model_type, DualEncoderConfig, exist_ok=True)
    AutoModel.register(DualEncoderConfig, DualEncoderModel, exist_ok=True)


register_auto_classes()
