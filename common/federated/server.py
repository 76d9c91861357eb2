"""The ServerApp's work: rounds of federated training with evaluation, checkpoints and resume.

Per round: sample cameras → send the global shared weights and the round config (server-round, lr,
run-tag) → average the replies (``CameraFedAvg``) → combine the method's declared uploads, if any, into what
goes to every camera next round (``Method.combine_uploads``; not checkpointed) → append ``rounds.jsonl``
→ every ``eval-every`` rounds and at the last one evaluate the global model on the test split
(``metrics.jsonl``, plot) → checkpoint ``{"round", "model", "config", "method", "run-tag"}`` atomically.
A round that averaged nothing because the clients' errors recur every round stops the run (``failure.json``,
``FederationFailed``).
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from common.config import Config, ConfigError
from common.data.loading import check_dataset
from common.data.records import ReIDDataset
from common.engine import (
    append_jsonl,
    atomic_save,
    evaluate_model,
    learning_rate,
    lr_schedule_lines,
    resolve_device,
    write_config_snapshot,
)
from common.federated.arrays import StateDict, arrays_to_state, conformity_error, signature, state_to_arrays
from common.federated.client import ARRAYS, DOWNLOAD, METRICS, UPLOAD
from common.federated.data import load_node_dataset, with_absolute_paths
from common.federated.history import plot_metrics
from common.federated.strategy import CameraFedAvg, Screening
from common.methods import Method, get_method
from common.pipeline import check_post_inputs
from common.progress import StepProgress
from common.rundir import (
    CHECKPOINT,
    METRICS_FILE,
    PLOT_FILE,
    ROUNDS_FILE,
    check_run_folder,
    keep_records_up_to,
    replace_old_run,
)

LOG = logging.getLogger("flwr.camfed")
FAILURE_FILE = "failure.json"  # written when the run stops because no camera can train


class GlobalEvaluator:
    """Evaluates shared weights on the test split (dataset loaded on first use)."""

    def __init__(self, method: Method, config: Config):
        self.method, self.config = method, config
        self.device = resolve_device(config.device)
        self._dataset: ReIDDataset | None = None

    def __call__(self, shared: StateDict) -> dict[str, float]:
        if self._dataset is None:
            self._dataset = load_node_dataset(self.config)
        model = self.method.global_model(self.config, shared).to(self.device)
        return evaluate_model(model, self._dataset, self.config, self.device)

    def post_process(self, shared: StateDict, output_dir: Path) -> list[dict]:
        """The ``post`` pipeline (flip, NFC, re-ranking, ...) on the final global model; report in ``output_dir``."""
        from common.pipeline import run_pipeline

        if self._dataset is None:
            self._dataset = load_node_dataset(self.config)
        model = self.method.global_model(self.config, shared).to(self.device)
        return run_pipeline(model, self._dataset, self.config, self.config.post_steps, self.device, output_dir)


def run_federation(grid: Grid, config: Config) -> list[dict]:
    """Train for ``num-server-rounds`` (continuing from the checkpoint when ``resume``); returns the
    evaluation records written by this call.  A round waits ``round-timeout`` seconds at most for replies.

    Raises ``FederationFailed`` (after writing ``failure.json`` with the clients' errors) after the first
    round that averaged nothing because of failures that recur every round (``CameraFedAvg.cannot_train``).
    """
    config = with_absolute_paths(config)
    method = get_method(config.method)
    out = Path(config.output_dir)
    checkpoint = check_run_folder(config)
    check_dataset(load_node_dataset(config), training=False, protocol=config.eval_protocol)
    check_post_inputs(config)
    shared, start, run_tag = _starting_point(checkpoint, config, method, out)
    (out / FAILURE_FILE).unlink(missing_ok=True)
    write_config_snapshot(config, out)
    for line in lr_schedule_lines(config, config.num_server_rounds, "round"):
        LOG.info("camfed: %s", line)
    if config.fault_injection_scale:
        LOG.warning("camfed: fault-injection-scale = %g: FAULT INJECTION (benchmarks only), the camera of partition 0 "
                    "replies its shared weights × %g every round", config.fault_injection_scale,
                    config.fault_injection_scale)
    if start >= config.num_server_rounds and not config.post_steps:
        LOG.info("camfed: %s holds all %d rounds, evaluated; nothing to do (raise 'num-server-rounds' to train on)",
                 out, config.num_server_rounds)
    progress = StepProgress("round", config.num_server_rounds, start=start)
    strategy = CameraFedAvg(config, shared)
    evaluate = GlobalEvaluator(method, config)
    arrays, evaluations, download = state_to_arrays(shared), [], {}
    for server_round in range(start + 1, config.num_server_rounds + 1):
        arrays, record, screening = _train_round(grid, strategy, arrays, server_round, config, run_tag, download)
        download, combined = method.combine_uploads(config, server_round, _uploads(screening))
        record.update(combined)
        append_jsonl(out / ROUNDS_FILE, record)
        if strategy.cannot_train(screening):
            raise record_failure(out / FAILURE_FILE, record, screening, config)
        LOG.info("camfed: %s", progress.line(server_round, {"loss": record.get("loss"), "clients": record["clients"],
                                                           "lr": record["lr"]}))
        shared = arrays_to_state(arrays)
        if server_round % config.eval_every == 0 or server_round == config.num_server_rounds:
            evaluation = {"round": server_round, **evaluate(shared),
                          "train_loss": record.get("loss"), "clients": record["clients"], "lr": record["lr"],
                          "aggregated": record["aggregated"]}
            append_jsonl(out / METRICS_FILE, evaluation)
            plot_metrics(out / METRICS_FILE, out / PLOT_FILE)
            evaluations.append(evaluation)
            LOG.info("camfed round %d: %s", server_round, json.dumps(evaluation))
        _save_checkpoint(out / CHECKPOINT, server_round, shared, config, method, run_tag)
    if config.post_steps:
        evaluate.post_process(arrays_to_state(arrays), out / "post")
    return evaluations


def _train_round(grid: Grid, strategy: CameraFedAvg, arrays: ArrayRecord, server_round: int, config: Config,
                 run_tag: str, download: StateDict) -> tuple[ArrayRecord, dict, Screening]:
    """One round of training: (new global arrays, the round's record for ``rounds.jsonl``, its screening).
    A method's ``download`` (from the previous round's uploads) goes to every camera with the weights."""
    began = time.monotonic()
    lr = learning_rate(server_round - 1, config)
    round_config = ConfigRecord({"lr": lr, "run-tag": run_tag})
    messages = strategy.train_messages(server_round, arrays, round_config, strategy.sample(grid, server_round))
    extra = state_to_arrays(download)
    if download:
        for message in messages:
            message.content[DOWNLOAD] = extra
    replies, missing = strategy.collect(grid, messages)
    screening = strategy.screen(server_round, replies, missing)
    new_arrays, metrics = strategy.average(server_round, screening.usable)
    record = {"round": server_round, "lr": lr, "sampled": len(messages), **dict(metrics),
              "failed": len(messages) - len(screening.usable), "aggregated": new_arrays is not None,
              "bytes_down_per_client": (messages[0].content[ARRAYS].count_bytes() if messages else 0)
              + extra.count_bytes(),
              "bytes_up": sum(r.content[ARRAYS].count_bytes() for r in replies.values()
                              if r.has_content() and ARRAYS in r.content.array_records),
              "seconds": round(time.monotonic() - began, 3)}
    if screening.failures:
        record["failures"] = [f.as_dict() for f in screening.failures]
    return (new_arrays if new_arrays is not None else arrays), record, screening


def _uploads(screening: Screening) -> list[tuple[int, StateDict]]:
    """(camera id, declared upload arrays) of every usable reply that carries them."""
    return [(int(reply.content[METRICS]["camera"]), arrays_to_state(reply.content[UPLOAD]))
            for reply, _ in screening.usable if UPLOAD in reply.content.array_records]


class FederationFailed(RuntimeError):
    """The federation stopped because no round can train (details in ``failure.json``)."""


def record_failure(path: Path, record: dict, screening: Screening, config: Config) -> FederationFailed:
    """Write ``failure.json`` (the round, its counts and every camera's error) and return the exception to raise."""
    reasons = sorted({f"{f.kind}: {f.reason}" for f in screening.failures if f.recurs})
    message = (f"round {record['round']}: {len(screening.usable)} usable replies < min-train-clients "
               f"({config.min_train_clients}) and the clients' errors recur every round, so the run stops: "
               + " | ".join(reasons) + f" (details in {path})")
    failure = {"round": record["round"], "error": message, "sampled": record["sampled"],
               "clients": len(screening.usable), "min-train-clients": config.min_train_clients,
               "failures": [f.as_dict() for f in screening.failures]}
    path.write_text(json.dumps(failure, indent=1) + "\n")
    LOG.error("camfed: %s", message)
    return FederationFailed(message)


def _starting_point(state: dict | None, config: Config, method: Method, out: Path) -> tuple[StateDict, int, str]:
    """(shared weights, last completed round, run tag): from the checkpoint ``state`` when resuming, else fresh
    (a run that ``overwrite`` replaces is deleted first)."""
    if state is not None:
        problem = conformity_error(state["model"], signature(method.initial_shared_state(config)))
        if problem:
            raise ConfigError(f"{out / CHECKPOINT} does not fit the configured model ({problem}); "
                              "check 'backbone' and 'method'")
        start = int(state["round"])
        for name in (METRICS_FILE, ROUNDS_FILE):
            keep_records_up_to(out / name, "round", start)
        LOG.info("camfed: resuming after round %d from %s", start, out / CHECKPOINT)
        return state["model"], start, state["run-tag"]
    replace_old_run(config)
    shared, run_tag = method.initial_shared_state(config), secrets.token_hex(8)
    _save_checkpoint(out / CHECKPOINT, 0, shared, config, method, run_tag)
    return shared, 0, run_tag


def _save_checkpoint(path: Path, server_round: int, shared: StateDict, config: Config, method: Method,
                     run_tag: str) -> None:
    atomic_save({"round": server_round, "model": shared, "config": config.to_run_config(), "method": method.name,
                 "run-tag": run_tag}, path)

