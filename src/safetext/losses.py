"""The SafeText objective as pure functions on tensors.

SafeText (Hu, Jiang and Gong, arXiv 2502.20623) fine-tunes the text encoder tau_s, initialised from the original
encoder tau, to minimise

    L = L_u - lambda * L_e
    L_u = mean_{p in D_s} d_u(tau_s(p), tau(p))      (utility: safe prompts stay where they were)
    L_e = mean_{p in D_u} d_e(tau_s(p), tau(p))      (effectiveness: unsafe prompts move away)

with d_u the Euclidean distance and d_e the negative cosine similarity in the paper. Embeddings here are the
conditioning tensors the diffusion model consumes, shape [batch, tokens, dim]; a boolean mask [batch, tokens]
selects the token positions that enter the distance, and the selected positions of one prompt are flattened
into one vector.
"""

import torch

# Keeps the gradient of sqrt finite where the aligned and reference embeddings coincide (at step 0).
_EPS = 1e-12


def embedding_distance(
    embeddings: torch.Tensor,
    reference: torch.Tensor,
    mask: torch.Tensor,
    distance: str = "l2",
    relative: bool = False,
) -> torch.Tensor:
    """Distance between each embedding and its reference over the masked token positions.

    Args:
        embeddings: [batch, tokens, dim], the aligned encoder's output tau_s(p).
        reference: [batch, tokens, dim], the original encoder's output tau(p).
        mask: [batch, tokens], true at the positions that count.
        distance: `l2` (Euclidean), `squared_l2`, `cosine` (1 - cosine similarity) or `negcosine`
            (minus the cosine similarity, d_e in the paper).
        relative: divide `l2` by the reference's norm (and `squared_l2` by its square) over the same positions,
            which makes the distance unit-free; it has no effect on the cosine distances.

    Returns:
        [batch] distances, computed in float32.
    """
    x = embeddings.float()
    y = reference.float()
    m = mask.to(x.dtype).unsqueeze(-1)
    if distance in ("l2", "squared_l2"):
        squared = (((x - y) * m) ** 2).sum(dim=(1, 2))
        if relative:
            squared = squared / ((y * m) ** 2).sum(dim=(1, 2)).clamp_min(_EPS)
        return squared if distance == "squared_l2" else torch.sqrt(squared + _EPS)
    if distance in ("cosine", "negcosine"):
        dot = (x * y * m).sum(dim=(1, 2))
        norm_x = torch.sqrt(((x * m) ** 2).sum(dim=(1, 2)) + _EPS)
        norm_y = torch.sqrt(((y * m) ** 2).sum(dim=(1, 2)) + _EPS)
        cosine = dot / (norm_x * norm_y)
        return 1.0 - cosine if distance == "cosine" else -cosine
    raise ValueError(f"distance={distance!r} is not supported; choose one of l2, squared_l2, cosine, negcosine")


def utility_loss(embeddings, reference, mask, distance="l2", relative=False) -> torch.Tensor:
    """L_u: the mean distance of the safe prompts' embeddings from the original ones (eq. of L_u in the paper)."""
    return embedding_distance(embeddings, reference, mask, distance, relative).mean()


def effectiveness_loss(embeddings, reference, mask, distance="negcosine", relative=False) -> torch.Tensor:
    """L_e: the mean distance of the unsafe prompts' embeddings from the original ones (to be made large)."""
    return embedding_distance(embeddings, reference, mask, distance, relative).mean()


