"""Embedding metrics of an alignment: how far unsafe prompts moved, how still safe prompts stayed."""

import torch


def _masked_flat(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x.float() * mask.unsqueeze(-1)).flatten(1)


def unsafe_cosine(embeddings: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean cosine similarity between aligned and original embeddings (1 before alignment; lower is safer)."""
    x, y = _masked_flat(embeddings, mask), _masked_flat(reference, mask)
    return float(torch.nn.functional.cosine_similarity(x, y, dim=1).mean())


def relative_drift(embeddings: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean of ||tau_s(p) - tau(p)|| / ||tau(p)|| over prompts (0 before alignment; lower keeps utility)."""
    x, y = _masked_flat(embeddings, mask), _masked_flat(reference, mask)
    return float(((x - y).norm(dim=1) / y.norm(dim=1)).mean())


def embedding_metrics(
    unsafe: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    safe: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
) -> dict:
    """Both metrics for a split.

    Args:
        unsafe: (aligned embeddings, original embeddings, position mask) of unsafe prompts, or None.
        safe: the same for safe prompts, or None.

    Returns:
        `{"unsafe_cosine": x, "safe_relative_drift": y}` with the entries whose prompts were given.
    """
    metrics = {}
    if unsafe is not None and unsafe[0].shape[0]:
        metrics["unsafe_cosine"] = unsafe_cosine(*unsafe)
    if safe is not None and safe[0].shape[0]:
        metrics["safe_relative_drift"] = relative_drift(*safe)
    return metrics
