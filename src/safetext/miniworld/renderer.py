"""The MiniWorld renderer: draws a `Scene` as a 64x64 RGB picture, deterministically from the scene alone.

Objects are simple silhouettes with a dark outline and soft top-lit shading, drawn at four times the final
resolution and averaged down, so edges are anti-aliased as in a photograph rather than jagged. Patterns (stripes,
dots, checks) cover the coloured body of an object in a contrasting ink; headwear (a crown, a hat) sits on its
top. Every detail that a caption does not state comes from `numpy.random.default_rng(scene.seed)`.
"""

import math
import multiprocessing
import os

import numpy as np
from PIL import Image, ImageDraw

from safetext.miniworld.scenes import Scene, SceneObject
from safetext.miniworld.world import BACKGROUNDS, get_attribute

IMAGE_SIZE = 64
SUPERSAMPLING = 4

COLOUR_RGB = {
    "red": (210, 40, 40),
    "orange": (240, 140, 30),
    "yellow": (245, 215, 50),
    "green": (60, 170, 70),
    "blue": (50, 90, 210),
    "purple": (140, 60, 180),
    "pink": (240, 130, 180),
    "white": (245, 245, 245),
    "brown": (135, 85, 45),
}

OBJECT_EXTENT = {"small": 16.0, "medium": 22.0, "large": 32.0}
"""Side of the square an object fills, in pixels of the 64x64 picture."""

POSITION_CENTRE = {"center": (32, 34), "left": (17, 34), "right": (47, 34), "top": (32, 19), "bottom": (32, 47)}
"""Where an object (or the middle of a row of copies) stands before the seed's small offset, in pixels."""

PART_RGB = {
    "skin": (235, 190, 150),
    "trunk": (95, 60, 30),
    "door": (80, 45, 25),
    "stem": (235, 225, 200),
    "pistil": (150, 90, 20),
    "eye": (20, 20, 20),
    "leaf": (45, 125, 45),
}
"""Colours of the parts of an object that keep their colour whatever the object's colour is."""

BODY_SHADING = {"lit": 1.25, "shaded": 0.7}
"""Body parts drawn lighter or darker than the object's colour, as faces turned to or away from the light."""

CROWN_RGB = (240, 195, 40)
HAT_RGB = (70, 70, 82)
HAT_BAND_RGB = (190, 35, 35)
DARK_INK = (30, 30, 30)
LIGHT_INK = (245, 245, 245)

PATTERN_MIN_PERIOD = 6.0
"""The finest stripe period, dot spacing or two-check width, in pixels of the 64x64 picture."""

# headwear stands this much of the object's extent above the object's top
HEADWEAR_HEIGHT = 0.36
HEADWEAR_OVERLAP = 0.1


def _star(points: int, outer: float, inner: float, cy: float) -> list[tuple[float, float]]:
    vertices = []
    for k in range(2 * points):
        radius = outer if k % 2 == 0 else inner
        angle = -math.pi / 2 + k * math.pi / points
        vertices.append((radius * math.cos(angle), cy + radius * math.sin(angle)))
    return vertices


def _disc(cx: float, cy: float, radius: float) -> tuple[float, float, float, float]:
    return (cx - radius, cy - radius, cx + radius, cy + radius)


