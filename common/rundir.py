"""A run's output folder: one rule for every command that writes one, its history files and its checkpoint.

A folder *holds a run* when it has any of ``RUN_FILES``.  Every command that writes a run
(``camfed train-centralized``, the federation's ServerApp — and ``camfed federate`` before it starts
anything) calls ``check_run_folder`` first, before any expensive work, and ``replace_old_run`` once every
other check passed, right before it writes:

* a folder that holds a run is refused unless ``resume=true`` (continue it) or ``overwrite=true``
  (its run files are deleted first);
* ``resume=true`` needs the run's checkpoint, and the config must equal the one stored in it except
  for ``RESUMABLE_KEYS`` (more epochs / rounds, another device, ...); the message names the keys that differ.

``camfed evaluate`` writes a report folder under the same rule (``check_report_folder``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Mapping

from common.config import Config, ConfigError

CHECKPOINT, CONFIG_FILE = "checkpoint.pt", "config.json"
METRICS_FILE, ROUNDS_FILE, PLOT_FILE = "metrics.jsonl", "rounds.jsonl", "metrics.png"
RUN_FILES = (CHECKPOINT, METRICS_FILE, ROUNDS_FILE, CONFIG_FILE)
REPORT_FILES = ("evaluation.json", "evaluation.md", "cmc.png", "retrieval.png")
REPORT_FOLDERS = ("post", "evaluation")  # report folders a run's commands write inside the run folder

# keys a resumed run may change: how long it runs, where and how fast it runs, and the final post-processing
RESUMABLE_KEYS = frozenset({
    "resume", "overwrite", "epochs", "num-server-rounds", "eval-every", "device", "num-workers", "amp",
    "output-dir", "cache-dir", "state-dir", "min-train-clients", "min-available-clients", "round-timeout",
    "post", "nfc-k1", "nfc-k2", "ipg-features", "ipg-eta", "rerank-k1", "rerank-k2", "rerank-lambda",
})
PATH_KEYS = frozenset({"data-dir", "cache-dir", "pose-file", "ipg-features", "output-dir", "state-dir"})


# ------------------------------------------------------------------------------------------- folders


def check_writable_folder(folder: Path, setting: str = "config key 'output-dir'") -> None:
    """Raise a ``ConfigError`` naming ``setting`` when ``folder`` or one of its parents is not a folder."""
    for path in (folder, *folder.parents):
        if path.exists():
            if not path.is_dir():
                raise ConfigError(f"{setting}: {path} is a file, not a folder, so {folder} cannot be written")
            return


def run_files(folder: Path) -> list[str]:
    """The ``RUN_FILES`` present in ``folder``."""
    return [name for name in RUN_FILES if (folder / name).is_file()]


def check_run_folder(config: Config) -> dict | None:
    """Check ``output-dir`` against the run rule (module docstring) without changing anything.

    Returns the checkpoint (a dict) when ``resume`` is set, else None.
    """
    out = Path(config.output_dir)
    check_writable_folder(out)
    if config.resume:
        path = out / CHECKPOINT
        if not path.is_file():
            raise FileNotFoundError(f"resume = true but there is no checkpoint at {path} "
                                    "(start a new run without resume=true)")
        state = read_checkpoint(path)
        check_same_config(state, config, path)
        return state
    existing = run_files(out)
    if existing and not config.overwrite:
        raise ConfigError(
            f"config key 'output-dir': {out} already holds a run ({', '.join(existing)}); continue it with "
            "resume=true, or choose another output-dir, or replace it with overwrite=true")
    return None


def open_run(config: Config) -> dict | None:
    """``check_run_folder`` then ``replace_old_run``, for a command with no other checks; returns the checkpoint
    when resuming."""
    state = check_run_folder(config)
    replace_old_run(config)
    return state


def replace_old_run(config: Config) -> None:
    """With ``overwrite``, delete the run in ``output-dir`` (after ``check_run_folder`` and every other check,
    so a run that fails its checks destroys nothing)."""
    if config.overwrite:
        clear_run(Path(config.output_dir))


def clear_run(folder: Path) -> None:
    """Delete what a run wrote in ``folder``: its run files, plot and report folders (nothing else)."""
    for name in (*RUN_FILES, PLOT_FILE, CHECKPOINT + ".tmp"):
        (folder / name).unlink(missing_ok=True)
    for name in REPORT_FOLDERS:
        if (folder / name).is_dir():
            shutil.rmtree(folder / name)


def check_report_folder(folder: Path, overwrite: bool) -> None:
    """A report folder (``camfed evaluate --output``) must be writable and hold no report unless ``overwrite``."""
    check_writable_folder(folder, setting="--output")
    existing = [name for name in REPORT_FILES if (folder / name).is_file()]
    if existing and not overwrite:
        raise ConfigError(f"report folder {folder} already holds a report ({', '.join(existing)}); choose another "
                          "--output or replace it with overwrite=true")


# ------------------------------------------------------------------------------------- config checks


def stored_config(state: Mapping[str, Any], path: Path) -> Config:
    """The config stored in checkpoint ``state`` (read from ``path``); keys added since take their defaults."""
    values = state.get("config")
    if not isinstance(values, Mapping):
        raise ConfigError(f"checkpoint {path} stores no config, so camfed cannot tell what it was trained with")
    known = {key: value for key, value in values.items() if key.replace("-", "_") in Config.__dataclass_fields__}
    try:
        return Config.from_mapping({**known, "resume": False, "overwrite": False})
    except ConfigError as err:
        raise ConfigError(f"checkpoint {path} stores a config this camfed rejects: {err}") from None


def config_differences(before: Config, after: Config, keys: set[str] | None = None) -> list[str]:
    """``'key' old → new`` for each differing run-config key (``keys``: only these; else all but ``RESUMABLE_KEYS``)."""
    old, new = before.to_run_config(), after.to_run_config()
    names = keys if keys is not None else set(new) - RESUMABLE_KEYS
    return [f"'{key}' {old[key]!r} → {new[key]!r}" for key in new
            if key in names and _comparable(key, old[key]) != _comparable(key, new[key])]


def check_same_config(state: Mapping[str, Any], config: Config, path: Path) -> None:
    """``resume``: ``config`` must equal the one stored in the checkpoint except for ``RESUMABLE_KEYS``."""
    differences = config_differences(stored_config(state, path), config)
    if differences:
        raise ConfigError(
            f"resume = true but the config differs from the run in {path.parent}: {'; '.join(differences)}. "
            "Only how long and where it runs may change on resume; start a new run with another output-dir "
            "or overwrite=true")


def _comparable(key: str, value: Any) -> Any:
    if key in PATH_KEYS and value:
        return str(Path(value).expanduser().absolute())
    return value


# ------------------------------------------------------------------------------------------ checkpoints


def read_checkpoint(path: Path) -> dict:
    """A checkpoint file as a dict; a missing, unreadable or foreign file is an error naming it."""
    import torch

    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch.load fails with many types (pickle, zip, EOF, runtime) that all mean this
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path} is not a readable checkpoint ({reason})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} is not a camfed checkpoint (it holds a {type(state).__name__})")
    return state


def load_weights(model, weights: Mapping[str, Any], path: Path, ignore_prefixes: tuple[str, ...] = ()) -> None:
    """Load ``weights`` into ``model``; keys or shapes that do not fit are one ``ConfigError`` naming ``path``.

    Keys starting with one of ``ignore_prefixes`` are skipped on both sides (e.g. a classifier).
    """
    import torch

    expected = {name: tuple(value.shape) for name, value in model.state_dict().items()
                if not name.startswith(ignore_prefixes)}
    given = {name: value for name, value in weights.items() if not name.startswith(ignore_prefixes)}
    missing = [name for name in expected if name not in given]
    unexpected = [name for name in given if name not in expected]
    shapes = {name: tuple(torch.as_tensor(value).shape) for name, value in given.items()}
    resized = [f"{name} {shapes[name]} vs {shape}" for name, shape in expected.items()
               if name in shapes and shapes[name] != shape]
    if missing or unexpected or resized:
        details = "; ".join(part for part in (
            f"missing {missing[:3]}" if missing else "", f"unexpected {unexpected[:3]}" if unexpected else "",
            f"shape {resized[0]}" if resized else "") if part)
        raise ConfigError(f"checkpoint {path} does not fit the configured model ({details}); set 'backbone' "
                          "(and the other model keys) to what it was trained with")
    model.load_state_dict(given, strict=not ignore_prefixes)


# ------------------------------------------------------------------------------------ history files


def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSON-lines file (``[]`` if missing); a torn last line (crash mid-write) is dropped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


def keep_records_up_to(path: Path, key: str, last: int) -> None:
    """Rewrite ``path`` without records whose ``key`` (``round`` / ``epoch``) is after ``last`` (a resumed run
    redoes them)."""
    if not path.is_file():
        return
    kept = [record for record in read_jsonl(path) if record.get(key, 0) <= last]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(record) + "\n" for record in kept))
    tmp.replace(path)


def is_evaluation_step(step: int, last: int, every: int) -> bool:
    """Whether epoch / round ``step`` (1-based) is evaluated: every ``every`` steps and at the ``last``."""
    return step % every == 0 or step == last


def evaluation_missing(folder: Path, key: str, step: int, last: int, every: int) -> bool:
    """Whether ``step`` should have been evaluated but ``metrics.jsonl`` has no record of it (a crash during
    its evaluation: the checkpoint is written before evaluating)."""
    return (step > 0 and is_evaluation_step(step, last, every)
            and all(record.get(key) != step for record in read_jsonl(folder / METRICS_FILE)))
