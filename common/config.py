"""The one typed configuration of camfed.

Every default lives here.  The same kebab-case keys are accepted by Flower's
run config (``flwr run --run-config``) and by ``camfed ... --run-config``; an
unknown key or a value of the wrong type is a ``ConfigError`` naming the key.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib


class ConfigError(ValueError):
    """A bad configuration key or value (the message names the key)."""


CHOICES: dict[str, tuple[str, ...]] = {
    "dataset": ("synthetic", "market1501", "msmt17", "ltcc", "prcc"),
    "eval_protocol": ("standard", "cloth-changing", "same-clothes"),  # docs/cloth-changing.md
    "backbone": ("resnet50", "resnet18", "efficientnet_lite0"),
    "neck_feat": ("before", "after"),
    "optimizer": ("adam", "sgd"),
    "distance": ("cosine", "euclidean"),
    "method": ("fedavg", "fedprox", "moon", "pem", "calr", "fire2"),
    "pem_variant": ("baseline", "pkd", "scm", "pkd+scm", "full"),
    "pem_partner": ("random", "hard"),
    "calr_refine_schedule": ("cosine", "constant"),
    "transport_dtype": ("float32", "float16", "bfloat16"),
    "aggregation": ("mean", "median", "trimmed-mean"),
    "fire2_pooling": ("avg", "max+avg"),
    "fire2_epsilon_spread": ("others", "all"),
}

# post-processing steps, applied in the order the user gives (common/postprocess.py)
POST_STEPS = ("flip", "nfc", "ipg", "rerank")


@dataclass
class Config:
    """All settings; field ``foo_bar`` is the run-config key ``foo-bar``.

    The defaults are the CPU demo (4 synthetic cameras, ImageNet EfficientNet-Lite0 at 128x64, 5 rounds of
    3 local epochs); ``configs/*.toml`` hold the paper's settings.  pyproject.toml's
    ``[tool.flwr.app.config]`` is generated from these defaults (``python -m common.app_config``).
    """

    # data
    dataset: str = "synthetic"
    data_dir: str = ""  # empty + synthetic: generated and cached under cache_dir
    cache_dir: str = ".cache/camfed"
    synth_ids: int = 48
    synth_cameras: int = 4
    synth_seed: int = 0
    synth_pose_band: float = 1.0  # widens every synthetic camera's pose band (viewpoint and gait spread)
    synth_clothes: int = 1  # outfits per synthetic identity; >= 2: one per camera, LTCC layout with clothes ids
    pose_file: str = ""  # pose interchange .npz (common/data/pose.py); empty = <data_dir>/poses.npz if present
    height: int = 128
    width: int = 64
    num_instances: int = 4  # K of the P×K sampler
    batch_size: int = 32  # P×K
    num_workers: int = 0
    flip_prob: float = 0.5
    pad: int = 10
    random_erasing: float = 0.5
    # model
    backbone: str = "efficientnet_lite0"
    pretrained: str = "imagenet"  # none | imagenet | path to a state dict (Lite0's ImageNet weights load offline)
    last_stride: int = 1
    neck_feat: str = "after"  # test feature before or after the BNNeck's BN
    freeze_stages: int = 0  # first backbone stages frozen (not trained, not sent); needs pretrained weights
    cache_frozen: bool = False  # frozen stages run once per image (and its mirror); needs pad=0, random-erasing=0
    # optimisation (local training of every method, centralized training)
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 5e-4
    momentum: float = 0.9
    warmup_epochs: int = 0
    lr_steps: str = ""  # epochs (centralized) or rounds (federated) at which lr *= lr_gamma
    lr_gamma: float = 0.1
    epochs: int = 120
    label_smoothing: float = 0.1
    triplet_margin: float = 0.3
    triplet_soft_margin: bool = False
    amp: bool = True  # mixed precision, CUDA only
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0
    # evaluation
    eval_every: int = 1  # epochs (centralized) or rounds (federated)
    flip_test: bool = False
    distance: str = "cosine"
    eval_protocol: str = "standard"  # standard | cloth-changing | same-clothes (needs clothes ids: ltcc, prcc, ...)
    post: str = ""  # post-processing steps in order, e.g. "flip,nfc,rerank" (common/pipeline.py)
    nfc_k1: int = 2
    nfc_k2: int = 2
    ipg_features: str = ""  # .npz/.pt with `files` (generated-image names) and `features` for the 'ipg' step
    ipg_eta: float = 2.0
    rerank_k1: int = 20
    rerank_k2: int = 6
    rerank_lambda: float = 0.3
    # output
    output_dir: str = "outputs/flwr-run"
    resume: bool = False
    overwrite: bool = False  # replace a run already in output-dir (common/rundir.py)
    # federation
    method: str = "fedavg"
    num_server_rounds: int = 5
    local_epochs: int = 3
    fraction_train: float = 1.0
    min_train_clients: int = 2
    min_available_clients: int = 2
    round_timeout: float = 3600.0  # seconds a round waits for replies (late ones are discarded); 0 = no limit
    transport_dtype: str = "float32"  # float16 | bfloat16: shared weights travel in 16 bits (half the bytes)
    aggregation: str = "mean"  # mean (weighted by images) | median | trimmed-mean (common/federated/aggregation.py)
    trim_fraction: float = 0.25  # trimmed-mean: share of cameras dropped at each end per coordinate, in [0, 0.5)
    dp_clip_norm: float = 0.0  # > 0: each camera clips its update's L2 norm to this (common/federated/privacy.py)
    dp_noise_multiplier: float = 0.0  # σ: each camera adds N(0, (σ·dp-clip-norm)²) to every coordinate of its update
    # each camera reports its update's L2 norm before clipping (metric update-norm; rounds.jsonl: median, max, share
    # clipped); with dp-clip-norm that scalar is sent without noise, outside the DP guarantee (docs/federation.md)
    report_update_norm: bool = True
    prox_mu: float = 0.01
    moon_mu: float = 1.0  # weight of MOON's model-contrastive loss
    moon_temperature: float = 0.5
    state_dir: str = ""  # client private state; empty = <output_dir>/client-state
    # FAULT INJECTION, for benchmarks only (benchmarks/bench_robust.py): != 0 makes the camera of partition 0 reply
    # its shared weights × this every round (a camera gone wrong); 0 = off.  Never set it in a real federation
    fault_injection_scale: float = 0.0
    # PEM (method = "pem")
    pem_variant: str = "full"
    pem_mask: bool = True
    pem_pkd_centre: bool = False  # PKD on batch-centred F⁺ (a remedy; the paper's form is False)
    pem_partner: str = "random"
    pem_reduction: int = 16
    pem_expert_epochs: int = 1
    pem_epochs: int = 1  # 0: PEM is never trained (a control: stage 3 swaps with the initial attention)
    pem_lr: float = 1e-3
    pem_pose_weight: float = 1.0
    pem_cycle_weight: float = 1.0
    pem_min_keypoint_score: float = 0.3
    pem_min_usable_poses: float = 0.5  # least share of a camera's images with a usable pose
    # CALR (method = "calr", unsupervised: identity labels are never read in training; common/calr.py)
    calr_intra_epochs: int = 25  # intra-camera stage epochs per camera (centralized)
    calr_intra_k1: int = 15  # Jaccard distance of the intra-camera clustering
    calr_intra_k2: int = 4
    calr_intra_eps: float = 0.6  # DBSCAN radius on the Jaccard distance
    calr_min_samples: int = 4  # DBSCAN core-point neighbourhood size (itself included)
    calr_knn: int = 15  # global clustering: kNN graph (the point itself counted) for Infomap
    calr_max_distance: float = 0.5  # kNN-graph edges need cosine distance <= this
    calr_max_outlier_size: int = 4  # global clusters of <= this many images are outliers
    calr_temperature: float = 0.05  # cluster memory
    calr_memory_momentum: float = 0.1
    calr_refine: bool = True  # pivot-based refinement of global clusters by local ones
    calr_refine_schedule: str = "cosine"  # drop probability per epoch: cosine (self-paced) | constant (1)
    calr_align_epochs: int = 3  # camera alignment (gradient reversal) in the first epochs; 0 = off
    calr_align_alpha: float = 1.0
    calr_align_hidden: int = 100
    calr_gem_p: float = 3.0  # initial GeM exponent (learned)
    # FIRe² (method = "fire2"; common/fire2.py, docs/fire2.md): published values
    # FFM, FAR and the triplet act from this epoch (centralized) or round (federated), 0-based
    fire2_start_epoch: int = 25
    fire2_ffm: bool = True  # attribute-aware classification loss on fine-grained ids (off: FAR alone)
    fire2_far: bool = True  # fine-grained attribute recomposition (off: FFM alone)
    fire2_far_with_pem: bool = False  # method = "pem": FAR's recomposed positives in stage 3 besides the pose swaps
    fire2_k1: int = 20  # Jaccard distance of the per-identity clustering
    fire2_k2: int = 6
    fire2_eps: float = 0.4  # DBSCAN radius on the Jaccard distance
    fire2_min_samples: int = 1  # DBSCAN core-point neighbourhood size (itself included)
    fire2_scale: float = 16.0  # cosine classifier scale over fine-grained ids
    fire2_epsilon: float = 0.1  # attribute-aware soft target: share spread over the identity's fine ids
    fire2_epsilon_spread: str = "others"  # ε over the identity's other fine ids or all, own included (authors' code)
    fire2_parts: int = 2  # FAR: horizontal parts P of the feature map
    fire2_recompositions: int = 1  # FAR: recomposed copies K of each image
    fire2_far_weight: float = 0.3  # FAR's label-smoothed CE weight
    fire2_pooling: str = "max+avg"  # pooled feature of FIRe²'s model: max and average concatenated, or average
    # federated CALR: cameras upload their L2-normalised local cluster centroids (a privacy cost, docs/calr.md) and
    # the server sends back cross-camera clusters of them; off = only the shared weights leave a camera
    calr_share_centroids: bool = False

    # ------------------------------------------------------------------ parsing
    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], base: "Config | None" = None) -> "Config":
        """Build a config from kebab- or snake-case keys over ``base`` (or defaults)."""
        known = {f.name: f for f in fields(cls)}
        updates: dict[str, Any] = {}
        for key, value in values.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ConfigError(f"unknown config key '{key}'")
            updates[name] = _coerce(key, value, known[name].type)
        config = dataclasses.replace(base or cls(), **updates)
        config.validate()
        return config

    def validate(self) -> None:
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"config key '{name.replace('_', '-')}' = {getattr(self, name)!r}; expected one of {allowed}"
                )
        positive = ("height", "width", "num_instances", "batch_size", "epochs", "num_server_rounds",
                    "local_epochs", "eval_every", "synth_ids", "synth_cameras", "pem_reduction")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"config key '{name.replace('_', '-')}' must be > 0, got {getattr(self, name)}")
        if self.batch_size % self.num_instances:
            raise ConfigError(
                f"config key 'batch-size' ({self.batch_size}) must be a multiple of "
                f"'num-instances' ({self.num_instances})"
            )
        if not 0.0 < self.synth_pose_band <= 30.0:
            raise ConfigError(f"config key 'synth-pose-band' must be in (0, 30], got {self.synth_pose_band}")
        if not 1 <= self.synth_clothes <= self.synth_cameras:
            raise ConfigError(f"config key 'synth-clothes' must be in 1..synth-cameras ({self.synth_cameras}): an "
                              f"identity wears one outfit per camera, got {self.synth_clothes}")
        for name in ("freeze_stages", "pem_epochs", "pem_expert_epochs"):
            if getattr(self, name) < 0:
                raise ConfigError(f"config key '{name.replace('_', '-')}' must be >= 0, got {getattr(self, name)}")
        if self.freeze_stages and self.pretrained in ("", "none"):
            raise ConfigError("config key 'freeze-stages' > 0 needs pretrained weights ('pretrained'): "
                              "frozen random layers would differ between cameras and learn nothing")
        if self.cache_frozen and (not self.freeze_stages or self.pad or self.random_erasing or self.flip_test):
            raise ConfigError("config key 'cache-frozen' = true needs 'freeze-stages' > 0 and augmentation that the "
                              "cache can hold: 'pad' = 0, 'random-erasing' = 0, 'flip-test' = false (got "
                              f"{self.freeze_stages}, {self.pad}, {self.random_erasing}, {self.flip_test})")
        if not 0.0 < self.fraction_train <= 1.0:
            raise ConfigError(f"config key 'fraction-train' must be in (0, 1], got {self.fraction_train}")
        if not 0.0 <= self.trim_fraction < 0.5:
            raise ConfigError(f"config key 'trim-fraction' must be in [0, 0.5), got {self.trim_fraction}")
        if not math.isfinite(self.fault_injection_scale):
            raise ConfigError(f"config key 'fault-injection-scale' must be finite, got {self.fault_injection_scale}")
        noise_without_clip = self.dp_noise_multiplier and not self.dp_clip_norm
        if self.dp_clip_norm < 0 or self.dp_noise_multiplier < 0 or noise_without_clip:
            raise ConfigError("config keys 'dp-clip-norm' and 'dp-noise-multiplier' must be >= 0, and noise needs a "
                              f"clip norm > 0 (got {self.dp_clip_norm}, {self.dp_noise_multiplier})")
        for name in ("flip_prob", "random_erasing", "label_smoothing"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"config key '{name.replace('_', '-')}' must be in [0, 1]")
        self._check_ranges()
        self._check_calr()
        self._check_fire2()
        _ = self.lr_step_list, self.post_steps  # parse or raise

    def _check_ranges(self) -> None:
        """Bounds, patterns and combinations of keys that ``validate``'s type and choice checks do not cover."""
        for name in ("lr", "lr_gamma", "nfc_k1", "nfc_k2", "rerank_k1", "rerank_k2", "pem_lr"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"config key '{name.replace('_', '-')}' must be > 0, got {getattr(self, name)}")
        for name in ("pad", "num_workers", "warmup_epochs", "weight_decay", "momentum", "prox_mu", "ipg_eta",
                     "rerank_lambda", "pem_pose_weight", "pem_cycle_weight", "round_timeout"):
            if getattr(self, name) < 0:
                raise ConfigError(f"config key '{name.replace('_', '-')}' must be >= 0, got {getattr(self, name)}")
        if self.num_instances < 2:
            raise ConfigError(f"config key 'num-instances' must be >= 2 (the triplet loss needs two images of an "
                              f"identity per batch), got {self.num_instances}")
        if self.last_stride not in (1, 2):
            raise ConfigError(f"config key 'last-stride' must be 1 or 2, got {self.last_stride}")
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise ConfigError(f"config key 'device' = {self.device!r}; expected auto, cpu, mps, cuda or cuda:N")
        if not 0.0 <= self.pem_min_usable_poses <= 1.0:
            raise ConfigError(f"config key 'pem-min-usable-poses' must be in [0, 1], got {self.pem_min_usable_poses}")
        if self.resume and self.overwrite:
            raise ConfigError("config keys 'resume' and 'overwrite' exclude each other: continue the run in "
                              "output-dir or replace it, not both")
        if "ipg" in self.post_steps and not self.ipg_features:
            raise ConfigError("config key 'ipg-features': the 'ipg' post-processing step needs a file of "
                              "generated-image features")

    def _check_calr(self) -> None:
        """Bounds of the CALR keys (names and ranges in the messages)."""
        for name in ("calr_intra_k1", "calr_intra_k2", "calr_min_samples", "calr_align_hidden", "calr_temperature",
                     "calr_gem_p"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"config key '{name.replace('_', '-')}' must be > 0, got {getattr(self, name)}")
        for name in ("calr_intra_epochs", "calr_max_outlier_size", "calr_align_epochs", "calr_align_alpha"):
            if getattr(self, name) < 0:
                raise ConfigError(f"config key '{name.replace('_', '-')}' must be >= 0, got {getattr(self, name)}")
        if self.calr_knn < 2:
            raise ConfigError("config key 'calr-knn' must be >= 2 (the point itself and a neighbour), "
                              f"got {self.calr_knn}")
        ranges = {"calr_intra_eps": ("(0, 1): a Jaccard distance", 0.0 < self.calr_intra_eps < 1.0),
                  "calr_max_distance": ("(0, 1]: a cosine distance whose similarity 1 − d weights the edge",
                                        0.0 < self.calr_max_distance <= 1.0),
                  "calr_memory_momentum": ("[0, 1)", 0.0 <= self.calr_memory_momentum < 1.0)}
        for name, (text, ok) in ranges.items():
            if not ok:
                raise ConfigError(f"config key '{name.replace('_', '-')}' must be in {text}, got {getattr(self, name)}")

    def _check_fire2(self) -> None:
        """Bounds of the FIRe² keys (names and ranges in the messages)."""
        for name in ("fire2_k1", "fire2_k2", "fire2_min_samples", "fire2_scale", "fire2_parts",
                     "fire2_recompositions"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"config key '{name.replace('_', '-')}' must be > 0, got {getattr(self, name)}")
        for name in ("fire2_start_epoch", "fire2_far_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"config key '{name.replace('_', '-')}' must be >= 0, got {getattr(self, name)}")
        ranges = {"fire2_eps": ("(0, 1): a Jaccard distance", 0.0 < self.fire2_eps < 1.0),
                  "fire2_epsilon": ("[0, 1)", 0.0 <= self.fire2_epsilon < 1.0)}
        for name, (text, ok) in ranges.items():
            if not ok:
                raise ConfigError(f"config key '{name.replace('_', '-')}' must be in {text}, got {getattr(self, name)}")
        if self.fire2_far_with_pem and self.method != "pem":
            raise ConfigError(f"config key 'fire2-far-with-pem' = true needs method = 'pem' (got {self.method!r}); "
                              "method 'fire2' runs FAR with 'fire2-far'")

    # ------------------------------------------------------------ derived views
    @property
    def lr_step_list(self) -> list[int]:
        try:
            return [int(s) for s in self.lr_steps.replace(" ", "").split(",") if s]
        except ValueError:
            raise ConfigError(
                f"config key 'lr-steps' must be comma-separated integers, got {self.lr_steps!r}") from None

    @property
    def post_steps(self) -> list[str]:
        steps = [s for s in self.post.replace(" ", "").split(",") if s]
        unknown = [s for s in steps if s not in POST_STEPS]
        if unknown:
            raise ConfigError(f"config key 'post': unknown step(s) {unknown}; expected some of {POST_STEPS}")
        return steps

    def to_run_config(self) -> dict[str, Any]:
        """Kebab-case mapping (the form written to config snapshots)."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}


def _coerce(key: str, value: Any, type_name: Any) -> Any:
    kind = {"str": str, "int": int, "float": float, "bool": bool}[str(type_name)]
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(value, str):
        return value
    raise ConfigError(f"config key '{key}' expects {kind.__name__}, got {value!r}")


def parse_run_config(text: str) -> dict[str, Any]:
    """Parse ``--run-config``: a TOML file path, or ``"k=v k=v"`` like ``flwr run``.

    Values are TOML values (strings quoted: ``dataset='market1501'``).
    """
    text = text.strip()
    if not text:
        return {}
    path = Path(os.path.expanduser(text))
    if text.endswith(".toml"):
        if not path.is_file():
            raise ConfigError(f"run config file not found: {path}")
        with path.open("rb") as fh:
            try:
                data = tomllib.load(fh)
            except tomllib.TOMLDecodeError as err:
                raise ConfigError(f"run config file {path} is not valid TOML: {err}") from None
        return _flatten(data)
    values: dict[str, Any] = {}
    for pair in _split_pairs(text):
        try:
            values.update(_flatten(tomllib.loads(pair)))
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(_pair_error(pair, err)) from None
    return values


def _pair_error(pair: str, err: Exception) -> str:
    """One line for a ``key=value`` pair that is not TOML, naming the key; unquoted text gets a quoting hint."""
    key, equals, value = pair.partition("=")
    if not equals:
        return f"cannot parse run config entry {pair!r}: expected key=value"
    if value and value[0] not in "'\"" and not value[0].isdigit() and value not in ("true", "false"):
        return f"config key '{key.strip()}': cannot parse {value!r}; quote strings: {key.strip()}='{value}'"
    return f"config key '{key.strip()}': cannot parse {value!r} ({err})"


def write_run_config(path: Path, values: Mapping[str, Any]) -> Path:
    """Write a flat run-config mapping as a TOML file (for ``--run-config <file>``); returns ``path``."""
    path.write_text("".join(f"{key} = {toml_value(value)}\n" for key, value in values.items()))
    return path


def toml_value(value: str | int | float | bool) -> str:
    """A config value as TOML text."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value) if isinstance(value, str) else repr(value)


def _split_pairs(text: str) -> list[str]:
    """Split ``a=1 b='x y'`` on whitespace outside quotes."""
    pairs, current, quote = [], "", ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char.isspace():
            if current:
                pairs.append(current)
            current = ""
            continue
        current += char
    if current:
        pairs.append(current)
    return pairs


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, full + "."))
        else:
            flat[full] = value
    return flat


def load_config(run_config: str | Mapping[str, Any] = "", **overrides: Any) -> Config:
    """Config from a ``--run-config`` string/path or a Flower run-config mapping, plus overrides."""
    values = parse_run_config(run_config) if isinstance(run_config, str) else dict(run_config)
    values.update(overrides)
    return Config.from_mapping(values)