def _one_position(vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled vectors [batch, dim] as a sequence of one position [batch, 1, dim], and its mask."""
    return vectors.unsqueeze(1), torch.ones(vectors.shape[0], 1, dtype=torch.bool, device=vectors.device)


def safetext_loss(
    safe_embeddings: torch.Tensor,
    safe_reference: torch.Tensor,
    safe_mask: torch.Tensor,
    unsafe_embeddings: torch.Tensor,
    unsafe_reference: torch.Tensor,
    unsafe_mask: torch.Tensor,
    effectiveness_weight: float,
    utility_distance: str = "l2",
    effectiveness_distance: str = "negcosine",
    relative: bool = True,
    *,
    safe_pooled: torch.Tensor | None = None,
    safe_pooled_reference: torch.Tensor | None = None,
    unsafe_pooled: torch.Tensor | None = None,
    unsafe_pooled_reference: torch.Tensor | None = None,
    pooled_weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    """The SafeText objective L = L_u - lambda * L_e.

    The paper's tau(p) is one embedding per prompt. Pipelines with a pooled vector beside the token sequence (SDXL,
    SD3, FLUX) condition the denoiser on both, so both enter each term, the pooled vector as one more position
    compared on its own:

        L_u = L_u(sequence) + w * L_u(pooled)      L_e = L_e(sequence) + w * L_e(pooled)

    with w = `pooled_weight`. Without pooled tensors the terms are the sequence's alone, exactly as before.

    Args:
        safe_embeddings, safe_reference, safe_mask: aligned and original embeddings of safe prompts, and the mask.
        unsafe_embeddings, unsafe_reference, unsafe_mask: the same for unsafe prompts.
        effectiveness_weight: lambda.
        utility_distance: d_u (paper: `l2`).
        effectiveness_distance: d_e (paper: `negcosine`).
        relative: measure l2 distances relative to the reference's norm (see `embedding_distance`).
        safe_pooled, safe_pooled_reference: aligned and original pooled vectors [batch, dim] of the safe prompts.
        unsafe_pooled, unsafe_pooled_reference: the same for the unsafe prompts; give all four or none.
        pooled_weight: w, the weight of the pooled vector's distances against the sequence's.

    Returns:
        A dict with `utility_loss` (L_u), `effectiveness_loss` (L_e) and `loss` (the total to minimise); with pooled
        vectors also each tensor's own terms, `utility_loss_sequence`, `utility_loss_pooled`,
        `effectiveness_loss_sequence` and `effectiveness_loss_pooled`.
    """
    l_u = utility_loss(safe_embeddings, safe_reference, safe_mask, utility_distance, relative)
    l_e = effectiveness_loss(unsafe_embeddings, unsafe_reference, unsafe_mask, effectiveness_distance, relative)
    pooled = (safe_pooled, safe_pooled_reference, unsafe_pooled, unsafe_pooled_reference)
    if all(tensor is None for tensor in pooled):
        return {"utility_loss": l_u, "effectiveness_loss": l_e, "loss": l_u - effectiveness_weight * l_e}
    if any(tensor is None for tensor in pooled):
        raise ValueError("give the aligned and original pooled vectors of both safe and unsafe prompts, or none")

    (safe_x, safe_m), (safe_y, _) = _one_position(safe_pooled), _one_position(safe_pooled_reference)
    (unsafe_x, unsafe_m), (unsafe_y, _) = _one_position(unsafe_pooled), _one_position(unsafe_pooled_reference)
    l_u_pooled = utility_loss(safe_x, safe_y, safe_m, utility_distance, relative)
    l_e_pooled = effectiveness_loss(unsafe_x, unsafe_y, unsafe_m, effectiveness_distance, relative)
    total_u = l_u + pooled_weight * l_u_pooled
    total_e = l_e + pooled_weight * l_e_pooled
    return {
        "utility_loss": total_u,
        "effectiveness_loss": total_e,
        "loss": total_u - effectiveness_weight * total_e,
        "utility_loss_sequence": l_u,
        "utility_loss_pooled": l_u_pooled,
        "effectiveness_loss_sequence": l_e,
        "effectiveness_loss_pooled": l_e_pooled,
    }


def unsafe_effectiveness(
    unsafe_embeddings: torch.Tensor,
    unsafe_reference: torch.Tensor,
    unsafe_mask: torch.Tensor,
    distance: str = "negcosine",
    relative: bool = True,
    *,
    unsafe_pooled: torch.Tensor | None = None,
    unsafe_pooled_reference: torch.Tensor | None = None,
    pooled_weight: float = 1.0,
) -> torch.Tensor:
    """L_e alone, the pooled vector's term included as in `safetext_loss`: what an adversary of the alignment
    makes small (`safetext.adversarial`)."""
    l_e = effectiveness_loss(unsafe_embeddings, unsafe_reference, unsafe_mask, distance, relative)
    if unsafe_pooled is None and unsafe_pooled_reference is None:
        return l_e
    if unsafe_pooled is None or unsafe_pooled_reference is None:
        raise ValueError("give the aligned and original pooled vectors of the unsafe prompts, or neither")
    (x, m), (y, _) = _one_position(unsafe_pooled), _one_position(unsafe_pooled_reference)
    return l_e + pooled_weight * effectiveness_loss(x, y, m, distance, relative)
