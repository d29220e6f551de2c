"""The SafeText objective against values computed by hand on small tensors."""

import math

import pytest
import torch

from safetext.losses import effectiveness_loss, embedding_distance, safetext_loss, utility_loss

# Two prompts, three token positions, width 2. Masked positions hold values that must not count.
EMBEDDINGS = torch.tensor(
    [
        [[1.0, 0.0], [0.0, 2.0], [5.0, 5.0]],
        [[2.0, 0.0], [7.0, 7.0], [1.0, 1.0]],
    ]
)
REFERENCE = torch.tensor(
    [
        [[1.0, 1.0], [0.0, 0.0], [9.0, 9.0]],
        [[1.0, 0.0], [-3.0, 4.0], [1.0, 1.0]],
    ]
)
MASK = torch.tensor([[True, True, False], [True, False, True]])

# By hand, over the masked positions flattened into one vector per prompt:
# prompt 0: x = (1, 0, 0, 2), y = (1, 1, 0, 0): |x - y|^2 = 5, |y|^2 = 2, x.y = 1, |x| = sqrt(5), |y| = sqrt(2)
# prompt 1: x = (2, 0, 1, 1), y = (1, 0, 1, 1): |x - y|^2 = 1, |y|^2 = 3, x.y = 4, |x| = sqrt(6), |y| = sqrt(3)
EXPECTED = {
    ("squared_l2", False): [5.0, 1.0],
    ("l2", False): [math.sqrt(5.0), 1.0],
    ("squared_l2", True): [5.0 / 2.0, 1.0 / 3.0],
    ("l2", True): [math.sqrt(5.0 / 2.0), math.sqrt(1.0 / 3.0)],
    ("cosine", False): [1.0 - 1.0 / math.sqrt(10.0), 1.0 - 4.0 / math.sqrt(18.0)],
    ("negcosine", False): [-1.0 / math.sqrt(10.0), -4.0 / math.sqrt(18.0)],
    # relative scaling leaves the cosine distances unchanged
    ("cosine", True): [1.0 - 1.0 / math.sqrt(10.0), 1.0 - 4.0 / math.sqrt(18.0)],
    ("negcosine", True): [-1.0 / math.sqrt(10.0), -4.0 / math.sqrt(18.0)],
}


@pytest.mark.parametrize(("distance", "relative"), list(EXPECTED))
def test_distances_match_hand_computed_values(distance, relative):
    got = embedding_distance(EMBEDDINGS, REFERENCE, MASK, distance=distance, relative=relative)
    assert got.dtype == torch.float32
    assert torch.allclose(got, torch.tensor(EXPECTED[(distance, relative)]), atol=1e-6)


def test_distances_are_computed_in_float32_from_half_inputs():
    got = embedding_distance(EMBEDDINGS.bfloat16(), REFERENCE.bfloat16(), MASK, distance="squared_l2")
    assert got.dtype == torch.float32
    assert torch.allclose(got, torch.tensor([5.0, 1.0]))


def test_unknown_distance_is_refused():
    with pytest.raises(ValueError, match=r"distance='l1'.*l2, squared_l2, cosine, negcosine"):
        embedding_distance(EMBEDDINGS, REFERENCE, MASK, distance="l1")


def test_utility_and_effectiveness_losses_are_batch_means():
    assert torch.isclose(utility_loss(EMBEDDINGS, REFERENCE, MASK), torch.tensor((math.sqrt(5.0) + 1.0) / 2))
    expected = (-1.0 / math.sqrt(10.0) - 4.0 / math.sqrt(18.0)) / 2
    assert torch.isclose(effectiveness_loss(EMBEDDINGS, REFERENCE, MASK), torch.tensor(expected))


@pytest.mark.parametrize("distance", ["l2", "squared_l2"])
@pytest.mark.parametrize("relative", [False, True])
def test_utility_loss_is_zero_when_embeddings_equal_the_reference(distance, relative):
    loss = utility_loss(REFERENCE.clone(), REFERENCE, MASK, distance=distance, relative=relative)
    # l2 is sqrt(0 + 1e-12) = 1e-6: the epsilon that keeps its gradient finite at this point
    assert loss.item() == pytest.approx(0.0, abs=2e-6)


def test_effectiveness_loss_is_minus_one_when_embeddings_equal_the_reference():
    loss = effectiveness_loss(REFERENCE.clone(), REFERENCE, MASK, distance="negcosine")
    assert loss.item() == pytest.approx(-1.0, abs=1e-6)


@pytest.mark.parametrize("relative", [False, True])
def test_safetext_loss_total_is_utility_minus_lambda_times_effectiveness(relative):
    unsafe = EMBEDDINGS.flip(0)
    unsafe_reference = REFERENCE.flip(0)
    unsafe_mask = torch.ones(2, 3, dtype=torch.bool)
    terms = safetext_loss(
        EMBEDDINGS,
        REFERENCE,
        MASK,
        unsafe,
        unsafe_reference,
        unsafe_mask,
        effectiveness_weight=0.25,
        relative=relative,
    )
    l_u = torch.tensor(EXPECTED[("l2", relative)]).mean()
    l_e = embedding_distance(unsafe, unsafe_reference, unsafe_mask, "negcosine").mean()
    assert set(terms) == {"utility_loss", "effectiveness_loss", "loss"}
    assert torch.isclose(terms["utility_loss"], l_u)
    assert torch.isclose(terms["effectiveness_loss"], l_e)
    assert torch.isclose(terms["loss"], l_u - 0.25 * l_e)


