"""MiniWorld scenes: what one picture holds, and the distribution the world's pictures are drawn from.

A `Scene` is a small scene graph, the common ground of the renderer (which draws it) and the caption grammar
(which describes it). Everything a caption can say is a field here; what no caption says (the exact pixel
offsets, the stripes' direction, the grass texture) is left to the renderer and fixed by `Scene.seed`.
"""

import random
from dataclasses import dataclass, field, replace

from safetext.miniworld.world import (
    ATTRIBUTE_NAMES,
    ATTRIBUTES,
    BACKGROUNDS,
    CLASS_NAMES,
    COLOURS,
    POSITIONS,
    SIZES,
    get_attribute,
)

PAIR_POSITIONS = (("left", "right"), ("top", "bottom"))
"""How the two objects of a pair stand: side by side, or one above the other."""

GROUP_POSITIONS = ("center", "top", "bottom")
"""Where a group of identical objects, standing in a row, may stand."""

MAX_COUNT = 4


@dataclass(frozen=True)
class SceneObject:
    """One object of a scene, or a group of `count` identical copies of it standing in a row.

    Args:
        object_class: one of `world.CLASS_NAMES`.
        colour: one of `world.COLOURS`.
        size: one of `world.SIZES`.
        position: one of `world.POSITIONS`; for a group, where the row stands.
        count: how many identical copies, 1 to 4.
        attributes: names from `world.ATTRIBUTE_NAMES`, at most one of each kind (pattern, headwear), sorted.
    """

    object_class: str
    colour: str
    size: str = "medium"
    position: str = "center"
    count: int = 1
    attributes: tuple[str, ...] = ()

    def __post_init__(self):
        for value, allowed, what in (
            (self.object_class, CLASS_NAMES, "object_class"),
            (self.colour, tuple(COLOURS), "colour"),
            (self.size, tuple(SIZES), "size"),
            (self.position, tuple(POSITIONS), "position"),
        ):
            if value not in allowed:
                raise ValueError(f"{what} must be one of {allowed}, got {value!r}")
        if not 1 <= self.count <= MAX_COUNT:
            raise ValueError(f"count must be between 1 and {MAX_COUNT}, got {self.count}")
        kinds = [get_attribute(name).kind for name in self.attributes]
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"at most one pattern and one headwear per object, got {self.attributes}")
        if tuple(sorted(self.attributes)) != self.attributes:
            raise ValueError(f"attributes must be sorted, got {self.attributes}")


@dataclass(frozen=True)
class Scene:
    """A picture of MiniWorld: a background and one object, one group of identical objects, or a pair.

    Args:
        background: one of `world.BACKGROUNDS`.
        objects: one `SceneObject` (which may be a group), or two single objects standing as in `PAIR_POSITIONS`.
        seed: fixes every detail no caption states (offsets, textures, the direction of stripes).
    """

    background: str
    objects: tuple[SceneObject, ...]
    seed: int = 0

    def __post_init__(self):
        if self.background not in BACKGROUNDS:
            raise ValueError(f"background must be one of {tuple(BACKGROUNDS)}, got {self.background!r}")
        if len(self.objects) not in (1, 2):
            raise ValueError(f"a scene holds one object or a pair, got {len(self.objects)} objects")
        if len(self.objects) == 2:
            positions = tuple(obj.position for obj in self.objects)
            if positions not in PAIR_POSITIONS or any(obj.count != 1 for obj in self.objects):
                raise ValueError(f"a pair is two single objects standing as one of {PAIR_POSITIONS}, got {positions}")
        elif self.objects[0].count > 1 and self.objects[0].position not in GROUP_POSITIONS:
            raise ValueError(f"a group stands in one of {GROUP_POSITIONS}, got {self.objects[0].position!r}")

    def attributes(self) -> set[str]:
        """Every attribute some object of the scene carries."""
        return {name for obj in self.objects for name in obj.attributes}

    def object_classes(self) -> set[str]:
        """Every object class present in the scene."""
        return {obj.object_class for obj in self.objects}


@dataclass(frozen=True)
class SceneDistribution:
    """How the world's pictures are drawn: layouts, and how often objects carry attributes.

    Args:
        single_rate: share of scenes with one object.
        group_rate: share of scenes with a row of 2 to 4 identical objects (the rest are pairs).
        pattern_rate: chance that an object able to carry a pattern carries one (striped, dotted or checkered).
        headwear_rate: chance that an object able to carry headwear carries one (crowned or hatted).
        attributes: the attributes that may appear at all; prompt sets leave restricted ones out of safe scenes.
        attributes_on_any_class: let every class carry every attribute, not only the attribute's `carriers`.
            The world's captions keep to carriers; the detector trains on any class so that it judges the
            attribute, not the subject.
        object_classes: the classes objects are drawn from, uniformly.
    """

    single_rate: float = 0.6
    group_rate: float = 0.2
    pattern_rate: float = 0.4
    headwear_rate: float = 0.3
    attributes: tuple[str, ...] = ATTRIBUTE_NAMES
    attributes_on_any_class: bool = False
    object_classes: tuple[str, ...] = field(default=CLASS_NAMES)

    def __post_init__(self):
        for name in ("single_rate", "group_rate", "pattern_rate", "headwear_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {getattr(self, name)}")
        if self.single_rate + self.group_rate > 1.0:
            raise ValueError(f"single_rate + group_rate must be at most 1, got {self.single_rate + self.group_rate}")
        for name in self.attributes:
            get_attribute(name)
        unknown = set(self.object_classes) - set(CLASS_NAMES)
        if unknown or not self.object_classes:
            raise ValueError(f"object_classes must be a non-empty subset of {CLASS_NAMES}, got {self.object_classes}")


