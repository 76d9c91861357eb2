"""Deterministic synthetic person-ReID data in Market-1501 layout, with ground-truth COCO-17 poses.

A person is an articulated figure (build, clothing colours and pattern, hair, hat, bag) drawn with
PIL along a 3-D skeleton.  Every camera sees a narrow band of viewpoints, gait phases and strides,
and has its own lighting, colour cast, background and blur: identity must be learnt across camera
domain shifts while a single camera offers little pose diversity (the federated-by-camera premise).

With ``clothes`` >= 2 outfits per identity, a person changes clothes between cameras (one outfit per
camera; build, skin and hair stay) and the dataset is written in LTCC layout, whose file names carry
the clothes id (docs/cloth-changing.md); with 1 outfit (default) the output is that of earlier versions.

Every random draw comes from a generator seeded by (seed, kind, pid, camera, index), so an image
does not depend on the order of generation.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from common.data.pose import NUM_KEYPOINTS, PoseTable, save_pose_file
from common.data.readers import LTCC_FOLDERS

GENERATOR_VERSION = 1
MAX_CAMERAS = 9  # synthetic names use one camera digit, c1 … c9, as Market-1501 does
SPLIT_FOLDERS = ("bounding_box_train", "query", "bounding_box_test")
SUPERSAMPLE = 2  # figures are drawn at 2x and box-filtered down (anti-aliasing)

RGB = tuple[int, int, int]

# COCO-17 keypoint order
NOSE, L_EYE, R_EYE, L_EAR, R_EAR = 0, 1, 2, 3, 4
L_SHO, R_SHO, L_ELB, R_ELB, L_WRI, R_WRI = 5, 6, 7, 8, 9, 10
L_HIP, R_HIP, L_KNE, R_KNE, L_ANK, R_ANK = 11, 12, 13, 14, 15, 16
# extra skeleton points after the 17 keypoints
NECK, HEAD, PELVIS, L_TOE, R_TOE = 17, 18, 19, 20, 21

# seed-stream kinds
_PERSON, _CAMERA, _IMAGE, _PLAN, _DISTRACTOR, _LOOKALIKE, _OUTFIT = 1, 2, 3, 4, 5, 6, 7

CLOTHES: tuple[RGB, ...] = (
    (28, 28, 32), (232, 232, 226), (128, 128, 130), (32, 42, 92), (42, 92, 182), (122, 170, 220),
    (190, 32, 38), (112, 24, 34), (42, 122, 62), (104, 112, 52), (228, 200, 44), (228, 122, 34),
    (228, 142, 172), (112, 52, 142), (112, 72, 42), (202, 182, 142),
)
TROUSERS: tuple[RGB, ...] = (
    (28, 28, 32), (30, 36, 70), (62, 84, 130), (110, 110, 112), (92, 62, 38), (196, 176, 136),
    (70, 78, 44), (220, 220, 212), (150, 40, 40),
)
SHOES: tuple[RGB, ...] = ((20, 20, 22), (236, 236, 236), (96, 60, 32), (120, 120, 124), (180, 40, 40))
SKIN: tuple[RGB, ...] = ((246, 212, 182), (226, 178, 140), (196, 140, 100), (146, 98, 64), (98, 64, 44))
HAIR: tuple[RGB, ...] = ((18, 16, 16), (56, 36, 24), (110, 72, 40), (206, 170, 96), (150, 150, 150))
PATTERNS = ("plain", "plain", "plain", "stripes", "stripes", "checks", "logo", "block")
BAGS = ("none", "none", "none", "backpack", "backpack", "shoulder")


def _rng(seed: int, kind: int, *keys: int) -> np.random.Generator:
    """Independent generator for one (seed, kind, keys) stream."""
    return np.random.default_rng([seed, kind, *keys])


def _pick(rng: np.random.Generator, palette: tuple[RGB, ...], jitter: int = 12) -> RGB:
    base = np.asarray(palette[rng.integers(len(palette))])
    return tuple(int(c) for c in np.clip(base + rng.integers(-jitter, jitter + 1, 3), 0, 255))


# ----------------------------------------------------------------------------- identities


@dataclass(frozen=True)
class Person:
    """Identity-defining appearance; widths are factors of a standard body."""

    build: float
    legs: float
    skin: RGB
    hair: RGB
    long_hair: bool
    shirt: RGB
    shirt2: RGB
    pattern: str
    long_sleeves: bool
    trousers: RGB
    shorts: bool
    shoes: RGB
    hat: RGB | None
    bag: str
    bag_colour: RGB


def _random_person(rng: np.random.Generator) -> Person:
    return Person(
        build=float(rng.uniform(0.85, 1.2)),
        legs=float(rng.uniform(0.96, 1.04)),
        skin=_pick(rng, SKIN, 6),
        hair=_pick(rng, HAIR, 6),
        long_hair=bool(rng.random() < 0.3),
        shirt=_pick(rng, CLOTHES),
        shirt2=_pick(rng, CLOTHES),
        pattern=PATTERNS[rng.integers(len(PATTERNS))],
        long_sleeves=bool(rng.random() < 0.5),
        trousers=_pick(rng, TROUSERS),
        shorts=bool(rng.random() < 0.2),
        shoes=_pick(rng, SHOES, 8),
        hat=_pick(rng, CLOTHES) if rng.random() < 0.2 else None,
        bag=BAGS[rng.integers(len(BAGS))],
        bag_colour=_pick(rng, CLOTHES),
    )


def visible_traits(person: Person) -> tuple:
    """The attributes that show in an image (a bag's colour only with a bag, ...): equal traits look alike."""
    return (round(person.build, 2), person.skin, person.hair, person.long_hair, person.shirt,
            person.shirt2 if person.pattern != "plain" else None, person.pattern, person.long_sleeves,
            person.trousers, person.shorts, person.shoes, person.hat, person.bag,
            person.bag_colour if person.bag != "none" else None)


def _mutate(person: Person, rng: np.random.Generator) -> Person:
    """``person`` with one attribute group redrawn so that it visibly differs: a look-alike."""
    groups = (("shirt", "shirt2"), ("pattern", "shirt2"), ("trousers", "shorts"), ("bag", "bag_colour"),
              ("hat",), ("hair", "long_hair"), ("shoes", "long_sleeves"))
    while True:
        other = _random_person(rng)
        group = groups[rng.integers(len(groups))]
        mutant = replace(person, **{name: getattr(other, name) for name in group})
        if visible_traits(mutant) != visible_traits(person):
            return mutant


@lru_cache(maxsize=4096)
def sample_person(seed: int, pid: int) -> Person:
    """Appearance of identity ``pid`` (≥ 1); about 30% are look-alikes of ``pid - 1``."""
    rng = _rng(seed, _LOOKALIKE, pid)
    if pid > 1 and rng.random() < 0.3:
        return _mutate(_random_person(_rng(seed, _PERSON, pid - 1)), rng)
    return _random_person(_rng(seed, _PERSON, pid))


CLOTHING = ("shirt", "shirt2", "pattern", "long_sleeves", "trousers", "shorts", "shoes", "hat", "bag", "bag_colour")
"""The ``Person`` fields an outfit change redraws (build, legs, skin and hair stay)."""


def wear_outfit(person: Person, seed: int, pid: int, outfit: int) -> Person:
    """``person`` in outfit ``outfit`` (0 = ``person`` itself): every ``CLOTHING`` field redrawn, so that
    it visibly differs from outfit 0."""
    if outfit == 0:
        return person
    rng = _rng(seed, _OUTFIT, pid, outfit)
    while True:
        other = _random_person(rng)
        dressed = replace(person, **{name: getattr(other, name) for name in CLOTHING})
        if visible_traits(dressed) != visible_traits(person):
            return dressed


@lru_cache(maxsize=4096)
def sample_distractor(seed: int, index: int) -> Person:
    """Appearance of distractor ``index`` (pid 0)."""
    return _random_person(_rng(seed, _DISTRACTOR, index))


# ----------------------------------------------------------------------------- cameras


@dataclass(frozen=True)
class Camera:
    """One camera's pose band (radians) and imaging conditions."""

    yaw: float  # viewpoint centre: 0 front, pi back, pi/2 the person walks to the image right
    yaw_std: float
    phase: float  # gait phase centre
    phase_halfwidth: float
    stride: float  # leg swing amplitude
    arm_swing: float
    lean: float
    pitch: float  # camera elevation: looking down by this angle
    scale: float  # person height / image height
    gain: float
    cast: tuple[float, float, float]
    noise: float  # Gaussian noise std on 0..255
    blur: float  # blur radius in pixels at 128-pixel image height
    jpeg_quality: int


@lru_cache(maxsize=256)
def sample_camera(seed: int, cam: int, num_cameras: int, pose_band: float = 1.0) -> Camera:
    """Camera ``cam`` (1-based); viewpoint centres are spread evenly round the person.

    ``pose_band`` widens every camera's pose band: it multiplies the viewpoint spread (yaw std,
    0.08–0.16 rad at 1) and the gait-phase half-width (0.2–0.35 rad at 1, capped at π); all other
    camera properties are unchanged."""
    rng = _rng(seed, _CAMERA, cam)
    return Camera(
        yaw=2 * math.pi * (cam - 1) / num_cameras + float(rng.uniform(-0.15, 0.15)),
        yaw_std=pose_band * float(rng.uniform(0.08, 0.16)),
        phase=float(rng.uniform(0, 2 * math.pi)),
        phase_halfwidth=min(math.pi, pose_band * float(rng.uniform(0.2, 0.35))),
        stride=float(rng.uniform(0.12, 0.45)),
        arm_swing=float(rng.uniform(0.1, 0.5)),
        lean=float(rng.uniform(-0.04, 0.12)),
        pitch=float(rng.uniform(0.0, 0.35)),
        scale=float(rng.uniform(0.8, 0.88)),
        gain=float(rng.uniform(0.65, 1.2)),
        cast=tuple(float(c) for c in rng.uniform(0.86, 1.14, 3)),
        noise=float(rng.uniform(1.0, 5.0)),
        blur=float(rng.choice([0.0, 0.3, 0.6, 0.9])),
        jpeg_quality=int(rng.integers(72, 95)),
    )


@lru_cache(maxsize=32)
def _background(seed: int, cam: int, height: int, width: int) -> Image.Image:
    """Camera backdrop at supersampled size (SS*height, SS*2*width): wall, floor, pillars, texture."""
    rng = _rng(seed, _CAMERA, cam, 1)
    h, w = SUPERSAMPLE * height, SUPERSAMPLE * 2 * width
    wall = rng.uniform(40, 200, 3) * 0.6 + rng.uniform(60, 200) * 0.4
    floor = rng.uniform(40, 200, 3) * 0.5 + rng.uniform(60, 180) * 0.5
    horizon = int(h * rng.uniform(0.45, 0.75))
    rows = np.arange(h, dtype=np.float32)[:, None, None] / h
    img = np.where(rows < horizon / h, wall, floor) * (1 + rng.uniform(-0.25, 0.25) * (rows - 0.5))
    img = np.broadcast_to(img, (h, w, 3)).copy()
    for _ in range(rng.integers(0, 4)):  # pillars, doors, windows
        x0 = int(rng.integers(0, w))
        pw = int(rng.integers(w // 16, w // 4))
        y1 = int(rng.integers(horizon // 2, horizon + 1))
        img[: y1, x0: x0 + pw] = rng.uniform(30, 230, 3) * 0.5 + rng.uniform(40, 200) * 0.5
    period = max(4, int(h * rng.uniform(0.04, 0.1)))
    img[horizon::period] *= 0.8  # floor tile seams
    coarse = np.clip(128 + rng.normal(0, rng.uniform(4, 14), (h // 16 + 1, w // 16 + 1, 3)), 0, 255)
    smooth = Image.fromarray(coarse.astype(np.uint8)).resize((w, h), Image.BILINEAR)
    img += np.asarray(smooth, np.float32) - 128
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


# ----------------------------------------------------------------------------- poses


@dataclass(frozen=True)
class Pose:
    """Per-image articulation (radians) and placement (fractions of the image)."""

    yaw: float
    phase: float
    stride: float
    arm_swing: float
    lean: float
    scale: float
    dx: float
    dy: float


def sample_pose(camera: Camera, rng: np.random.Generator) -> Pose:
    """A pose from ``camera``'s narrow band plus small per-image placement jitter."""
    return Pose(
        yaw=camera.yaw + float(rng.normal(0, camera.yaw_std)),
        phase=camera.phase + float(rng.uniform(-camera.phase_halfwidth, camera.phase_halfwidth)),
        stride=camera.stride * float(rng.uniform(0.85, 1.15)),
        arm_swing=camera.arm_swing * float(rng.uniform(0.8, 1.2)),
        lean=camera.lean + float(rng.normal(0, 0.02)),
        scale=camera.scale * float(rng.uniform(0.95, 1.05)),
        dx=float(rng.uniform(-0.05, 0.05)),
        dy=float(rng.uniform(-0.02, 0.025)),
    )


def skeleton(person: Person, pose: Pose) -> np.ndarray:
    """(22, 3) body points in person units (height 1): x to the person's left, y up, z forward.

    Rows 0..16 are COCO-17 keypoints, then neck, head centre, pelvis, left / right toe.
    """
    p = np.zeros((22, 3))
    b, hip_y = person.build, 0.51 * person.legs
    p[HEAD] = (0, 0.905, 0)
    p[NECK] = (0, 0.845, 0)
    p[NOSE] = (0, 0.9, 0.055)
    p[[L_EYE, R_EYE]] = [(0.022, 0.915, 0.048), (-0.022, 0.915, 0.048)]
    p[[L_EAR, R_EAR]] = [(0.055, 0.905, 0.0), (-0.055, 0.905, 0.0)]
    p[[L_SHO, R_SHO]] = [(0.1 * b, 0.815, 0), (-0.1 * b, 0.815, 0)]
    p[[L_HIP, R_HIP]] = [(0.07 * b, hip_y, 0), (-0.07 * b, hip_y, 0)]
    p[PELVIS] = (0, hip_y, 0)
    sin_phase = math.sin(pose.phase)
    for side, sign in ((0, 1.0), (1, -1.0)):
        swing = -sign * pose.arm_swing * sin_phase
        elbow_flex = 0.15 + 0.5 * max(0.0, swing)
        _chain(p, L_SHO + side, (L_ELB + side, L_WRI + side), (0.16, 0.15),
               (swing, swing + elbow_flex), abduct=sign * 0.12)
        thigh = sign * pose.stride * sin_phase
        knee_flex = 1.6 * pose.stride * max(0.0, sign * math.cos(pose.phase)) ** 1.5
        _chain(p, L_HIP + side, (L_KNE + side, L_ANK + side), (hip_y - 0.275, 0.235),
               (thigh, thigh - knee_flex), abduct=0.0)
        p[L_TOE + side] = p[L_ANK + side] + (0, -0.025, 0.065)
    _lean_upper_body(p, pose.lean)
    p[:, 1] += 0.045 - p[[L_ANK, R_ANK], 1].min()  # the lower foot stands on the ground
    return p


def _chain(p: np.ndarray, root: int, joints: tuple[int, int], lengths: tuple[float, float],
           angles: tuple[float, float], abduct: float) -> None:
    """Two-segment limb from ``root``; angles swing forward (+z) from hanging straight down."""
    prev = root
    for joint, length, angle in zip(joints, lengths, angles):
        direction = np.array([math.sin(abduct), -math.cos(angle), math.sin(angle)])
        p[joint] = p[prev] + length * direction / np.linalg.norm(direction)
        prev = joint


def _lean_upper_body(p: np.ndarray, lean: float) -> None:
    """Pitch everything above the pelvis forward by ``lean`` radians about the pelvis."""
    upper = [NOSE, L_EYE, R_EYE, L_EAR, R_EAR, L_SHO, R_SHO, L_ELB, R_ELB, L_WRI, R_WRI, NECK, HEAD]
    dy = p[upper, 1] - p[PELVIS, 1]
    p[upper, 2] += dy * math.sin(lean)
    p[upper, 1] = p[PELVIS, 1] + dy * math.cos(lean)


def project(points: np.ndarray, yaw: float, pitch: float, scale_px: float, cx: float,
            foot_y: float) -> tuple[np.ndarray, np.ndarray]:
    """Orthographic camera: (N, 3) person points → (N, 2) image pixels and (N,) depth (+ = nearer)."""
    c, s = math.cos(yaw), math.sin(yaw)
    x, y, z = points.T
    wx, wz = x * c + z * s, -x * s + z * c
    u = cx + wx * scale_px
    v = foot_y - (y * math.cos(pitch) - wz * math.sin(pitch)) * scale_px
    return np.stack([u, v], 1), wz


def visibility(person: Person, yaw: float, uv: np.ndarray, depth: np.ndarray, scale_px: float,
               height: int, width: int) -> np.ndarray:
    """(17,) float32: 1 where a keypoint is in the image and not hidden by the head or body."""
    c, s = math.cos(yaw), math.sin(yaw)
    facing = {NOSE: c + 0.1, L_EYE: c - 0.6 * s - 0.05, R_EYE: c + 0.6 * s - 0.05,
              L_EAR: -s + 0.3, R_EAR: s + 0.3}
    vis = np.ones(NUM_KEYPOINTS, dtype=bool)
    for k, value in facing.items():
        vis[k] = value > 0
    torso_u = uv[[L_SHO, R_SHO, L_HIP, R_HIP], 0].mean()
    half = (0.1 * abs(c) + 0.06 * abs(s)) * person.build * scale_px
    for k in range(L_SHO, NUM_KEYPOINTS):
        far = (-s if k % 2 else s) < -0.5  # odd = left side: its outward normal has depth -sin(yaw)
        if far and depth[k] < 0 and abs(uv[k, 0] - torso_u) < half:
            vis[k] = False
    inside = (uv[:17, 0] >= 0) & (uv[:17, 0] <= width - 1) & (uv[:17, 1] >= 0) & (uv[:17, 1] <= height - 1)
    return (vis & inside).astype(np.float32)


# ----------------------------------------------------------------------------- drawing


class _Painter:
    """Draws one figure on a supersampled canvas; coordinates are given in output pixels."""

    def __init__(self, canvas: Image.Image, person: Person, uv: np.ndarray, depth: np.ndarray,
                 yaw: float, scale_px: float):
        self.canvas, self.person, self.yaw = canvas, person, yaw
        self.draw = ImageDraw.Draw(canvas)
        self.pts = (uv + 0.5) * SUPERSAMPLE - 0.5
        self.depth = depth
        self.unit = scale_px * SUPERSAMPLE  # supersampled pixels per body height

    def width(self, body_units: float) -> int:
        return max(1, round(body_units * self.person.build * self.unit))

    def dot(self, centre: np.ndarray, radius: float, colour: RGB) -> None:
        x, y = centre
        self.draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=colour)

    def limb(self, idx: tuple[int, ...], thickness: float, colour: RGB) -> None:
        """Thick polyline through skeleton points ``idx`` with round joints and ends."""
        w = self.width(thickness)
        self.draw.line([tuple(self.pts[i]) for i in idx], fill=colour, width=w, joint="curve")
        for i in idx:
            self.dot(self.pts[i], w / 2, colour)

    def partial_limb(self, a: int, b: int, frac: float, thickness: float, colour: RGB) -> None:
        """Segment a→b up to fraction ``frac`` (sleeves, shorts)."""
        end = self.pts[a] + frac * (self.pts[b] - self.pts[a])
        w = self.width(thickness)
        self.draw.line([tuple(self.pts[a]), tuple(end)], fill=colour, width=w)
        self.dot(self.pts[a], w / 2, colour)

    def torso_polygon(self) -> list[tuple[float, float]]:
        """Neck base, sloping shoulders, waist and hem, around the shoulder-to-hip axis."""
        c, s = abs(math.cos(self.yaw)), abs(math.sin(self.yaw))
        top = (self.pts[L_SHO] + self.pts[R_SHO]) / 2
        hip = (self.pts[L_HIP] + self.pts[R_HIP]) / 2
        axis = hip - top
        normal = np.array([-axis[1], axis[0]]) / (np.linalg.norm(axis) + 1e-9)
        rows = ((-0.1, 0.045 * c + 0.04 * s), (0.04, 0.105 * c + 0.06 * s), (0.55, 0.085 * c + 0.055 * s),
                (1.12, 0.09 * c + 0.055 * s))  # (position along the axis, half-width in body units)
        left = [top + t * axis + self.width(w) * normal for t, w in rows]
        right = [top + t * axis - self.width(w) * normal for t, w in rows]
        return [tuple(q) for q in left + right[::-1]]

    def torso(self) -> None:
        p = self.person
        poly = self.torso_polygon()
        if p.pattern == "plain" or (p.pattern == "logo" and math.cos(self.yaw) < 0.3):
            self.draw.polygon(poly, fill=p.shirt)
        else:
            x0, y0 = (int(min(q[i] for q in poly)) for i in (0, 1))
            x1, y1 = (int(max(q[i] for q in poly)) + 2 for i in (0, 1))
            mask = Image.new("L", (x1 - x0, y1 - y0), 0)
            ImageDraw.Draw(mask).polygon([(x - x0, y - y0) for x, y in poly], fill=255)
            self.canvas.paste(self._pattern(x0, y0, x1, y1), (x0, y0), mask)
        if p.bag == "shoulder":
            self.draw.line([poly[1], poly[5]], fill=p.bag_colour, width=self.width(0.018))

    def _pattern(self, x0: int, y0: int, x1: int, y1: int) -> Image.Image:
        """The shirt pattern over the torso's bounding box (canvas pixels x0..x1, y0..y1)."""
        p = self.person
        ys, xs = np.arange(y1 - y0)[:, None], np.arange(x1 - x0)[None, :]
        period = max(2, round(0.035 * self.unit))
        if p.pattern == "stripes":
            second = (ys // period) % 2 == 1
        elif p.pattern == "checks":
            second = (ys // period + xs // period) % 2 == 1
        elif p.pattern == "block":
            second = ys > 0.45 * (y1 - y0)
        else:  # logo on the chest, seen from the front only
            second = (np.abs(ys - 0.35 * (y1 - y0)) < 0.1 * (y1 - y0)) & (np.abs(xs - (x1 - x0) / 2) < period * 1.5)
        second = np.broadcast_to(second, (y1 - y0, x1 - x0))
        colours = np.asarray([p.shirt, p.shirt2], np.uint8)
        return Image.fromarray(colours[second.astype(np.intp)])

    def leg(self, side: int) -> None:
        p = self.person
        hip, knee, ankle, toe = L_HIP + side, L_KNE + side, L_ANK + side, L_TOE + side
        if p.shorts:
            self.limb((hip, knee, ankle), 0.05, p.skin)
            self.partial_limb(hip, knee, 0.65, 0.066, p.trousers)
        else:
            self.limb((hip, knee), 0.064, p.trousers)
            self.limb((knee, ankle), 0.054, p.trousers)
        self.limb((ankle, toe), 0.045, p.shoes)

    def arm(self, side: int) -> None:
        p = self.person
        sho, elb, wri = L_SHO + side, L_ELB + side, L_WRI + side
        if p.long_sleeves:
            self.limb((sho, elb, wri), 0.046, p.shirt)
        else:
            self.limb((sho, elb, wri), 0.038, p.skin)
            self.partial_limb(sho, elb, 0.55, 0.05, p.shirt)
        self.dot(self.pts[wri], self.width(0.024), p.skin)

    def head(self) -> None:
        p, c, s = self.person, math.cos(self.yaw), math.sin(self.yaw)
        x, y = self.pts[HEAD]
        r = self.width(0.062) / p.build
        self.dot(self.pts[HEAD], r, p.hair)
        if c > -0.3:
            fx, fy = x + 0.3 * r * s, y + 0.2 * r
            fw, fh = r * (0.5 + 0.35 * max(c, 0.0)), r * 0.78
            self.draw.ellipse((fx - fw, fy - fh, fx + fw, fy + fh), fill=p.skin)
        if p.hat is not None:
            self.draw.chord((x - 1.08 * r, y - 1.15 * r, x + 1.08 * r, y + 0.7 * r), 180, 360, fill=p.hat)
            bx = x + 0.7 * r * s
            bw = r * (0.7 + 0.5 * abs(s))
            self.draw.ellipse((bx - bw, y - 0.45 * r, bx + bw, y - 0.1 * r), fill=p.hat)

    def long_hair(self) -> None:
        x, y = self.pts[HEAD]
        r = self.width(0.062) / self.person.build
        bottom = self.pts[NECK][1] + 1.3 * r
        shift = -0.35 * r * math.sin(self.yaw)
        self.draw.rounded_rectangle((x + shift - 0.95 * r, y, x + shift + 0.95 * r, bottom), radius=r * 0.6,
                                    fill=self.person.hair)

    def backpack(self) -> None:
        p, c, s = self.person, math.cos(self.yaw), math.sin(self.yaw)
        top = (self.pts[L_SHO] + self.pts[R_SHO]) / 2
        hip = (self.pts[L_HIP] + self.pts[R_HIP]) / 2
        cx = top[0] - 0.09 * self.unit * p.build * s
        hw = self.width(0.075 * abs(c) + 0.05 * abs(s))
        y0, y1 = top[1] + 0.05 * (hip[1] - top[1]), top[1] + 0.7 * (hip[1] - top[1])
        self.draw.rounded_rectangle((cx - hw, y0, cx + hw, y1), radius=hw * 0.4, fill=p.bag_colour)

    def backpack_straps(self) -> None:
        hip = (self.pts[L_HIP] + self.pts[R_HIP]) / 2
        for k in (L_SHO, R_SHO):
            end = self.pts[k] + 0.5 * (hip - self.pts[k])
            end[0] = self.pts[k][0] + 0.3 * (hip[0] - self.pts[k][0])
            self.draw.line([tuple(self.pts[k]), tuple(end)], fill=self.person.bag_colour, width=self.width(0.018))

    def shoulder_bag(self) -> None:
        x, y = self.pts[R_HIP]
        hw, hh = self.width(0.05), self.width(0.045)
        self.draw.rounded_rectangle((x - hw, y - hh, x + hw, y + hh), radius=hh * 0.3, fill=self.person.bag_colour)

    def paint(self) -> None:
        """Painter's algorithm: legs, then parts behind the torso, torso, parts in front, head."""
        c = math.cos(self.yaw)
        d = self.depth
        ops: list[tuple[float, Callable[[], None]]] = [
            (-10 + d[L_KNE], lambda: self.leg(0)), (-10 + d[R_KNE], lambda: self.leg(1)),
            (-1.0, lambda: self.limb((NECK, HEAD), 0.04, self.person.skin)),
            (0.0, self.torso),
            (d[[L_SHO, L_ELB, L_WRI]].mean() + 0.01, lambda: self.arm(0)),
            (d[[R_SHO, R_ELB, R_WRI]].mean() + 0.01, lambda: self.arm(1)),
            (10.0, self.head),
        ]
        if self.person.long_hair:
            ops.append((-0.05 * c, self.long_hair))
        if self.person.bag == "backpack":
            ops.append((-0.1 * c, self.backpack))
            if c > 0.3:
                ops.append((0.001, self.backpack_straps))
        elif self.person.bag == "shoulder":
            ops.append((d[R_HIP] + 0.02, self.shoulder_bag))
        for _, op in sorted(ops, key=lambda item: item[0]):
            op()


# ----------------------------------------------------------------------------- images


def render(person: Person, camera: Camera, pose: Pose, rng: np.random.Generator, seed: int, cam: int,
           height: int, width: int) -> tuple[Image.Image, np.ndarray, np.ndarray]:
    """One image (height×width RGB), its keypoints (17, 2) float32 pixels and scores (17,) float32."""
    scale_px = pose.scale * height
    cx, foot_y = width / 2 + pose.dx * width, height * (0.955 + pose.dy)
    uv, depth = project(skeleton(person, pose), pose.yaw, camera.pitch, scale_px, cx, foot_y)
    background = _background(seed, cam, height, width)
    ox = int(rng.integers(0, background.width - SUPERSAMPLE * width + 1))
    canvas = background.crop((ox, 0, ox + SUPERSAMPLE * width, SUPERSAMPLE * height))
    _Painter(canvas, person, uv, depth, pose.yaw, scale_px).paint()
    image = canvas.reduce(SUPERSAMPLE)
    if camera.blur > 0:
        image = image.filter(ImageFilter.GaussianBlur(camera.blur * height / 128))
    gain = np.asarray(camera.cast, np.float32) * (camera.gain * float(rng.uniform(0.92, 1.08)))
    pixels = np.asarray(image, np.float32) * gain + rng.standard_normal((height, width, 3), np.float32) * camera.noise
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    scores = visibility(person, pose.yaw, uv, depth, scale_px, height, width)
    return image, uv[:NUM_KEYPOINTS].astype(np.float32), scores


@dataclass(frozen=True)
class ImageSpec:
    """One image to generate: ``index`` is its number within (pid, cam), or the distractor number;
    ``outfit`` the identity's outfit (0-based; the file name holds ``outfit + 1`` in LTCC layout)."""

    folder: str
    pid: int
    cam: int
    index: int
    name: str
    outfit: int = 0

    @property
    def relpath(self) -> str:
        return f"{self.folder}/{self.name}"


def _market_name(pid: int, cam: int, seq: int, frame: int, number: int) -> str:
    return f"{pid:04d}_c{cam}s{seq}_{frame:06d}_{number:02d}.jpg"


def split_folders(clothes: int) -> tuple[str, str, str]:
    """(train, query, gallery) folder names: Market layout with one outfit per identity, LTCC layout with more."""
    return SPLIT_FOLDERS if clothes == 1 else LTCC_FOLDERS


def _ltcc_name(pid: int, outfit: int, cam: int, frame: int) -> str:
    return f"{pid:03d}_{outfit + 1}_c{cam}_{frame:06d}.jpg"


def _outfit_by_camera(seed: int, pid: int, cams: list[int], clothes: int) -> dict[int, int]:
    """{camera: outfit} of one identity: its cameras in a random order wear outfits 0, 1, …, clothes − 1, 0, …,
    so an identity seen by k cameras wears min(k, clothes) outfits, at least two when clothes >= 2."""
    order = _rng(seed, _OUTFIT, pid).permutation(cams)
    return {int(cam): j % clothes for j, cam in enumerate(order)}


def _id_plan(seed: int, pid: int, num_cameras: int, per_camera: tuple[int, int],
             query_fraction: float) -> tuple[dict[int, int], set[int]]:
    """({camera: number of images}, query cameras) of one identity; ≥ 2 cameras each."""
    rng = _rng(seed, _PLAN, pid)
    first = (pid - 1) % num_cameras + 1  # every camera is some identities' first camera
    others = [c for c in range(1, num_cameras + 1) if c != first]
    k = int(rng.integers(2, num_cameras + 1))
    cams = sorted([first, *rng.choice(others, k - 1, replace=False).tolist()])
    counts = {c: int(rng.integers(per_camera[0], per_camera[1] + 1)) for c in cams}
    n_query = max(1, round(query_fraction * k))
    return counts, set(rng.choice(cams, n_query, replace=False).tolist())


def plan(num_ids: int, num_cameras: int, seed: int, per_camera: tuple[int, int], query_fraction: float,
         num_distractors: int, clothes: int = 1) -> list[ImageSpec]:
    """All images: ids 1..num_ids//2 train, the rest test (one query per query camera, rest gallery);
    Market layout with one outfit per identity, LTCC layout with ``clothes`` >= 2 (``_outfit_by_camera``)."""
    n_train = num_ids // 2
    folders = split_folders(clothes)
    specs = []
    for pid in range(1, num_ids + 1):
        counts, query_cams = _id_plan(seed, pid, num_cameras, per_camera, query_fraction)
        outfits = _outfit_by_camera(seed, pid, list(counts), clothes)
        for cam, count in counts.items():
            rng = _rng(seed, _PLAN, pid, cam)
            seq, frame = int(rng.integers(1, 7)), int(rng.integers(0, 900000))
            query_index = int(rng.integers(count)) if cam in query_cams else -1
            for i in range(count):
                folder = folders[0] if pid <= n_train else folders[1 if i == query_index else 2]
                name = (_market_name(pid, cam, seq, frame + 25 * i, i + 1) if clothes == 1
                        else _ltcc_name(pid, outfits[cam], cam, frame + 25 * i))
                specs.append(ImageSpec(folder, pid, cam, i, name, outfits[cam]))
    for j in range(num_distractors):
        cam = int(_rng(seed, _DISTRACTOR, j, 1).integers(1, num_cameras + 1))
        name = _market_name(0, cam, 1, 100 * j, 1) if clothes == 1 else _ltcc_name(0, 0, cam, 100 * j)
        specs.append(ImageSpec(folders[2], 0, cam, j, name))
    return specs


def render_spec(spec: ImageSpec, seed: int, num_cameras: int, height: int, width: int,
                pose_band: float = 1.0) -> tuple[Image.Image, np.ndarray, np.ndarray]:
    """Render one planned image (see :func:`render`)."""
    person = (sample_distractor(seed, spec.index) if spec.pid == 0
              else wear_outfit(sample_person(seed, spec.pid), seed, spec.pid, spec.outfit))
    camera = sample_camera(seed, spec.cam, num_cameras, pose_band)
    rng = _rng(seed, _IMAGE, spec.pid, spec.cam, spec.index)
    return render(person, camera, sample_pose(camera, rng), rng, seed, spec.cam, height, width)


# ----------------------------------------------------------------------------- dataset files


def synthetic_params(num_ids: int = 48, num_cameras: int = 4, seed: int = 0, height: int = 128, width: int = 64,
                     images_per_id_per_camera: tuple[int, int] = (4, 8), query_fraction: float = 1.0,
                     num_distractors: int | None = None, pose_band: float = 1.0, clothes: int = 1) -> dict:
    """Validated generation parameters as stored in ``synthetic.json`` (distractors default num_ids//4;
    ``pose_band``: see :func:`sample_camera`; ``clothes``: outfits per identity, stored only when >= 2 so
    that datasets generated before the option still match)."""
    lo, hi = (int(v) for v in images_per_id_per_camera)
    checks = (
        (2 <= num_cameras <= MAX_CAMERAS, f"num_cameras must be in 2..{MAX_CAMERAS} (synthetic names hold one "
                                          f"camera digit), got {num_cameras}"),
        (4 <= num_ids <= 9999, f"num_ids must be in 4..9999, got {num_ids}"),
        (seed >= 0, f"seed must be >= 0, got {seed}"),
        (height >= 32 and width >= 16, f"image size must be at least 32x16, got {height}x{width}"),
        (2 <= lo <= hi <= 99, f"images_per_id_per_camera must satisfy 2 <= lo <= hi <= 99, got {(lo, hi)}"),
        (0 < query_fraction <= 1, f"query_fraction must be in (0, 1], got {query_fraction}"),
        (num_distractors is None or num_distractors >= 0, f"num_distractors must be >= 0, got {num_distractors}"),
        (0 < pose_band <= 30, f"pose_band must be in (0, 30], got {pose_band}"),
        (1 <= clothes <= num_cameras, f"clothes must be in 1..num_cameras ({num_cameras}): one outfit per camera, "
                                      f"got {clothes}"),
    )
    for ok, message in checks:
        if not ok:
            raise ValueError(f"synthetic dataset: {message}")
    return {
        "version": GENERATOR_VERSION, "num_ids": int(num_ids), "num_cameras": int(num_cameras), "seed": int(seed),
        "height": int(height), "width": int(width), "images_per_id_per_camera": [lo, hi],
        "query_fraction": float(query_fraction),
        "num_distractors": int(num_ids // 4 if num_distractors is None else num_distractors),
        "pose_band": float(pose_band), **({"clothes": int(clothes)} if clothes > 1 else {}),
    }


def generate_synthetic(out_dir: str | Path, num_ids: int = 48, num_cameras: int = 4, seed: int = 0,
                       height: int = 128, width: int = 64, images_per_id_per_camera: tuple[int, int] = (4, 8),
                       query_fraction: float = 1.0, num_distractors: int | None = None, progress: bool = True,
                       overwrite: bool = False, pose_band: float = 1.0, clothes: int = 1) -> Path:
    """Write a Market-layout dataset (LTCC layout with ``clothes`` >= 2 outfits per identity) with
    ``poses.npz`` and ``synthetic.json`` to ``out_dir``; return it.

    Images are generated in a temporary sibling folder that is renamed into place at the end, so an
    interrupted run never leaves a dataset that looks complete.  An existing ``out_dir`` is a
    ``FileExistsError`` unless ``overwrite``.
    """
    params = synthetic_params(num_ids, num_cameras, seed, height, width, images_per_id_per_camera,
                              query_fraction, num_distractors, pose_band, clothes)
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"synthetic dataset folder already exists: {out_dir}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        counts = _write_images(tmp, params, progress)
        (tmp / "synthetic.json").write_text(json.dumps({"params": params, "counts": counts}, indent=1))
        _move_into_place(tmp, out_dir, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _write_images(root: Path, params: dict, progress: bool) -> dict:
    """Render every planned image into ``root`` and save ``poses.npz``; returns image counts."""
    specs = plan(params["num_ids"], params["num_cameras"], params["seed"],
                 tuple(params["images_per_id_per_camera"]), params["query_fraction"], params["num_distractors"],
                 params.get("clothes", 1))
    folders = split_folders(params.get("clothes", 1))
    for folder in folders:
        (root / folder).mkdir()
    keypoints = np.zeros((len(specs), NUM_KEYPOINTS, 2), np.float32)
    scores = np.zeros((len(specs), NUM_KEYPOINTS), np.float32)
    for i, spec in enumerate(_progress(specs, progress)):
        image, keypoints[i], scores[i] = render_spec(spec, params["seed"], params["num_cameras"],
                                                     params["height"], params["width"], params["pose_band"])
        quality = sample_camera(params["seed"], spec.cam, params["num_cameras"], params["pose_band"]).jpeg_quality
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
        (root / spec.relpath).write_bytes(buffer.getvalue())
    save_pose_file(root / "poses.npz", PoseTable(np.array([s.relpath for s in specs]), keypoints, scores))
    return {folder: sum(s.folder == folder for s in specs) for folder in folders}


def _progress(items: list, enabled: bool):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc="synthetic images", unit="img")


def _move_into_place(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename ``tmp`` to ``out_dir``; an existing ``out_dir`` is moved aside first when ``overwrite``."""
    old = None
    if out_dir.exists() and overwrite:
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        out_dir.rename(old)
    try:
        tmp.rename(out_dir)
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def synthetic_matches(out_dir: str | Path, **params) -> bool:
    """True when ``out_dir`` holds a complete dataset generated with these parameters
    (keyword arguments of :func:`synthetic_params`)."""
    out_dir = Path(out_dir)
    meta = out_dir / "synthetic.json"
    if not meta.is_file() or not (out_dir / "poses.npz").is_file():
        return False
    try:
        stored = json.loads(meta.read_text()).get("params")
    except (json.JSONDecodeError, AttributeError):
        return False
    return stored == synthetic_params(**params)


def synthetic_dir_name(**params) -> str:
    """Cache folder name: the main parameters, plus a hash when other parameters are not defaults."""
    full = synthetic_params(**params)
    name = "synthetic-{num_ids}ids-{num_cameras}cams-seed{seed}-{height}x{width}".format(**full)
    main = {k: full[k] for k in ("num_ids", "num_cameras", "seed", "height", "width")}
    if full != synthetic_params(**main):
        name += "-" + hashlib.sha1(json.dumps(full, sort_keys=True).encode()).hexdigest()[:8]
    return name


def ensure_synthetic(cache_dir: str | Path, progress: bool = True, **params) -> Path:
    """Dataset folder under ``cache_dir`` for these parameters, generated when missing or stale."""
    out_dir = Path(cache_dir) / synthetic_dir_name(**params)
    if synthetic_matches(out_dir, **params):
        return out_dir
    try:
        generate_synthetic(out_dir, progress=progress, overwrite=out_dir.exists(), **params)
    except OSError:
        if not synthetic_matches(out_dir, **params):  # not a concurrent writer finishing first
            raise
    return out_dir