@pytest.mark.parametrize("utility_distance", ["l2", "squared_l2"])
@pytest.mark.parametrize("relative", [False, True])
def test_gradients_are_finite_where_embeddings_equal_the_reference(utility_distance, relative):
    # This is the state at step 0 of every run: the trained encoder still equals the reference.
    safe = REFERENCE.clone().requires_grad_(True)
    unsafe = EMBEDDINGS.clone().requires_grad_(True)
    terms = safetext_loss(
        safe,
        REFERENCE,
        MASK,
        unsafe,
        EMBEDDINGS,
        MASK,
        effectiveness_weight=1.0,
        utility_distance=utility_distance,
        relative=relative,
    )
    terms["loss"].backward()
    assert torch.isfinite(safe.grad).all() and torch.isfinite(unsafe.grad).all()
    # At the minimum of the utility term its gradient vanishes; at the maximum cosine the effectiveness one does.
    assert torch.allclose(safe.grad, torch.zeros_like(safe.grad), atol=1e-6)
    assert torch.allclose(unsafe.grad, torch.zeros_like(unsafe.grad), atol=1e-6)


def test_l2_gradient_matches_the_analytic_one():
    x = EMBEDDINGS.clone().requires_grad_(True)
    embedding_distance(x, REFERENCE, MASK, "l2").sum().backward()
    # d|x - y| / dx = (x - y) / |x - y| at the masked positions, zero elsewhere
    diff = (EMBEDDINGS - REFERENCE) * MASK.unsqueeze(-1)
    expected = diff / diff.flatten(1).norm(dim=1).view(-1, 1, 1)
    assert torch.allclose(x.grad, expected, atol=1e-6)


def test_negcosine_gradient_matches_the_analytic_one():
    x = EMBEDDINGS.clone().requires_grad_(True)
    embedding_distance(x, REFERENCE, MASK, "negcosine").sum().backward()
    # d(-cos)/dx = -(y / (|x||y|) - (x.y) x / (|x|^3 |y|)) over the masked positions
    m = MASK.unsqueeze(-1).float()
    xm, ym = (EMBEDDINGS * m).flatten(1), (REFERENCE * m).flatten(1)
    nx, ny, dot = xm.norm(dim=1, keepdim=True), ym.norm(dim=1, keepdim=True), (xm * ym).sum(1, keepdim=True)
    expected = -(ym / (nx * ny) - dot * xm / (nx**3 * ny))
    assert torch.allclose(x.grad, expected.view_as(x) * m, atol=1e-6)


# Pooled vectors of the same two prompts: one position each, width 2.
POOLED = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
POOLED_REFERENCE = torch.tensor([[3.0, 0.0], [0.0, 2.0]])
# By hand: prompt 0: |x - y| = 4, |y| = 3, cos = 9 / 15; prompt 1: |x - y| = 1, |y| = 2, cos = 1.
POOLED_L2_RELATIVE = (4.0 / 3.0 + 1.0 / 2.0) / 2
POOLED_NEGCOSINE = -(9.0 / 15.0 + 1.0) / 2


def pooled_terms(pooled, pooled_weight=1.0, lam=0.5):
    # the same sequences for safe and unsafe prompts, equal to their reference: only the pooled part differs
    return safetext_loss(
        REFERENCE,
        REFERENCE,
        MASK,
        REFERENCE,
        REFERENCE,
        MASK,
        effectiveness_weight=lam,
        safe_pooled=pooled,
        safe_pooled_reference=POOLED_REFERENCE,
        unsafe_pooled=pooled,
        unsafe_pooled_reference=POOLED_REFERENCE,
        pooled_weight=pooled_weight,
    )


def test_pooled_vector_enters_both_terms_with_its_weight():
    terms = pooled_terms(POOLED, pooled_weight=2.0, lam=0.5)
    assert terms["utility_loss_sequence"].item() == pytest.approx(0.0, abs=1e-5)
    assert terms["effectiveness_loss_sequence"].item() == pytest.approx(-1.0, abs=1e-6)
    assert terms["utility_loss_pooled"].item() == pytest.approx(POOLED_L2_RELATIVE, abs=1e-6)
    assert terms["effectiveness_loss_pooled"].item() == pytest.approx(POOLED_NEGCOSINE, abs=1e-6)
    l_u = 0.0 + 2.0 * POOLED_L2_RELATIVE
    l_e = -1.0 + 2.0 * POOLED_NEGCOSINE
    assert terms["utility_loss"].item() == pytest.approx(l_u, abs=1e-5)
    assert terms["effectiveness_loss"].item() == pytest.approx(l_e, abs=1e-5)
    assert terms["loss"].item() == pytest.approx(l_u - 0.5 * l_e, abs=1e-5)


def test_a_change_of_the_pooled_vector_alone_changes_the_loss():
    at_reference = pooled_terms(POOLED_REFERENCE.clone())
    moved = pooled_terms(POOLED)
    assert at_reference["utility_loss_pooled"].item() == pytest.approx(0.0, abs=1e-5)
    assert moved["loss"].item() != pytest.approx(at_reference["loss"].item(), abs=1e-3)
    # and the gradient reaches the pooled vector
    pooled = POOLED.clone().requires_grad_(True)
    pooled_terms(pooled)["loss"].backward()
    assert pooled.grad is not None and pooled.grad.abs().sum() > 0


def test_without_pooled_vectors_the_terms_are_the_sequences():
    plain = safetext_loss(EMBEDDINGS, REFERENCE, MASK, EMBEDDINGS, REFERENCE, MASK, effectiveness_weight=0.5)
    assert set(plain) == {"utility_loss", "effectiveness_loss", "loss"}
    with pytest.raises(ValueError, match="pooled vectors of both safe and unsafe prompts, or none"):
        safetext_loss(
            EMBEDDINGS, REFERENCE, MASK, EMBEDDINGS, REFERENCE, MASK, effectiveness_weight=0.5, safe_pooled=POOLED
        )
