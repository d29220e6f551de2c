"""The MiniWorld caption grammar: turns a `Scene` into a prompt written the way people write prompts.

Captions vary what they mention (colour and background usually, size and position sometimes), the words
(synonyms for classes, colours and attributes), the word order ("on the beach, a red ball" / "a ball in red on
the beach"), and carry filler words and the framing and style phrases real prompts carry ("a photo of",
"highly detailed, 4k, trending on artstation"). An attribute an object carries is always mentioned, in one of the
surface forms the caller allows: the world's own training captions use every group of a restricted concept,
alignment training prompts only its `train` group.
"""

import random
from collections.abc import Sequence

from safetext.miniworld.scenes import Scene, SceneObject
from safetext.miniworld.world import (
    BACKGROUNDS,
    COLOURS,
    COUNT_WORDS,
    FILLERS,
    FORM_GROUPS,
    OBJECT_CLASSES,
    POSITIONS,
    SIZES,
    STYLE_PREFIXES,
    STYLE_TAGS,
    SurfaceForm,
    get_attribute,
)

_NOUNS = {c.name: c.nouns for c in OBJECT_CLASSES}


def _pick(rng: random.Random, words: Sequence[str], plain_rate: float = 0.5) -> str:
    # the plain word is the common one, as "red" is commoner than "crimson" in real prompts
    return words[0] if len(words) == 1 or rng.random() < plain_rate else rng.choice(words[1:])


def _article(phrase: str) -> str:
    return "an" if phrase[0] in "aeiou" else "a"


def _form(rng: random.Random, attribute_name: str, forms: Sequence[str]) -> SurfaceForm:
    attribute = get_attribute(attribute_name)
    groups = forms if attribute.restricted else ("allowed",)
    return rng.choice([form for group in groups for form in attribute.forms[group]])


def _noun_phrase(obj: SceneObject, rng: random.Random, forms: Sequence[str]) -> str:
    plural = obj.count > 1
    noun = _NOUNS[obj.object_class][0] if rng.random() < 0.5 else rng.choice(_NOUNS[obj.object_class])
    modifiers = []
    if rng.random() < 0.12:
        modifiers.append(rng.choice(FILLERS))
    if rng.random() < (0.1 if obj.size == "medium" else 0.5):
        modifiers.append(_pick(rng, SIZES[obj.size]))
    colour = _pick(rng, COLOURS[obj.colour], plain_rate=0.7) if rng.random() < 0.85 else None
    colour_after = colour is not None and rng.random() < 0.12
    if colour is not None and not colour_after:
        modifiers.append(colour)
    trailing = []
    for name in obj.attributes:
        form = _form(rng, name, forms)
        if form.placement == "pre":
            modifiers.append(form.text)
        else:
            trailing.append(form.written(plural))
    head = " ".join(modifiers + [noun.plural if plural else noun.singular])
    if colour_after:
        head += f" in {colour}"
    if trailing:
        head += " " + " and ".join(trailing)
    if plural:
        return f"{rng.choice(COUNT_WORDS[obj.count])} {head}"
    return f"{'one' if rng.random() < 0.05 else _article(head)} {head}"


def _pair_phrase(first: SceneObject, second: SceneObject, rng: random.Random, forms: Sequence[str]) -> str:
    a, b = _noun_phrase(first, rng, forms), _noun_phrase(second, rng, forms)
    if first.position == "left":
        templates = (
            "{a} on the left and {b} on the right",
            "{a} to the left of {b}",
            "{b} to the right of {a}",
            "{a} next to {b}",
            "{a} beside {b}",
            "{a} and {b}",
        )
    else:
        templates = ("{a} above {b}", "{b} below {a}", "{a} at the top and {b} at the bottom", "{b} under {a}")
    return rng.choice(templates).format(a=a, b=b)


def _scene_phrase(scene: Scene, rng: random.Random, forms: Sequence[str]) -> tuple[str, str]:
    """The scene as (leading phrase, main phrase): "on the beach" + "a red ball on the left"; the lead may be empty."""
    background = rng.choice(BACKGROUNDS[scene.background]) if rng.random() < 0.6 else None
    if len(scene.objects) == 2:
        subject, where = _pair_phrase(*scene.objects, rng, forms), None
    else:
        obj = scene.objects[0]
        subject = _noun_phrase(obj, rng, forms)
        if obj.count > 1 and rng.random() < 0.3:
            subject += " in a row"
        where = (
            rng.choice(POSITIONS[obj.position]) if rng.random() < (0.25 if obj.position == "center" else 0.5) else None
        )
    order = rng.random()
    if where and background:
        if order < 0.5:
            return "", f"{subject} {where} {background}"
        if order < 0.7:
            return "", f"{subject} {background}, {where}"
        return background, f"{subject} {where}"
    extra = where or background
    if extra is None:
        return "", subject
    return ("", f"{subject} {extra}") if order < 0.75 else (extra, subject)


def caption(scene: Scene, rng: random.Random, forms: Sequence[str] = FORM_GROUPS) -> str:
    """Writes a prompt for a scene.

    Args:
        scene: what the prompt describes.
        rng: the source of randomness (word choice and order).
        forms: which surface-form groups of the restricted concepts (`world.FORM_GROUPS`) the prompt may use for
            an attribute the scene shows. The world's own training captions use all of them; alignment training
            prompts only `("train",)`. Allowed attributes always use their own forms.

    Returns:
        The prompt, in lower case unless its first letter is capitalised, as people sometimes do.

    Raises:
        ValueError: if `forms` is empty or names an unknown group.
    """
    if not forms or any(group not in FORM_GROUPS for group in forms):
        raise ValueError(f"forms must be a non-empty selection of {FORM_GROUPS}, got {tuple(forms)}")
    lead, text = _scene_phrase(scene, rng, forms)
    frame = rng.random()
    if lead:
        # "on the beach, a red ball": a prompt that opens with the place does not also open with a frame
        text = f"{lead}, {text}"
    elif frame < 0.35:
        text = f"{rng.choice(STYLE_PREFIXES)} {text}"
    elif frame < 0.45:
        text = f"there {'are' if scene.objects[0].count > 1 else 'is'} {text}"
    if rng.random() < 0.35:
        text += ", " + ", ".join(rng.sample(STYLE_TAGS, rng.randint(1, 3)))
    if rng.random() < 0.25:
        text = text[0].upper() + text[1:]
    return text
