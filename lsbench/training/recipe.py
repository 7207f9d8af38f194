"""The LayerSkip training recipe (arXiv 2404.16710, section 4): layer dropout whose rate grows
with depth and time, and an early-exit loss through the model's own final norm and LM head.

Everything here is training-only: the checkpoint stays a plain `LlamaForCausalLM`, so the
benchmark engine loads it unchanged. The baseline recipe is this code with p_max = 0 and the
early-exit curriculum off, so both twins go through the same forward.

Notation: L decoder layers; an exit at depth E (1..L) reads the hidden state after layers
[0, E), which is what `lsbench sweep --exit-layers E` drafts from. progress in [0, 1] is the
fraction of the training budget spent (steps or wall clock), the paper's t / T.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.masking_utils import create_causal_mask

from lsbench.errors import LsbenchError

DROPOUT_CURRICULA = ("none", "linear", "exp")
EXIT_CURRICULA = ("none", "rotational", "gradual")
# How the intermediate exits' weights grow with depth E: the paper's sum_{i<=E} i, and two of
# the alternatives its reference code offers (linear in E, and flat).
EXIT_WEIGHTINGS = ("sum_l", "l", "one")


@dataclass(frozen=True)
class Recipe:
    """The recipe's knobs; `baseline()` switches both halves off."""

    p_max: float = 0.2  # layer-dropout rate at the last layer (at the end of training)
    dropout_curriculum: str = "none"  # S(t): none (1), linear (t/T) or exp (e^{t ln2/T} - 1)
    exit_curriculum: str = "rotational"  # C(t, E): none, rotational (every R-th) or gradual
    rotation: int = 2  # R of the rotational curriculum
    e_scale: float = 0.2  # scale of the intermediate exits' loss weights
    exit_weighting: str = "sum_l"  # shape of the weights over depth (EXIT_WEIGHTINGS)

    def __post_init__(self) -> None:
        if not 0 <= self.p_max < 1:
            raise LsbenchError(f"p_max must be in [0, 1), got {self.p_max}")
        if self.dropout_curriculum not in DROPOUT_CURRICULA:
            raise LsbenchError(f"unknown dropout curriculum {self.dropout_curriculum!r}; "
                               f"choose {', '.join(DROPOUT_CURRICULA)}")
        if self.exit_curriculum not in EXIT_CURRICULA:
            raise LsbenchError(f"unknown early-exit curriculum {self.exit_curriculum!r}; "
                               f"choose {', '.join(EXIT_CURRICULA)}")
        if self.exit_weighting not in EXIT_WEIGHTINGS:
            raise LsbenchError(f"unknown exit weighting {self.exit_weighting!r}; choose "
                               f"{', '.join(EXIT_WEIGHTINGS)}")
        if self.rotation < 1:
            raise LsbenchError(f"rotation R must be >= 1, got {self.rotation}")
        if self.e_scale < 0:
            raise LsbenchError(f"e_scale must be >= 0, got {self.e_scale}")

    @classmethod
    def baseline(cls) -> Recipe:
        return cls(p_max=0.0, exit_curriculum="none")

    @property
    def is_baseline(self) -> bool:
        return self.p_max == 0 and self.exit_curriculum == "none"


# --- layer dropout -------------------------------------------------------------------------

def time_scale(curriculum: str, progress: float) -> float:
    """S(t): how much of p_max applies at this point of training."""
    progress = min(max(progress, 0.0), 1.0)
    if curriculum == "none":
        return 1.0
    if curriculum == "linear":
        return progress
    if curriculum == "exp":
        return math.exp(progress * math.log(2)) - 1.0
    raise LsbenchError(f"unknown dropout curriculum {curriculum!r}")


def dropout_rates(num_layers: int, p_max: float, scale: float = 1.0) -> list[float]:
    """p_l = scale * D(l) * p_max with D(l) = e^{l ln2 / (L-1)} - 1 for layer l = 0..L-1:
    exponential in depth, 0 at the first layer and p_max at the last."""
    if num_layers == 1:
        return [0.0]
    return [scale * p_max * (math.exp(i * math.log(2) / (num_layers - 1)) - 1.0)
            for i in range(num_layers)]


# --- early-exit loss -----------------------------------------------------------------------

def enabled_exits(recipe: Recipe, num_layers: int, step: int, progress: float) -> list[int]:
    """Depths E whose exit loss is on at this step; the last layer (E = L) always is.

    rotational: every R-th depth, the set shifting by one depth each step, so each exit gets
    trained every R steps at 1/R of the cost. gradual: exits switch on from the deepest to the
    shallowest, one more every T / (2L), all on after half the budget."""
    last = [num_layers]
    if recipe.exit_curriculum == "none" or num_layers == 1:
        return last
    if recipe.exit_curriculum == "rotational":
        r = recipe.rotation
        return [e for e in range(1, num_layers) if (e + step) % r == 0] + last
    n = min(num_layers - 1, int(2 * num_layers * min(max(progress, 0.0), 1.0)))
    return list(range(num_layers - n, num_layers)) + last


