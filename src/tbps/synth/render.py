"""Drawing a synthetic pedestrian: camera views, per-identity shades, street backgrounds,
the body (one function per part, back to front) and camera effects, all with PIL.

Every random number comes from the ``rng`` passed in (``render_image`` seeds it from
``(seed, 2, person id, image index)``), so an image can be drawn again exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from tbps.synth.attributes import COLOURS, HAIR_COLOURS, SKIN_TONES, _pick

@dataclass
class View:
    """One camera's view of a person (all sampled per image)."""

    facing: str          # "front" | "back" | "left" | "right"
    phase: float         # walking phase in [-1, 1]: leg/arm swing
    height: float        # person height / image height
    cx: float            # person centre x / image width
    top: float           # head top y / image height
    brightness: float
    contrast: float
    cast: tuple[float, float, float]  # additive colour cast per channel
    blur: float          # Gaussian blur radius in pixels (0 = none)
    occluder: tuple[float, float, float, float] | None  # (x0, y0, x1, y1) / image size
    noise: float         # std of additive pixel noise


def sample_view(rng: np.random.Generator) -> View:
    """Sample one camera view: facing, pose, scale, position, lighting, blur, occlusion."""
    facing = _pick(rng, {"front": 0.35, "back": 0.3, "left": 0.175, "right": 0.175})
    height = float(rng.uniform(0.80, 0.94))
    top = float(rng.uniform(0.01, max(0.012, 0.99 - height)))
    occluder = None
    if rng.random() < 0.2:
        if rng.random() < 0.5:  # from below: a car, a bench, a railing
            y0 = float(rng.uniform(0.62, 0.82))
            occluder = (0.0, y0, 1.0, 1.0)
        else:  # from a side: a pole, a passer-by
            w = float(rng.uniform(0.15, 0.3))
            x0 = 0.0 if rng.random() < 0.5 else 1.0 - w
            x0 += float(rng.uniform(-0.05, 0.05))
            occluder = (x0, float(rng.uniform(0.0, 0.4)), x0 + w, 1.0)
    return View(
        facing=facing,
        phase=float(rng.uniform(-1, 1)),
        height=height,
        cx=float(0.5 + rng.uniform(-0.08, 0.08)),
        top=top,
        brightness=float(rng.uniform(0.85, 1.15)),
        contrast=float(rng.uniform(0.85, 1.12)),
        cast=tuple(float(x) for x in rng.uniform(-10, 10, size=3)),
        blur=float(rng.uniform(0.3, 0.7)) if rng.random() < 0.3 else 0.0,
        occluder=occluder,
        noise=float(rng.uniform(1.0, 4.0)),
    )


def _shade(c: tuple[int, int, int], f: float) -> tuple[int, int, int]:
    return tuple(int(min(255, max(0, round(v * f)))) for v in c)  # type: ignore[return-value]


def _contrast_colour(c: tuple[int, int, int]) -> tuple[int, int, int]:
    lum = 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]
    return (35, 35, 38) if lum > 140 else (232, 232, 228)


def identity_shades(attrs: dict[str, Any], rng: np.random.Generator | None) -> dict[str, tuple[int, int, int]]:
    """Per-identity shades: palette colour + small jitter (±10 per channel; none if rng is None).

    Drawn once per identity so that every camera shows the same garment shade.
    """
    out = {}
    for part, field in (("upper", "upper_colour"), ("lower", "lower_colour"), ("shoe", "shoe_colour"),
                        ("bag", "bag_colour"), ("headwear", "headwear_colour")):
        name = attrs[field]
        if name is not None:
            j = rng.integers(-10, 11, size=3) if rng is not None else np.zeros(3, dtype=int)
            out[part] = tuple(int(v) for v in np.clip(np.asarray(COLOURS[name]) + j, 0, 255))
    out["hair"] = HAIR_COLOURS[attrs["hair_colour"]]
    out["skin"] = tuple(attrs.get("skin", SKIN_TONES[1]))
    return out