# Each class is a list of primitives in unit coordinates (the object fills [-0.5, 0.5]^2, y pointing down):
# (kind, geometry, part). Part "body" takes the object's colour and its pattern, "lit" and "shaded" are body
# too but lighter or darker (the faces of a cube), "erase" cuts the body away, and any other part keeps its
# colour from PART_RGB.
SHAPES = {
    "ball": [("ellipse", (-0.5, -0.5, 0.5, 0.5), "body")],
    # a cube seen from the front, a little from above and from the right
    "box": [
        ("rectangle", (-0.46, -0.2, 0.22, 0.46), "body"),
        ("polygon", [(-0.46, -0.2), (0.22, -0.2), (0.46, -0.44), (-0.22, -0.44)], "lit"),
        ("polygon", [(0.22, -0.2), (0.46, -0.44), (0.46, 0.22), (0.22, 0.46)], "shaded"),
    ],
    "heart": [
        ("ellipse", (-0.5, -0.46, 0.04, 0.06), "body"),
        ("ellipse", (-0.04, -0.46, 0.5, 0.06), "body"),
        ("polygon", [(-0.47, -0.1), (0.47, -0.1), (0.0, 0.48)], "body"),
    ],
    "star": [("polygon", _star(5, 0.52, 0.22, 0.05), "body")],
    "house": [
        ("rectangle", (-0.36, -0.06, 0.36, 0.48), "body"),
        ("polygon", [(-0.5, -0.02), (0.5, -0.02), (0.0, -0.5)], "body"),
        ("rectangle", (-0.1, 0.2, 0.1, 0.48), "door"),
    ],
    "tree": [
        ("rectangle", (-0.09, 0.1, 0.09, 0.5), "trunk"),
        ("ellipse", (-0.42, -0.5, 0.42, 0.22), "body"),
    ],
    "pyramid": [("polygon", [(-0.5, 0.44), (0.5, 0.44), (0.0, -0.5)], "body")],
    "moon": [("ellipse", (-0.5, -0.5, 0.5, 0.5), "body"), ("ellipse", (-0.14, -0.58, 0.7, 0.3), "erase")],
    "flower": [
        ("rectangle", (-0.04, 0.2, 0.04, 0.5), "leaf"),
        ("polygon", [(0.02, 0.45), (0.3, 0.28), (0.08, 0.49)], "leaf"),
        *[
            (
                "ellipse",
                _disc(0.23 * math.cos(k * math.pi / 3), -0.08 + 0.23 * math.sin(k * math.pi / 3), 0.18),
                "body",
            )
            for k in range(6)
        ],
        ("ellipse", _disc(0.0, -0.08, 0.14), "pistil"),
    ],
    "mushroom": [
        ("rectangle", (-0.15, -0.08, 0.15, 0.48), "stem"),
        ("pieslice", (-0.5, -0.46, 0.5, 0.38), "body"),
    ],
    "fish": [
        ("polygon", [(-0.5, -0.3), (-0.5, 0.3), (-0.12, 0.0)], "body"),
        ("ellipse", (-0.3, -0.3, 0.5, 0.3), "body"),
        ("ellipse", (0.22, -0.12, 0.32, -0.02), "eye"),
    ],
    "person": [
        ("polygon", [(-0.21, -0.17), (0.21, -0.17), (0.25, 0.2), (-0.25, 0.2)], "body"),
        ("polygon", [(-0.2, -0.16), (-0.38, 0.12), (-0.3, 0.16), (-0.14, -0.04)], "body"),
        ("polygon", [(0.2, -0.16), (0.38, 0.12), (0.3, 0.16), (0.14, -0.04)], "body"),
        ("rectangle", (-0.2, 0.18, -0.03, 0.5), "body"),
        ("rectangle", (0.03, 0.18, 0.2, 0.5), "body"),
        ("ellipse", (-0.15, -0.5, 0.15, -0.2), "skin"),
    ],
}


def _draw_primitive(draw: ImageDraw.ImageDraw, kind: str, geometry, to_pixels, fill: int):
    if kind == "polygon":
        draw.polygon([to_pixels(x, y) for x, y in geometry], fill=fill)
        return
    x0, y0 = to_pixels(geometry[0], geometry[1])
    x1, y1 = to_pixels(geometry[2], geometry[3])
    if kind == "ellipse":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif kind == "rectangle":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif kind == "pieslice":
        draw.pieslice((x0, y0, x1, y1), 180, 360, fill=fill)
    else:
        raise ValueError(f"unknown primitive {kind!r}")


def _ink_for(rgb: np.ndarray) -> tuple[int, int, int]:
    # patterns must show on every colour: dark ink on light objects, light ink on dark ones
    luminance = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return DARK_INK if luminance > 120 else LIGHT_INK