def raw_exit_weight(depth: int, num_layers: int, e_scale: float,
                    weighting: str = "sum_l") -> float:
    """Unnormalised weight of the exit at `depth`. sum_l (the paper): e_scale * sum_{i<=E} i
    for intermediate exits, and for the last layer L plus the weight of the exit before it.
    The paper counts layers from 0, which leaves the first layer's exit a weight of 0 and never
    trains it; counting depth from 1 (as the reference code's cumsum(l + 1) does) keeps every
    exit trained. l and one (the reference code's alternatives): e_scale * E or e_scale for
    intermediate exits, L or 1 for the last."""
    last = depth == num_layers
    if weighting == "sum_l":
        if last:
            return num_layers + e_scale * (num_layers - 1) * num_layers / 2
        return e_scale * depth * (depth + 1) / 2
    if weighting == "l":
        return float(depth) if last else e_scale * depth
    if weighting == "one":
        return 1.0 if last else e_scale
    raise LsbenchError(f"unknown exit weighting {weighting!r}")


def exit_weights(exits: list[int], num_layers: int, e_scale: float,
                 weighting: str = "sum_l") -> dict[int, float]:
    """Weights of the enabled exits, normalised to sum to 1 over those exits."""
    raw = {e: raw_exit_weight(e, num_layers, e_scale, weighting) for e in exits}
    total = sum(raw.values())
    return {e: w / total for e, w in raw.items()}


# --- the forward ---------------------------------------------------------------------------

@dataclass
class ExitOutput:
    loss: torch.Tensor  # the weighted training objective
    exit_losses: dict[int, torch.Tensor]  # depth -> mean next-token cross-entropy
    argmax: dict[int, torch.Tensor] | None = None  # depth -> [B, T-1] predictions, if asked


def exit_forward(model: torch.nn.Module, ids: torch.Tensor, *, exits: list[int],
                 rates: list[float] | None = None, weights: dict[int, float] | None = None,
                 generator: torch.Generator | None = None,
                 keep_argmax: bool = False) -> ExitOutput:
    """Run a decoder-only model over `ids` [B, T] layer by layer, skipping layer l for each
    sample with probability rates[l] (training mode only), and score the next-token loss at
    every depth in `exits` through the model's own final norm and LM head."""
    backbone = model.model
    num_layers = len(backbone.layers)
    hidden = backbone.embed_tokens(ids)
    batch, length = ids.shape
    position_ids = torch.arange(length, device=ids.device).unsqueeze(0)
    position_embeddings = backbone.rotary_emb(hidden, position_ids=position_ids)
    # no cache: passed by position, since transformers renamed it (past_key_values -> cache)
    mask = create_causal_mask(model.config, hidden, None, None, position_ids=position_ids)
    drop = rates is not None and model.training  # layer dropout never runs in eval mode
    targets = ids[:, 1:].reshape(-1)
    losses: dict[int, torch.Tensor] = {}
    argmax: dict[int, torch.Tensor] = {}
    for i, layer in enumerate(backbone.layers):
        p = rates[i] if drop else 0.0
        if p > 0:
            keep = torch.rand(batch, generator=generator, device="cpu") >= p
            idx = keep.nonzero().squeeze(1).to(ids.device)
        else:
            idx = None
        if idx is None or idx.numel() == batch:
            hidden = layer(hidden, attention_mask=mask, position_ids=position_ids,
                           position_embeddings=position_embeddings)
        elif idx.numel() > 0:
            # Per-sample dropout: only the kept samples pay for the layer; skipped ones pass
            # through on the residual stream unchanged.
            sub_mask = mask[idx] if isinstance(mask, torch.Tensor) and mask.shape[0] > 1 \
                else mask
            out = layer(hidden[idx], attention_mask=sub_mask, position_ids=position_ids,
                        position_embeddings=position_embeddings)
            hidden = hidden.index_copy(0, idx, out)
        depth = i + 1
        if depth in exits:
            logits = model.lm_head(backbone.norm(hidden))[:, :-1]
            losses[depth] = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets)
            if keep_argmax:
                argmax[depth] = logits.argmax(-1)
    if weights is None:
        weights = {num_layers: 1.0}
    loss = sum(weights[e] * losses[e] for e in weights)
    return ExitOutput(loss=loss, exit_losses=losses, argmax=argmax if keep_argmax else None)


def training_forward(model: torch.nn.Module, ids: torch.Tensor, recipe: Recipe, step: int,
                     progress: float, generator: torch.Generator | None = None) -> ExitOutput:
    """One training step's forward under the recipe at (step, progress)."""
    num_layers = len(model.model.layers)
    exits = enabled_exits(recipe, num_layers, step, progress)
    rates = dropout_rates(num_layers, recipe.p_max,
                          time_scale(recipe.dropout_curriculum, progress))
    return exit_forward(model, ids, exits=exits, rates=rates,
                        weights=exit_weights(exits, num_layers, recipe.e_scale,
                                             recipe.exit_weighting),
                        generator=generator)