def _background(rng: np.random.Generator, h: int, w: int) -> Image.Image:
    """Street-like clutter: a muted wall and ground in vertical bands (a cheap gradient),
    random rectangles (windows, doors, cars; a quarter of them saturated), a few poles."""
    n_rect, n_pole = int(rng.integers(2, 8)), int(rng.integers(0, 3))
    u = rng.random(8 + 8 * n_rect + 8 * n_pole)  # every random number this scene needs
    bands = 8
    wall = (70 + 120 * u[0]) * (0.8 + 0.4 * u[1:4])  # a tinted grey, never a saturated colour
    grad = (u[4] - 0.5) * 80
    t = (np.arange(bands) + 0.5) / bands
    walls = wall[None, :] + grad * t[:, None]  # (bands, 3)
    ground = (60 + 100 * u[5]) * (0.9 + 0.2 * u[1:4][::-1])
    horizon = h * (0.45 + 0.35 * u[6])
    r = u[8:8 + 8 * n_rect].reshape(n_rect, 8)
    saturated = r[:, 7] < 0.25
    rect_cols = np.where(saturated[:, None], r[:, 4:7] * 255, (40 + 170 * r[:, 4:5]) * (0.85 + 0.3 * r[:, 5:8]))
    pr = u[8 + 8 * n_rect:].reshape(n_pole, 8)
    cols = np.clip(np.concatenate([walls, ground[None], ground[None] * 0.92, rect_cols, 30 + 170 * pr[:, 1:4]]), 0, 255)
    cols = [tuple(c) for c in cols.astype(np.int64).tolist()]
    img = Image.new("RGB", (w, h))
    d = ImageDraw.Draw(img)
    for i in range(bands):
        d.rectangle([0, h * i / bands, w, h * (i + 1) / bands], fill=cols[i])
    d.rectangle([0, horizon, w, h], fill=cols[bands])
    d.rectangle([0, (horizon + h) / 2, w, h], fill=cols[bands + 1])
    for i in range(n_rect):
        x0, x1 = sorted(((r[i, 0] * 1.4 - 0.2) * w, (r[i, 1] * 1.4 - 0.2) * w))
        y0, y1 = sorted(((r[i, 2] * 1.1 - 0.1) * h, (r[i, 3] * 1.1 - 0.1) * h))
        d.rectangle([x0, y0, x1, y1], fill=cols[bands + 2 + i])
    for i in range(n_pole):  # poles / door frames
        x = pr[i, 0] * w
        d.rectangle([x, 0, x + 1 + 3 * pr[i, 4], h], fill=cols[bands + 2 + n_rect + i])
    return img


# A fixed bank of unit Gaussian noise shared by all images; each image reads
# a random window of it. Much cheaper than drawing h*w*3 normals per image, still seeded.
_NOISE_BANK: np.ndarray | None = None


def _noise(rng: np.random.Generator, n: int) -> np.ndarray:
    global _NOISE_BANK
    if _NOISE_BANK is None or _NOISE_BANK.size < 2 * n:
        _NOISE_BANK = np.random.default_rng(20240601).standard_normal(max(1 << 20, 4 * n), dtype=np.float32)
    start = int(rng.integers(0, _NOISE_BANK.size - n))
    return _NOISE_BANK[start:start + n]


def _camera(img: Image.Image, view: View, rng: np.random.Generator) -> Image.Image:
    """Lighting (contrast about mid-grey, brightness, colour cast), sensor noise, blur."""
    arr = np.asarray(img, dtype=np.float32)  # (H, W, 3), a fresh copy
    offset = 128.0 * (view.brightness - view.contrast) + np.asarray(view.cast, dtype=np.float32)
    arr *= np.float32(view.contrast)
    arr += offset.astype(np.float32)
    arr += _noise(rng, arr.size).reshape(arr.shape) * np.float32(view.noise)
    np.clip(arr, 0, 255, out=arr)
    img = Image.fromarray(arr.astype(np.uint8))
    if view.blur > 0:
        img = img.filter(ImageFilter.BoxBlur(view.blur))  # cheaper than Gaussian, looks alike
    return img