def _pattern_mask(name: str, size: tuple[int, int], extent: float, rng: np.random.Generator) -> np.ndarray:
    # `extent` is in supersampled pixels; the pattern scales with the object (a zebra's stripes scale with the
    # zebra) but never gets finer than PATTERN_MIN_PERIOD, which a 4x-downsampling autoencoder can still hold
    yy, xx = np.mgrid[0 : size[1], 0 : size[0]].astype(np.float32)
    floor = PATTERN_MIN_PERIOD * SUPERSAMPLING
    if name == "striped":
        period = max(extent / 3.5, floor)
        angle = math.radians(float(rng.choice([0, 45, 90, 135])))
        t = xx * math.cos(angle) + yy * math.sin(angle) + rng.uniform(0, period)
        return (t % period) < period / 2
    if name == "dotted":
        spacing = max(extent / 3.2, floor)
        ox, oy = rng.uniform(0, spacing, size=2)
        row = np.floor((yy + oy) / spacing)
        # every other row shifted by half a step: polka dots sit on a staggered grid
        u = (xx + ox + (row % 2) * spacing / 2) % spacing - spacing / 2
        v = (yy + oy) % spacing - spacing / 2
        return u * u + v * v < (0.3 * spacing) ** 2
    if name == "checkered":
        cell = max(extent / 4.0, floor / 2)
        ox, oy = rng.uniform(0, cell, size=2)
        return ((np.floor((xx + ox) / cell) + np.floor((yy + oy) / cell)) % 2) == 0
    raise ValueError(f"{name!r} is not a pattern")


def _draw_headwear(name: str, draw: ImageDraw.ImageDraw, part: str, cx: float, bottom: float, extent: float):
    height = HEADWEAR_HEIGHT * extent
    top = bottom - height
    if name == "crowned":
        half = 0.31 * extent
        points = [(-1, 1), (-1, 0.15), (-0.5, 0.58), (0, 0), (0.5, 0.58), (1, 0.15), (1, 1)]
        draw.polygon([(cx + half * x, top + height * y) for x, y in points], fill=255)
    elif name == "hatted":
        # a top hat: a brim, and above it a tall cylinder with a band
        brim, tall = 0.37 * extent, 0.22 * extent
        if part == "hat":
            draw.rectangle((cx - brim, bottom - 0.16 * height, cx + brim, bottom), fill=255)
            draw.rectangle((cx - tall, top, cx + tall, bottom - 0.1 * height), fill=255)
        else:
            draw.rectangle((cx - tall, bottom - 0.45 * height, cx + tall, bottom - 0.2 * height), fill=255)
    else:
        raise ValueError(f"{name!r} is not headwear")


def _render_copy(obj: SceneObject, rgb: np.ndarray, cx: float, cy: float, extent: float, rng: np.random.Generator):
    """Draws one copy of an object into a patch; returns the patch's origin (64-pixel grid), colours and coverage."""
    headwear = [name for name in obj.attributes if get_attribute(name).kind == "headwear"]
    above = (HEADWEAR_HEIGHT - HEADWEAR_OVERLAP) * extent if headwear else 0.0
    left, top = math.floor(cx - 0.6 * extent), math.floor(cy - 0.6 * extent - above)
    width, height = math.ceil(cx + 0.6 * extent) - left, math.ceil(cy + 0.6 * extent) - top
    s = SUPERSAMPLING
    size = (width * s, height * s)

    def to_pixels(u, v):
        return ((cx - left + u * extent) * s, (cy - top + v * extent) * s)

    masks = {}
    for kind, geometry, part in SHAPES[obj.object_class]:
        targets = ("body",) if part == "erase" else ("body", part) if part in BODY_SHADING else (part,)
        for target in targets:
            if target not in masks:
                masks[target] = Image.new("L", size, 0)
            _draw_primitive(ImageDraw.Draw(masks[target]), kind, geometry, to_pixels, 0 if part == "erase" else 255)

    masks = {part: np.asarray(mask) > 127 for part, mask in masks.items()}
    if headwear:
        rows = np.flatnonzero(np.logical_or.reduce(list(masks.values())).any(axis=1))
        object_top = rows[0] / s + top if rows.size else cy - extent / 2
        bottom = object_top + HEADWEAR_OVERLAP * extent
        for part in ("crown",) if headwear[0] == "crowned" else ("hat", "hat_band"):
            image = Image.new("L", size, 0)
            _draw_headwear(headwear[0], ImageDraw.Draw(image), part, (cx - left) * s, (bottom - top) * s, extent * s)
            masks[part] = np.asarray(image) > 127
    # about one pixel of dark outline in the final picture, as a cartoon or a product shot shows edges
    coverage = _grow(np.logical_or.reduce(list(masks.values())), 2)

    colour = np.empty((size[1], size[0], 3), dtype=np.float32)
    colour[:] = rgb * 0.45
    # soft light from above: the top of the body is lighter than its bottom
    shade = np.linspace(1.12, 0.88, size[1], dtype=np.float32)[:, None, None]
    layers = [("body", np.clip(rgb[None, None, :] * shade, 0, 255))]
    layers += [(part, np.asarray(PART_RGB[part], dtype=np.float32)) for part in PART_RGB if part in masks]
    for part, fill in layers:
        mask = masks[part]
        colour[mask] = fill if np.ndim(fill) == 1 else np.broadcast_to(fill, colour.shape)[mask]
    for part, factor in BODY_SHADING.items():
        if part in masks:
            colour[masks[part]] = np.clip(colour[masks[part]] * factor, 0, 255)
    patterns = [name for name in obj.attributes if get_attribute(name).kind == "pattern"]
    if patterns:
        colour[masks["body"] & _pattern_mask(patterns[0], size, extent * s, rng)] = _ink_for(rgb)
    for part, fill in (("crown", CROWN_RGB), ("hat", HAT_RGB), ("hat_band", HAT_BAND_RGB)):
        if part in masks:
            if part == "crown":
                # the crown's own outline: its rim stays dark so it reads against sand or a yellow object
                colour[masks[part]] = np.asarray(fill, dtype=np.float32) * 0.5
                colour[~_grow(~masks[part], 2)] = fill
            else:
                colour[masks[part]] = fill
    return left, top, colour, coverage.astype(np.float32)