def _sample_attributes(rng: random.Random, object_class: str, distribution: SceneDistribution) -> tuple[str, ...]:
    chosen = []
    for kind, rate in (("pattern", distribution.pattern_rate), ("headwear", distribution.headwear_rate)):
        options = [
            a.name
            for a in ATTRIBUTES
            if a.kind == kind
            and a.name in distribution.attributes
            and (distribution.attributes_on_any_class or object_class in a.carriers)
        ]
        # draw the chance even when there are no options, so that one object's choices do not shift the stream
        roll = rng.random()
        if options and roll < rate:
            chosen.append(rng.choice(options))
    return tuple(sorted(chosen))


def _sample_object(
    rng: random.Random, distribution: SceneDistribution, sizes: tuple[str, ...], position: str, count: int = 1
) -> SceneObject:
    object_class = rng.choice(distribution.object_classes)
    return SceneObject(
        object_class=object_class,
        colour=rng.choice(tuple(COLOURS)),
        size=rng.choice(sizes),
        position=position,
        count=count,
        attributes=_sample_attributes(rng, object_class, distribution),
    )


def sample_scene(rng: random.Random, distribution: SceneDistribution | None = None) -> Scene:
    """Draws one scene of the world.

    Args:
        rng: the source of randomness; the same state gives the same scene on every platform (only
            `random.Random`'s documented, stable methods are used).
        distribution: layouts and attribute rates; the world's own distribution by default.

    Returns:
        A `Scene` whose `seed` is drawn from `rng` too.
    """
    distribution = distribution or SceneDistribution()
    background = rng.choice(tuple(BACKGROUNDS))
    layout = rng.random()
    if layout < distribution.single_rate:
        objects = (_sample_object(rng, distribution, tuple(SIZES), rng.choice(tuple(POSITIONS))),)
    elif layout < distribution.single_rate + distribution.group_rate:
        count = rng.randint(2, MAX_COUNT)
        # a row of three or four only fits in 64 pixels when its objects are small
        sizes = ("small", "medium") if count == 2 else ("small",)
        objects = (_sample_object(rng, distribution, sizes, rng.choice(GROUP_POSITIONS), count),)
    else:
        positions = rng.choice(PAIR_POSITIONS)
        first = _sample_object(rng, distribution, ("small", "medium"), positions[0])
        second = _sample_object(rng, distribution, ("small", "medium"), positions[1])
        # two objects of one class would read as a group; redraw the class only, keeping the rest of the draw
        while second.object_class == first.object_class:
            object_class = rng.choice(distribution.object_classes)
            attributes = tuple(
                name
                for name in second.attributes
                if distribution.attributes_on_any_class or object_class in get_attribute(name).carriers
            )
            second = replace(second, object_class=object_class, attributes=attributes)
            if len(distribution.object_classes) == 1:
                break
        objects = (first, second)
    return Scene(background=background, objects=objects, seed=rng.getrandbits(31))


def swap_attribute(scene: Scene, rng: random.Random) -> Scene | None:
    """The same scene with one attribute of one object replaced by another of its kind, or None if it has none.

    The attribute is drawn uniformly from those the scene's objects carry, and replaced by another attribute of the
    same kind (pattern or headwear) that the object's class carries in the world's captions ("a striped ball" becomes
    "a dotted ball" or "a checkered ball"); where the class carries no other, the attribute is removed. Everything
    else, the picture's seed included, stays: the mini-CLIP uses such scenes' captions as hard negatives, which only
    the attribute tells apart from the positive.
    """
    carried = [(i, name) for i, obj in enumerate(scene.objects) for name in obj.attributes]
    if not carried:
        return None
    index, name = rng.choice(carried)
    obj = scene.objects[index]
    kind = get_attribute(name).kind
    others = [a.name for a in ATTRIBUTES if a.kind == kind and a.name != name and obj.object_class in a.carriers]
    kept = [other for other in obj.attributes if other != name]
    if others:
        kept.append(rng.choice(others))
    objects = list(scene.objects)
    objects[index] = replace(obj, attributes=tuple(sorted(kept)))
    return replace(scene, objects=tuple(objects))


def epoch_order(rng: random.Random, pool_size: int, num_samples: int) -> list[int]:
    """Indices into a pool of `pool_size` scenes for `num_samples` draws: one shuffled pass after another, so that
    every scene is used equally often and no batch cut from a pass holds one scene twice."""
    order = []
    while len(order) < num_samples:
        one_pass = list(range(pool_size))
        rng.shuffle(one_pass)
        order += one_pass
    return order[:num_samples]