class _Body:
    """Maps body coordinates (u down from head top, v across; both in person heights) to pixels."""

    def __init__(self, view: View, h: int, w: int):
        self.ph = view.height * h
        self.top = view.top * h
        self.cx = view.cx * w

    def p(self, v: float, u: float) -> tuple[float, float]:
        return (self.cx + v * self.ph, self.top + u * self.ph)

    def box(self, v0: float, u0: float, v1: float, u1: float) -> list[float]:
        x0, y0 = self.p(v0, u0)
        x1, y1 = self.p(v1, u1)
        return [min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)]

    def poly(self, pts: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
        return [self.p(v, u) for v, u in pts]

    def px(self, length: float) -> int:
        return max(1, int(round(length * self.ph)))


def _limb(d: ImageDraw.ImageDraw, b: _Body, v0, u0, v1, u1, width: float, fill) -> None:
    d.line([b.p(v0, u0), b.p(v1, u1)], fill=fill, width=b.px(width))


def _pattern(d: ImageDraw.ImageDraw, b: _Body, span, u0: float, u1: float, pattern: str, col) -> None:
    """Draw a garment pattern inside a trapezoid; span(u) -> (v_left, v_right)."""
    if pattern == "plain":
        return
    step = max(5.0, 0.075 * b.ph)  # pixels between stripes / checks / dots
    y0, y1 = b.p(0, u0)[1], b.p(0, u1)[1]
    lw = 1 if step < 12 else 2
    if pattern in ("striped", "checked"):
        y = y0 + step / 2
        while y < y1 - 1:
            vl, vr = span((y - b.top) / b.ph)
            d.line([b.p(vl, (y - b.top) / b.ph), b.p(vr, (y - b.top) / b.ph)], fill=col, width=lw)
            y += step
    if pattern == "checked":
        vl, vr = span(u0)
        x = b.p(vl, u0)[0] + step / 2
        xr = b.p(vr, u0)[0]
        while x < xr - 1:
            d.line([(x, y0), (x, y1)], fill=col, width=lw)
            x += step
    if pattern == "dotted":
        r = max(0.6, step * 0.16)
        y = y0 + step / 2
        row = 0
        while y < y1 - 1:
            vl, vr = span((y - b.top) / b.ph)
            xl, xr = b.p(vl, 0)[0], b.p(vr, 0)[0]
            x = xl + step / 2 + (step / 2 if row % 2 else 0)
            while x < xr - 1:
                d.ellipse([x - r, y - r, x + r, y + r], fill=col)
                x += step
            y += step
            row += 1


@dataclass
class _Figure:
    """One person being drawn: canvas, body coordinates, attributes, colours and pose.

    Lengths are in person heights; ``v`` runs across (+v is where a side-facing person
    looks), ``u`` down from the head top.
    """

    d: ImageDraw.ImageDraw
    b: _Body
    a: dict[str, Any]
    cols: dict[str, tuple[int, int, int]]
    facing: str
    side: bool
    dirn: float           # +1 facing right, -1 otherwise
    sw: float             # walking phase (view.phase)
    sh_w: float           # torso half-width at the shoulders
    hip_w: float          # ... and at the hips
    torso_bottom: float   # where the upper garment ends
    legs: list[tuple[float, float]]               # (hip v, ankle v), far leg first
    arms: list[tuple[float, float, float, float]]  # (shoulder v, u, hand v, u), far arm first
    sleeve_end: float     # fraction of the arm the sleeve covers
    leg_w: float
    arm_w: float = 0.038

    def torso_span(self, u: float) -> tuple[float, float]:
        """(left v, right v) of the upper garment at height u: shoulders taper to hips,
        a coat flares again below the hips."""
        sh_w, hip_w = self.sh_w, self.hip_w
        t = min(1.0, max(0.0, (u - 0.16) / (0.47 - 0.16)))
        half = sh_w + (hip_w - sh_w) * t
        if self.a["upper_type"] == "coat" and u > 0.47:
            half = hip_w + (u - 0.47) * 0.12
        return (-half, half)


def _pose(d: ImageDraw.ImageDraw, b: _Body, attrs: dict[str, Any], view: View,
          cols: dict[str, tuple[int, int, int]]) -> _Figure:
    """The figure's geometry for this view: torso widths, leg and arm positions, sleeve length."""
    facing = view.facing
    side = facing in ("left", "right")
    ut = attrs["upper_type"]
    sw = view.phase
    # Torso half-widths (shoulder, hip) and vertical extents (person-height units).
    sh_w, hip_w = (0.07, 0.065) if side else (0.105, 0.088)
    torso_bottom = {"coat": 0.66, "dress": 0.47}.get(ut, 0.49 if ut in ("jacket", "hoodie", "sweater") else 0.48)
    # Legs: (hip v, ankle v). Side view: a stride along v; front/back: small spread.
    if side:
        legs = [(-0.01, -0.11 * sw), (0.01, 0.11 * sw)]  # far leg first, near leg last
    else:
        legs = [(-0.048, -0.055 - 0.015 * sw), (0.048, 0.055 - 0.015 * sw)]
    if side:
        arms = [(0.0, 0.16, -0.1 * sw, 0.48), (0.0, 0.16, 0.1 * sw, 0.48)]  # far, near
    else:
        arms = [(-0.105, 0.17, -0.13 - 0.02 * abs(sw), 0.49), (0.105, 0.17, 0.13 + 0.02 * abs(sw), 0.49)]
    return _Figure(
        d=d, b=b, a=attrs, cols=cols, facing=facing, side=side,
        dirn=1.0 if facing == "right" else -1.0, sw=sw,
        sh_w=sh_w, hip_w=hip_w, torso_bottom=torso_bottom, legs=legs, arms=arms,
        sleeve_end={"t-shirt": 0.35, "tank top": 0.0, "dress": 0.3}.get(ut, 1.0),
        leg_w=0.05 if side else 0.045,
    )


def _draw_arm(f: _Figure, arm: tuple[float, float, float, float]) -> None:
    d, b, skin = f.d, f.b, f.cols["skin"]
    v0, u0, v1, u1 = arm
    _limb(d, b, v0, u0, v1, u1, f.arm_w, skin)
    if f.sleeve_end > 0:
        vm, um = v0 + (v1 - v0) * f.sleeve_end, u0 + (u1 - u0) * f.sleeve_end
        _limb(d, b, v0, u0, vm, um, f.arm_w + 0.006, f.cols["upper"])
    r = 0.022
    d.ellipse(b.box(v1 - r, u1 - r, v1 + r, u1 + r), fill=skin)  # hand


def _draw_backpack_body(f: _Figure) -> None:
    d, b, col, dirn = f.d, f.b, f.cols["bag"], f.dirn
    if f.facing == "back":
        d.rounded_rectangle(b.box(-0.085, 0.19, 0.085, 0.44), radius=b.px(0.02), fill=col)
        d.line([b.p(-0.07, 0.27), b.p(0.07, 0.27)], fill=_shade(col, 0.6), width=1)
    elif f.side:
        d.rounded_rectangle(b.box(-dirn * 0.13, 0.19, -dirn * 0.05, 0.44), radius=b.px(0.015), fill=col)
    else:  # front: the bag peeks out behind the shoulders
        d.rectangle(b.box(-0.12, 0.18, 0.12, 0.40), fill=col)


def _draw_behind(f: _Figure) -> None:
    """What the body hides: a backpack seen from the front or side, long hair, the far arm."""
    a, d, b = f.a, f.d, f.b
    if a["bag_type"] == "backpack" and f.facing != "back":
        _draw_backpack_body(f)
    if a["hair_length"] == "long" and f.facing != "back":
        # Long hair falls behind the shoulders; seen from the front it frames the face.
        d.rectangle(b.box(-0.055, 0.07, 0.055, 0.27 if not f.side else 0.25), fill=f.cols["hair"])
    if f.side:
        _draw_arm(f, f.arms[0])


def _draw_legs(f: _Figure) -> None:
    """Bare legs, then the lower garment (trousers and jeans with seams, shorts, skirts) or a
    dress's skirt."""
    d, b, legs, side, hip_w = f.d, f.b, f.legs, f.side, f.hip_w
    ut, lt = f.a["upper_type"], f.a["lower_type"]
    lower = f.cols.get("lower")
    for hv, av in legs:
        _limb(d, b, hv, 0.50, av, 0.94, f.leg_w, f.cols["skin"])
    if lt in ("trousers", "jeans", "shorts"):
        end = 0.94 if lt != "shorts" else 0.64
        for hv, av in legs:
            t = (end - 0.50) / 0.44
            _limb(d, b, hv, 0.49, hv + (av - hv) * t, end, f.leg_w + 0.008, lower)
        d.polygon(b.poly([(-hip_w, 0.45), (hip_w, 0.45), (hip_w + 0.005, 0.54), (-hip_w - 0.005, 0.54)]), fill=lower)
        if lt == "jeans" and not side:  # a seam down each leg
            for hv, av in legs:
                d.line([b.p(hv, 0.56), b.p(av, 0.92)], fill=_shade(lower, 0.75), width=1)
    elif lt in ("skirt", "long skirt"):
        end, flare = (0.68, 0.14) if lt == "skirt" else (0.88, 0.16)
        if side:
            flare = flare * 0.75
        d.polygon(b.poly([(-hip_w, 0.45), (hip_w, 0.45), (flare, end), (-flare, end)]), fill=lower)
    if ut == "dress":
        d.polygon(b.poly([(-hip_w, 0.44), (hip_w, 0.44), (0.15 if not side else 0.11, 0.68),
                          (-0.15 if not side else -0.11, 0.68)]), fill=f.cols["upper"])


def _draw_shoes(f: _Figure) -> None:
    d, b, shoe, dirn = f.d, f.b, f.cols["shoe"], f.dirn
    for _hv, av in f.legs:
        if f.side:
            d.rectangle(b.box(av - 0.03 * dirn, 0.925, av + 0.065 * dirn, 0.985), fill=shoe)
        else:
            d.rectangle(b.box(av - 0.035, 0.925, av + 0.035, 0.985), fill=shoe)


def _draw_torso(f: _Figure) -> None:
    """The upper garment with its pattern and the details of its type, then the neck."""
    d, b, ut, upper = f.d, f.b, f.a["upper_type"], f.cols["upper"]
    sh_w, hip_w, torso_bottom = f.sh_w, f.hip_w, f.torso_bottom
    torso = [(-sh_w, 0.16), (sh_w, 0.16)]
    if ut == "coat":
        torso += [(hip_w + 0.023, 0.66), (-hip_w - 0.023, 0.66)]
    else:
        torso += [(hip_w, torso_bottom), (-hip_w, torso_bottom)]
    d.polygon(b.poly(torso), fill=upper)
    _pattern(d, b, f.torso_span, 0.19, torso_bottom - 0.01, f.a["pattern"], _contrast_colour(upper))
    _draw_garment_details(f)
    d.rectangle(b.box(-0.018, 0.12, 0.018, 0.165), fill=f.cols["skin"])  # neck


def _draw_garment_details(f: _Figure) -> None:
    """Zip and collar (jacket, coat), shirt collar, sweater hem, hood or pocket, tank-top neckline."""
    d, b, ut, upper, facing = f.d, f.b, f.a["upper_type"], f.cols["upper"], f.facing
    hip_w, torso_bottom = f.hip_w, f.torso_bottom
    dark = _shade(upper, 0.55) if sum(upper) > 120 else _shade(upper, 1.8)
    if ut in ("jacket", "coat") and facing == "front":
        d.line([b.p(0, 0.18), b.p(0, torso_bottom)], fill=dark, width=1)  # zip / opening
        d.polygon(b.poly([(-0.03, 0.16), (0.0, 0.22), (0.03, 0.16)]), fill=dark)  # collar
    elif ut == "shirt" and facing == "front":
        d.polygon(b.poly([(-0.035, 0.16), (0.0, 0.2), (0.035, 0.16)]), fill=_contrast_colour(upper))
    elif ut == "sweater":
        d.line([b.p(-hip_w, torso_bottom - 0.01), b.p(hip_w, torso_bottom - 0.01)], fill=dark, width=b.px(0.015))
    elif ut == "hoodie":
        if facing == "back":
            d.ellipse(b.box(-0.055, 0.12, 0.055, 0.24), fill=_shade(upper, 0.85))
        elif facing == "front":
            d.rectangle(b.box(-0.05, 0.37, 0.05, 0.45), outline=dark)  # pocket
    elif ut == "tank top":
        d.rectangle(b.box(-0.04, 0.16, 0.04, 0.19), fill=f.cols["skin"])  # neckline


def _draw_bag_on_body(f: _Figure) -> None:
    """A backpack seen from the back or its straps; a shoulder bag with its strap."""
    d, b, facing, side, dirn = f.d, f.b, f.facing, f.side, f.dirn
    bag = f.a["bag_type"]
    if bag == "backpack":
        if facing == "back":
            _draw_backpack_body(f)
        elif side:
            d.line([b.p(-dirn * 0.04, 0.17), b.p(-dirn * 0.02, 0.36)], fill=f.cols["bag"], width=b.px(0.018))
        else:
            for s in (-1, 1):
                d.line([b.p(s * 0.065, 0.165), b.p(s * 0.075, 0.37)], fill=f.cols["bag"], width=b.px(0.018))
    elif bag == "shoulder bag":
        col = f.cols["bag"]
        s = 1 if (facing == "front") else -1
        if side:
            d.line([b.p(-0.02, 0.16), b.p(0.02, 0.44)], fill=_shade(col, 0.8), width=1)
            d.rectangle(b.box(-dirn * 0.02, 0.42, -dirn * 0.10, 0.54), fill=col)
        else:
            d.line([b.p(-s * 0.09, 0.165), b.p(s * 0.1, 0.45)], fill=_shade(col, 0.8), width=b.px(0.012))
            d.rectangle(b.box(s * 0.08, 0.43, s * 0.17, 0.55), fill=col)


def _draw_arms(f: _Figure) -> None:
    """The arms in front of the body (only the near one in side view), a handbag in one hand."""
    for arm in (f.arms[1:] if f.side else f.arms):
        _draw_arm(f, arm)
    if f.a["bag_type"] == "handbag":
        d, b, col = f.d, f.b, f.cols["bag"]
        v1, u1 = f.arms[1][2], f.arms[1][3]
        d.line([b.p(v1 - 0.02, u1), b.p(v1 - 0.02, u1 + 0.04)], fill=_shade(col, 0.7), width=1)
        d.rectangle(b.box(v1 - 0.06, u1 + 0.03, v1 + 0.04, u1 + 0.11), fill=col)


def _draw_head(f: _Figure) -> None:
    """Head, hair and eyes as the view shows them, then any headwear."""
    d, b, a, hair, dirn = f.d, f.b, f.a, f.cols["hair"], f.dirn
    hv = 0.008 * dirn if f.side else 0.0
    d.ellipse(b.box(hv - 0.048, 0.012, hv + 0.048, 0.135), fill=f.cols["skin"])
    if f.facing == "back":
        d.ellipse(b.box(-0.05, 0.005, 0.05, 0.125), fill=hair)
        if a["hair_length"] == "long":
            d.rectangle(b.box(-0.05, 0.07, 0.05, 0.29), fill=hair)
    elif f.side:
        d.chord(b.box(hv - 0.05, 0.005, hv + 0.05, 0.10), 180, 360, fill=hair)
        d.rectangle(b.box(hv - dirn * 0.05, 0.05, hv - dirn * 0.005, 0.10 if a["hair_length"] == "short" else 0.26),
                    fill=hair)
        ex, ey = b.p(hv + dirn * 0.03, 0.07)
        d.point((ex, ey), fill=(30, 25, 25))
    else:
        d.chord(b.box(-0.05, 0.005, 0.05, 0.085), 180, 360, fill=hair)
        d.rectangle(b.box(-0.05, 0.04, -0.04, 0.09), fill=hair)
        d.rectangle(b.box(0.04, 0.04, 0.05, 0.09), fill=hair)
        for s in (-1, 1):
            ex, ey = b.p(s * 0.018, 0.07)
            d.point((ex, ey), fill=(30, 25, 25))
    if a["headwear"] != "none":
        _draw_headwear(f, hv)


def _draw_headwear(f: _Figure, hv: float) -> None:
    """A cap with its peak, a hat with its brim, or a beanie with its band; ``hv``: head centre v."""
    d, b, hw, hc, dirn = f.d, f.b, f.a["headwear"], f.cols["headwear"], f.dirn
    if hw == "cap":
        d.chord(b.box(hv - 0.051, 0.0, hv + 0.051, 0.09), 180, 360, fill=hc)
        if f.side:
            d.rectangle(b.box(hv + dirn * 0.03, 0.04, hv + dirn * 0.085, 0.052), fill=_shade(hc, 0.8))
        elif f.facing == "front":
            d.rectangle(b.box(-0.05, 0.04, 0.05, 0.055), fill=_shade(hc, 0.8))
    elif hw == "hat":
        d.rectangle(b.box(hv - 0.04, -0.025, hv + 0.04, 0.04), fill=hc)
        d.ellipse(b.box(hv - 0.085, 0.025, hv + 0.085, 0.055), fill=_shade(hc, 0.85))
    else:  # beanie
        d.chord(b.box(hv - 0.052, -0.005, hv + 0.052, 0.11), 180, 360, fill=hc)
        d.rectangle(b.box(hv - 0.052, 0.04, hv + 0.052, 0.058), fill=_shade(hc, 0.8))


def _draw_occluder(d: ImageDraw.ImageDraw, view: View, h: int, w: int,
                   rng: np.random.Generator) -> tuple[float, float, float, float] | None:
    """The view's occluding block in a random colour; returns its pixel box (or None)."""
    if view.occluder is None:
        return None
    x0, y0, x1, y1 = view.occluder
    occ_box = (x0 * w, y0 * h, x1 * w, y1 * h)
    d.rectangle(list(occ_box), fill=tuple(int(v) for v in rng.integers(20, 230, size=3)))
    return occ_box


def _probe_info(f: _Figure, occ_box: tuple[float, float, float, float] | None) -> dict[str, Any]:
    """Probe boxes: pixels that show only one garment (clear of arms, straps, hair, bags),
    and whether the view leaves each one visible."""
    a, b, side, facing = f.a, f.b, f.side, f.facing

    def pixel_box(v0: float, u0: float, v1: float, u1: float) -> list[int]:
        return [int(round(x)) for x in b.box(v0, u0, v1, u1)]

    def occluded(box: list[int]) -> bool:
        if occ_box is None:
            return False
        ox0, oy0, ox1, oy1 = occ_box
        return not (ox1 <= box[0] or ox0 >= box[2] or oy1 <= box[1] or oy0 >= box[3])

    if side:  # the half of the torso away from the swinging near arm, below long hair
        s_arm = 1.0 if f.sw >= 0 else -1.0
        upper_probe = pixel_box(-s_arm * 0.058, 0.28, -s_arm * 0.026, 0.40)
        lower_probe = pixel_box(-0.025, 0.52, 0.025, 0.56)  # hips, below the hand
    else:  # centre of the chest/back: clear of arms, straps, long hair and the hoodie pocket
        upper_probe = pixel_box(-0.035, 0.295, 0.035, 0.365)
        lower_probe = pixel_box(-0.05, 0.50, 0.05, 0.54)  # hips, below the upper garment
    upper_visible = not occluded(upper_probe) and not (
        a["bag_type"] == "backpack" and facing != "front" or a["bag_type"] == "shoulder bag" and side)
    lower_visible = a["lower_type"] is not None and a["upper_type"] != "coat" and not occluded(lower_probe) and not (
        side and a["bag_type"] in ("handbag", "shoulder bag"))
    return {
        "facing": facing,
        "upper_probe": upper_probe,
        "upper_visible": upper_visible,
        "lower_probe": lower_probe,
        "lower_visible": lower_visible,
        "person_box": pixel_box(-0.2, 0.0, 0.2, 1.0),
    }


def render_person(attrs: dict[str, Any], view: View, size: tuple[int, int], rng: np.random.Generator,
                  shades: dict[str, tuple[int, int, int]] | None = None) -> tuple[Image.Image, dict[str, Any]]:
    """Render one image of an identity seen through ``view``; ``size`` is (height, width).

    Returns the RGB image and ``info``: ``facing``, ``upper_probe`` (a pixel box
    (x0, y0, x1, y1) that shows only the upper garment when ``upper_visible``),
    ``lower_probe`` / ``lower_visible`` (the same for the lower garment), and
    ``person_box``. ``shades`` are the identity's jittered colours (``identity_shades``);
    None draws the exact palette colours. ``rng`` drives the background and camera noise.
    """
    h, w = size
    cols = shades if shades is not None else identity_shades(attrs, None)
    img = _background(rng, h, w)
    d = ImageDraw.Draw(img)
    f = _pose(d, _Body(view, h, w), attrs, view, cols)
    # Back to front: what the body hides, legs and lower garment, shoes, torso, bags on the
    # body, arms (and a handbag), head; then an occluder and the camera.
    _draw_behind(f)
    _draw_legs(f)
    _draw_shoes(f)
    _draw_torso(f)
    _draw_bag_on_body(f)
    _draw_arms(f)
    _draw_head(f)
    occ_box = _draw_occluder(d, view, h, w, rng)
    img = _camera(img, view, rng)
    return img, _probe_info(f, occ_box)


def person_shades(attrs: dict[str, Any], seed: int, pid: int) -> dict[str, tuple[int, int, int]]:
    """The jittered colours of person ``pid``: one stream per identity, same in every camera."""
    return identity_shades(attrs, np.random.default_rng([seed, 3, pid]))


def render_image(attrs: dict[str, Any], seed: int, pid: int, k: int, size: tuple[int, int],
                 shades: dict[str, tuple[int, int, int]] | None = None) -> tuple[Image.Image, dict[str, Any]]:
    """Image ``k`` of person ``pid`` exactly as ``synthesize(seed=seed)`` draws it.

    ``shades``: ``person_shades(attrs, seed, pid)``, passed in to skip recomputing it.
    """
    rng = np.random.default_rng([seed, 2, pid, k])
    view = sample_view(rng)
    if shades is None:
        shades = person_shades(attrs, seed, pid)
    return render_person(attrs, view, size, rng, shades)