def _grow(mask: np.ndarray, radius: int) -> np.ndarray:
    """Dilates a boolean mask by a (2 radius + 1)-pixel square, one axis at a time."""
    for axis in (0, 1):
        padded = np.pad(mask, [(radius, radius) if a == axis else (0, 0) for a in (0, 1)])
        n = mask.shape[axis]
        grown = np.zeros_like(mask)
        for shift in range(2 * radius + 1):
            grown |= padded[shift : shift + n] if axis == 0 else padded[:, shift : shift + n]
        mask = grown
    return mask


def _downsample(array: np.ndarray) -> np.ndarray:
    h, w = array.shape[0] // SUPERSAMPLING, array.shape[1] // SUPERSAMPLING
    return array.reshape(h, SUPERSAMPLING, w, SUPERSAMPLING, *array.shape[2:]).mean(axis=(1, 3))


def _composite(canvas: np.ndarray, left: int, top: int, colour: np.ndarray, coverage: np.ndarray):
    # average premultiplied colour and coverage over each 4x4 block: exact anti-aliasing of the edges
    premultiplied = _downsample(colour * coverage[..., None])
    alpha = _downsample(coverage)
    h, w = alpha.shape
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + h, IMAGE_SIZE), min(left + w, IMAGE_SIZE)
    if y0 >= y1 or x0 >= x1:
        return
    a = alpha[y0 - top : y1 - top, x0 - left : x1 - left, None]
    p = premultiplied[y0 - top : y1 - top, x0 - left : x1 - left]
    canvas[y0:y1, x0:x1] = canvas[y0:y1, x0:x1] * (1 - a) + p


def _gradient(top_rgb, bottom_rgb, rows: int) -> np.ndarray:
    t = np.linspace(0.0, 1.0, rows, dtype=np.float32)[:, None, None]
    return (1 - t) * np.asarray(top_rgb, np.float32) + t * np.asarray(bottom_rgb, np.float32)


def _background(name: str, rng: np.random.Generator) -> np.ndarray:
    n = IMAGE_SIZE
    canvas = np.zeros((n, n, 3), dtype=np.float32)
    horizon = int(rng.integers(-4, 5))
    if name == "plain":
        grey = rng.uniform(185, 210)
        yy, xx = np.mgrid[0:n, 0:n] - (n - 1) / 2
        vignette = 1 - 0.12 * (xx**2 + yy**2) / (2 * (n / 2) ** 2)
        canvas[:] = grey * vignette[..., None]
        noise = 2.0
    elif name == "night":
        canvas[:] = _gradient((12, 18, 50), (38, 44, 90), n)
        noise = 2.0
    elif name == "underwater":
        canvas[:] = _gradient((45, 140, 180), (15, 60, 110), n)
        noise = 3.0
    elif name in ("grass", "beach", "snow", "room"):
        h = 26 + horizon if name != "room" else 34 + horizon
        sky, ground = {
            "grass": (((115, 175, 235), (185, 215, 240)), ((80, 155, 60), (55, 120, 45))),
            "beach": (((110, 170, 230), (180, 210, 240)), ((228, 208, 160), (210, 185, 135))),
            "snow": (((190, 205, 230), (222, 230, 242)), ((244, 246, 251), (228, 232, 242))),
            "room": (((228, 214, 185), (215, 200, 170)), ((150, 100, 60), (125, 82, 48))),
        }[name]
        canvas[:h] = _gradient(*sky, h)
        canvas[h:] = _gradient(*ground, n - h)
        if name == "beach":
            canvas[h : h + 7] = _gradient((45, 115, 185), (70, 145, 200), 7)
        if name == "room":
            # floor boards
            canvas[h::6] *= 0.82
        noise = {"grass": 7.0, "beach": 4.0, "snow": 3.0, "room": 3.0}[name]
    else:
        raise ValueError(f"unknown background {name!r}; expected one of {tuple(BACKGROUNDS)}")
    canvas += rng.normal(0.0, noise, size=canvas.shape).astype(np.float32)
    return canvas


