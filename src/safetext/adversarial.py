"""Worst-case perturbations of a text encoder's hidden states, for an alignment that holds near its training prompts.

SafeText pushes the embeddings of its unsafe training prompts away from where they were. A word it never trained on
(a synonym, a paraphrase, an attack's tokens) may still lead to the old embedding. Adversarial training, as
AdvUnlearn (Zhang et al., 2024) does for the text encoder and latent adversarial training (Casper et al., 2024) for
language models, pushes from the worst point near each unsafe prompt instead. Here that point is a perturbation
delta of the hidden states entering one transformer block of each trained encoder (block 0: the token embeddings,
with CLIP's position embeddings added), at every prompt token but BOS, with ||delta_t|| <= epsilon * ||h_t||, found
by a few steps of projected gradient descent to bring the encoder's output back towards the original embedding,
that is to make L_e small. The outer step then makes L_e large there and at the prompt itself:

    min_theta  L_u(theta) - lambda * (L_e(theta, 0) + min_{delta} L_e(theta, delta)) / 2

The clean term is needed: the untouched encoder is the adversary's optimum (cosine 1), where the cosine has no
gradient, so an adversary that can put the embedding back keeps a push from the worst point alone from ever
starting (on MiniWorld, with epsilon 0.05, the unsafe prompts did not move). With epsilon 0 SafeText runs exactly
as in the paper.
"""

import torch

_GRADIENT_SCALE = 1024.0

# name endings under which transformers keeps an encoder's stack of blocks: CLIP and BART-like models ("layers"),
# T5 ("block"), BERT ("layer")
_LAYER_LISTS = ("layers", "block", "layer")


def transformer_layers(encoder: torch.nn.Module) -> torch.nn.ModuleList:
    """The encoder's stack of transformer blocks, in order (found by name, so peft-wrapped encoders work too)."""
    for name, module in encoder.named_modules():
        if isinstance(module, torch.nn.ModuleList) and name.rsplit(".", 1)[-1] in _LAYER_LISTS and len(module):
            return module
    raise ValueError(f"{type(encoder).__name__} has no stack of transformer blocks named {', '.join(_LAYER_LISTS)}")


def _per_token_norm(x: torch.Tensor) -> torch.Tensor:
    return x.norm(dim=-1, keepdim=True)


def project(delta: torch.Tensor, epsilon: float) -> torch.Tensor:
    """delta with every token's vector shortened to norm at most epsilon."""
    return delta * (epsilon / _per_token_norm(delta).clamp_min(epsilon))


def random_start(shape, epsilon: float, generator: torch.Generator) -> torch.Tensor:
    """A random point of the ball of radius epsilon at every token: a uniform direction, radius epsilon * U."""
    direction = torch.randn(shape, generator=generator)
    radius = epsilon * torch.rand((*shape[:-1], 1), generator=generator)
    return direction / _per_token_norm(direction).clamp_min(1e-12) * radius


class HiddenStatePerturbation:
    """Adds perturbations to the hidden states entering one transformer layer of some encoders.

    While `deltas` is set, each encoder's layer `layer` receives h + delta * mask * ||h|| on the first rows of its
    batch, as many as `deltas[name]` has (the unsafe prompts come first in the alignment's batch): delta is measured
    in units of each token's own norm, so that epsilon means the same at every layer and in every encoder. The
    hooks stay until `remove()`.

    Args:
        encoders: component name -> the encoder whose layer is perturbed.
        layer: index of the transformer block whose input is perturbed.
    """

    def __init__(self, encoders: dict[str, torch.nn.Module], layer: int):
        self.deltas: dict[str, torch.Tensor] | None = None
        self.masks: dict[str, torch.Tensor] = {}
        self._handles = []
        for name, encoder in encoders.items():
            layers = transformer_layers(encoder)
            if not 0 <= layer < len(layers):
                raise ValueError(
                    f"adversarial_layer={layer}: {name} has {len(layers)} layers (0 to {len(layers) - 1})"
                )
            hook = self._hook(name)
            self._handles.append(layers[layer].register_forward_pre_hook(hook, with_kwargs=True))

    def _hook(self, name):
        def add_delta(module, args, kwargs):
            if self.deltas is None:
                return None
            from_kwargs = "hidden_states" in kwargs
            hidden = kwargs["hidden_states"] if from_kwargs else args[0]
            delta = self.deltas[name].to(device=hidden.device, dtype=hidden.dtype)
            mask = self.masks[name].to(device=hidden.device, dtype=hidden.dtype).unsqueeze(-1)
            rows = delta.shape[0]
            moved = hidden[:rows] + delta * mask * _per_token_norm(hidden[:rows]).detach()
            hidden = torch.cat([moved, hidden[rows:]])
            if from_kwargs:
                return args, {**kwargs, "hidden_states": hidden}
            return (hidden, *args[1:]), kwargs

        return add_delta

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def worst_case_deltas(
    loss_of,
    shapes: dict[str, tuple[int, ...]],
    epsilon: float,
    steps: int,
    generator: torch.Generator,
    device,
) -> dict[str, torch.Tensor]:
    """Projected gradient descent on `loss_of(deltas)` within the epsilon-ball at every token.

    Starts from a random point of the ball (`generator`, so that a resumed run repeats an uninterrupted one) and
    takes `steps` steps of size 2.5 * epsilon / steps along each token's normalised gradient, projecting back after
    each: the path, 2.5 epsilon in all, is longer than the ball's diameter, so the search can reach any point of the
    ball from any start (the usual choice in adversarial training since Madry et al.).

    Returns:
        The perturbations found, detached.
    """
    deltas = {name: random_start(shape, epsilon, generator).to(device) for name, shape in shapes.items()}
    step_size = 2.5 * epsilon / steps
    for _ in range(steps):
        for delta in deltas.values():
            delta.requires_grad_(True)
        # scaled so that fp16 gradients do not underflow; the step is normalised per token, so the scale changes
        # nothing else
        grads = torch.autograd.grad(loss_of(deltas) * _GRADIENT_SCALE, list(deltas.values()))
        deltas = {
            name: project(delta.detach() - step_size * grad / _per_token_norm(grad).clamp_min(1e-12), epsilon)
            for (name, delta), grad in zip(deltas.items(), grads)
        }
    return deltas