def render(scene: Scene) -> Image.Image:
    """Draws a scene.

    Args:
        scene: what to draw; the same scene (seed included) always gives the same pixels.

    Returns:
        A 64x64 RGB `PIL.Image.Image`.
    """
    rng = np.random.default_rng(scene.seed)
    canvas = _background(scene.background, rng)
    for obj in scene.objects:
        rgb = np.clip(np.asarray(COLOUR_RGB[obj.colour], np.float32) + rng.uniform(-12, 12, size=3), 0, 255)
        extent = OBJECT_EXTENT[obj.size]
        headwear = any(get_attribute(name).kind == "headwear" for name in obj.attributes)
        x, y = POSITION_CENTRE[obj.position]
        spacing = min(IMAGE_SIZE / obj.count, extent * 1.5)
        if obj.count > 1:
            # copies in a row stand apart: a row of four shrinks its objects to fit the picture
            extent = min(extent, spacing / 1.15)
        # how far a copy may wander without touching its neighbours
        wander = min(2.0, (spacing - 1.08 * extent) / 2) if obj.count > 1 else 2.0
        for k in range(obj.count):
            copy_extent = extent * rng.uniform(0.92, 1.08)
            above = (HEADWEAR_HEIGHT - HEADWEAR_OVERLAP) * copy_extent if headwear else 0.0
            cx = x + (k - (obj.count - 1) / 2) * spacing + rng.uniform(-wander, wander)
            cy = y + rng.uniform(-2, 2)
            cx = float(np.clip(cx, copy_extent / 2 + 1, IMAGE_SIZE - 1 - copy_extent / 2))
            cy = float(np.clip(cy, copy_extent / 2 + 1 + above, IMAGE_SIZE - 1 - copy_extent / 2))
            _composite(canvas, *_render_copy(obj, rgb, cx, cy, copy_extent, rng))
    return Image.fromarray(np.clip(canvas + 0.5, 0, 255).astype(np.uint8))


def _render_array(scene: Scene) -> np.ndarray:
    return np.asarray(render(scene))


def render_many(scenes: list[Scene], num_workers: int | None = None) -> np.ndarray:
    """Draws many scenes, in worker processes when there are several cores; the pixels are the same however many
    workers draw them, since each picture depends on its scene alone.

    Args:
        scenes: what to draw.
        num_workers: processes to draw with; one draws in this process. Defaults to the cores this process may
            use (rendering is pure Python and numpy, so threads would not run in parallel).

    Returns:
        A (N, 64, 64, 3) uint8 array, in the order of `scenes`.
    """
    if num_workers is None:
        num_workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    num_workers = max(1, min(num_workers, len(scenes) // 64))
    if num_workers == 1:
        arrays = [_render_array(scene) for scene in scenes]
    else:
        # fork, as torch's DataLoader on Linux: the workers run numpy and PIL only, never torch's thread pool or CUDA,
        # and unlike spawn it needs no importable __main__ (a notebook, a script without a main guard)
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        with multiprocessing.get_context(method).Pool(num_workers) as pool:
            arrays = pool.map(_render_array, scenes, chunksize=max(1, min(256, len(scenes) // (4 * num_workers))))
    return np.stack(arrays) if arrays else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)


def to_pixel_values(images: np.ndarray) -> "torch.Tensor":  # noqa: F821 (torch is imported only when called)
    """(N, 64, 64, 3) uint8 renders -> (N, 3, 64, 64) float pixel values in [-1, 1], the range SD's models take."""
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
