"""One trial's training and validation. Knows nothing about Optuna: the caller gets each epoch's
metrics through `on_epoch` (where it may report, prune or stop by raising).

Batches arrive as uint8 lines and are augmented and scaled where the model runs (on the GPU when
training there: the data loader does no per-image work, so the GPU does not wait for it). AdamW
with linear warm-up then cosine decay per step, mixed precision on GPU (bf16 where supported, else
fp16 with a gradient scaler), gradient clipping, and per-epoch checkpoints: `best_model.pth` (the
weights of the epoch the trial value picks) and `last.pth` (the full state to resume: model,
optimiser, scheduler, scaler, epoch, RNG; tensors and plain values only, read back under
torch.load(weights_only=True), so a planted one runs nothing). The trial value (`trial_value.py`:
by default the best mean page mAP over 3 consecutive epochs) is also what each epoch reports and
what early stopping waits to improve.

On several devices (a `distributed.Dist` of K ranks) the model trains under
DistributedDataParallel, each rank on its share of the epoch's draws with the batch size per
device; rank 0 alone validates, writes the checkpoints and calls `on_epoch`, and what it decides
(go on, stop early, end the trial) every rank does at the same step.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader

from psearch.engine import atomic
from psearch.writer_id import losses, metrics, trial_value
from psearch.writer_id.augment import to_unit
from psearch.writer_id.dataset import ShardSampler, WriterBalancedSampler
from psearch.writer_id.distributed import Dist, single
from psearch.writer_id.model import (UnsafeCheckpoint, WriterNet, checkpoint_payload,
                                     load_torch, plain_values, save_torch)
from psearch.writer_id.names import METRIC_KEYS

logger = logging.getLogger(__name__)
LAST_KEYS = ("model", "optimizer", "scheduler", "scaler", "fit_state", "rng", "meta")
MIXUP_MIN_ALPHA = 0.05      # below this Beta(a, a) is almost always 0 or 1: treat as no mixup
PROGRESS_EVERY_S = 60.0     # log within an epoch at most this often


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The knobs of one trial's training (hyperparameters and fixed settings)."""

    epochs: int
    patience: int
    batch_size: int
    lr: float
    weight_decay: float
    loss: str = "ce"
    label_smoothing: float = 0.0
    focal_gamma: float = 2.0
    mixup_alpha: float = 0.0
    triplet_weight: float = 0.0
    triplet_margin: float = 0.2
    warmup_epochs: int = 0
    grad_clip: float = 1.0
    num_workers: int = 0
    seed: int = 42
    lines_per_writer: int = 300
    trial_value: str = trial_value.DEFAULT


def amp_settings(device: torch.device) -> tuple[bool, torch.dtype | None, bool]:
    """(autocast on, its dtype, needs a gradient scaler): bf16 where supported, else fp16."""
    if device.type != "cuda":
        return False, None, False
    if torch.cuda.is_bf16_supported():
        return True, torch.bfloat16, False
    return True, torch.float16, True


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0 at `total_steps` (pure)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters, with no weight decay on biases and norm weights (1-D tensors)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def make_loader(dataset, batch_size: int, num_workers: int, device: torch.device,
                sampler=None, drop_last: bool = False) -> DataLoader:
    """A DataLoader of uint8 lines (pinned on a GPU run: the copy to the GPU does not block)."""
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False,
                      num_workers=num_workers, pin_memory=device.type == "cuda",
                      drop_last=drop_last)


@torch.no_grad()
def embed(model: WriterNet, loader: DataLoader, device: torch.device
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Embeddings, logits, labels and dataset indices of every item of `loader` (eval mode)."""
    model.eval()
    amp_on, amp_dtype, _ = amp_settings(device)
    out: list[list[np.ndarray]] = [[], [], [], []]
    for x, y, idx in loader:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_on):
            emb, logits = model(to_unit(x.to(device, non_blocking=True)))
        for acc, t in zip(out, (emb.float(), logits.float(), y, idx)):
            acc.append(t.cpu().numpy())
    return tuple(np.concatenate(a) for a in out)  # type: ignore[return-value]


def evaluate(model: WriterNet, loader: DataLoader, page_ids: np.ndarray,
             device: torch.device, prefix: str = "val_",
             queries: dict | None = None) -> dict[str, float]:
    """Page-level retrieval and classification metrics over one split (`queries` receives the
    per-query figures, see metrics.evaluate_embeddings)."""
    emb, logits, labels, idx = embed(model, loader, device)
    found = metrics.evaluate_embeddings(emb, logits, labels, np.asarray(page_ids)[idx], queries)
    return {f"{prefix}{k}": float(v) for k, v in found.items()}


def is_better(score: float, tiebreak: float, best_score: float | None,
              best_tiebreak: float | None) -> bool:
    """A higher score wins; the tie-break (page mAP) decides equal scores (pure). NaN never wins."""
    if math.isnan(score):
        return False
    if best_score is None or math.isnan(best_score):
        return True
    tb = -math.inf if math.isnan(tiebreak) else tiebreak
    best_tb = -math.inf if best_tiebreak is None or math.isnan(best_tiebreak) else best_tiebreak
    return (score, tb) > (best_score, best_tb)


@dataclasses.dataclass
class FitState:
    """What changes from epoch to epoch; all of it goes into last.pth."""

    epoch: int = 0                       # epochs completed
    best: dict[str, float] | None = None  # the picked epoch's metrics and its "value"
    best_epoch: int = 0
    bad_epochs: int = 0                  # epochs since the score last improved
    best_score: float | None = None      # the best score of an epoch with a full window
    best_tiebreak: float | None = None   # its page mAP
    history: list[dict[str, float]] = dataclasses.field(default_factory=list)
    # Per-query page retrieval of every epoch, for the value's interval (plain lists: they go
    # into last.pth); the queries are the same every epoch, their writers are kept once.
    query_writers: list[int] = dataclasses.field(default_factory=list)
    query_top1: list[list[float]] = dataclasses.field(default_factory=list)
    query_ap: list[list[float]] = dataclasses.field(default_factory=list)


def read_last(path: Path, lazy: bool = False) -> dict[str, Any] | None:
    """A last.pth's contents, read under weights_only so that nothing in it runs; None, with a
    one-line warning naming the file and why, for one that cannot be loaded that way (a planted
    pickle, a truncated or corrupt file) or lacks a part: it is ignored and the trial starts
    from scratch, since a search must not stop on a file anyone in the group could have
    replaced. `lazy` maps the tensors instead of reading them (a cheap check before resuming)."""
    what_now = "it is ignored and the trial starts from scratch"
    try:
        # onto the CPU: RNG states must stay CPU tensors; weights and optimiser state move to
        # the device in load_state_dict
        ckpt = load_torch(path, what_now, "cpu", lazy=lazy)
    except UnsafeCheckpoint as exc:
        logger.warning("%s", exc)
        return None
    missing = [k for k in LAST_KEYS if k not in ckpt] if isinstance(ckpt, dict) else LAST_KEYS
    if missing:
        logger.warning("%s is not a resume checkpoint (it lacks %s): %s", path,
                       ", ".join(missing), what_now)
        return None
    return ckpt


def advance(definition: trial_value.Definition, st: "FitState", row: dict[str, Any]) -> bool:
    """Score a validated epoch (row["value"]), decide whether it is the picked one so far
    (row["is_best"], st.best, st.best_epoch) and count epochs without a better score for early
    stopping (st.bad_epochs) - streaming what `definition.choose` decides on the whole curve
    (pure: plain data). True when the epoch's weights become best_model.pth."""
    rows = [*st.history, row]
    scores = definition.per_epoch(np.array([r["val_page_top1"] for r in rows]),
                                  np.array([r["val_page_map"] for r in rows]))
    row["value"] = value = float(scores[-1])
    # Before the smoothing window is full an epoch is picked only provisionally (a trial that
    # ends then keeps its last epoch); from then on only a better score is picked.
    full = row["epoch"] >= definition.window
    improved = full and is_better(value, row["val_page_map"], st.best_score, st.best_tiebreak)
    if improved:
        st.best_score, st.best_tiebreak, st.bad_epochs = value, row["val_page_map"], 0
    elif full:
        st.bad_epochs += 1
    row["is_best"] = math.isfinite(value) and (improved or not full or definition.pick == "last")
    if row["is_best"]:
        st.best = {**{k: row[k] for k in METRIC_KEYS}, "value": value}
        st.best_epoch = row["epoch"]
    return row["is_best"]


class RankEnded(Exception):
    """Raised on ranks other than 0 when rank 0 ended the trial (pruned, stopped, failed): rank 0
    reports why; the others just leave."""


class Trainer:
    """Trains one model on one data bundle, writing its checkpoints, history and plot."""

    def __init__(self, model: WriterNet, data, tc: TrainConfig, device: torch.device,
                 out_dir: Path, checkpoint_meta: dict[str, Any],
                 stop_check: Callable[[], None] = lambda: None, dist: Dist | None = None):
        self.model, self.data, self.tc, self.device = model.to(device), data, tc, device
        self.out_dir, self.meta, self.stop_check = Path(out_dir), checkpoint_meta, stop_check
        self.dist = dist or single(device)
        self.net: torch.nn.Module = self.model
        if self.dist.distributed:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None)
        self.amp_on, self.amp_dtype, use_scaler = amp_settings(device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
        balanced = WriterBalancedSampler(data.train_labels, tc.lines_per_writer, tc.seed)
        self.sampler = (ShardSampler(balanced, self.dist.rank, self.dist.world_size)
                        if self.dist.distributed else balanced)
        self.train_loader = make_loader(data.train, tc.batch_size, tc.num_workers, device,
                                        sampler=self.sampler, drop_last=len(self.sampler) >
                                        tc.batch_size)
        self.val_loader = make_loader(data.val, tc.batch_size * 2, tc.num_workers, device)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, tc.weight_decay), lr=tc.lr)
        steps = max(1, len(self.train_loader))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, tc.warmup_epochs * steps, tc.epochs * steps))
        self.rng = np.random.default_rng(tc.seed)
        self.state = FitState()
        self.definition = trial_value.get(tc.trial_value)

    # -------------------------------------------------------------- checkpoints
    def save_last(self) -> None:
        """Everything needed to continue this trial after an interruption, in types that
        torch.load(weights_only=True) rebuilds: tensors, and dicts, lists, tuples, str, int
        (numpy's 128-bit PCG64 state too), float, bool, None. random.getstate() is such a tuple,
        so the files of earlier versions, which had this same layout, load as well."""
        save_torch({
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            # a numpy value in here would make the file unloadable: every resume would restart
            "fit_state": plain_values(dataclasses.asdict(self.state)),
            "rng": {"numpy": self.rng.bit_generator.state, "torch": torch.get_rng_state(),
                    "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
            "meta": plain_values(self.meta)}, self.out_dir / "last.pth")

    def load_last(self, path: Path) -> bool:
        """Continue from a last.pth written by `save_last` (possibly another trial's folder);
        False, with a warning, when it cannot be loaded safely (see `read_last`): the trial
        then starts from scratch."""
        ckpt = read_last(path)
        if ckpt is None:
            return False
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.state = FitState(**ckpt["fit_state"])
        self.rng.bit_generator.state = ckpt["rng"]["numpy"]
        torch.set_rng_state(ckpt["rng"]["torch"])
        random.setstate(ckpt["rng"]["python"])
        if ckpt["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        logger.info("Resumed from %s after epoch %d (best value so far %s)", path,
                    self.state.epoch, None if self.state.best is None
                    else f"{self.state.best.get('value', float('nan')):.4f}")
        return True

    def _save_best(self, row: dict[str, float]) -> None:
        payload = checkpoint_payload(self.model, self.data.writers,
                                     {**self.meta, "epoch": row["epoch"], "metrics": row})
        save_torch(payload, self.out_dir / "best_model.pth")

    # -------------------------------------------------------------- training
    def _step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One optimisation step; returns (total loss, class loss, triplet loss, correct)."""
        tc = self.tc
        y_a, y_b, lam = y, y, 1.0
        if tc.loss == "ce" and tc.mixup_alpha >= MIXUP_MIN_ALPHA:
            x, y_a, y_b, lam = losses.mixup(x, y, tc.mixup_alpha, self.rng)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_on):
            emb, logits = self.net(x)
        cls = lam * losses.classification_loss(logits, y_a, tc.loss, tc.label_smoothing,
                                               tc.focal_gamma)
        if lam < 1.0:
            cls = cls + (1 - lam) * losses.classification_loss(logits, y_b, tc.loss,
                                                               tc.label_smoothing)
        dominant = y_a if lam >= 0.5 else y_b
        trip = (losses.batch_hard_triplet_loss(emb, dominant, tc.triplet_margin)
                if tc.triplet_weight > 0 else cls.new_zeros(()))
        loss = cls + tc.triplet_weight * trip
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        correct = (logits.argmax(1) == dominant).sum()
        return loss.detach(), cls.detach(), trip.detach(), correct

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the writer-balanced sample; sums stay on the device (one sync/epoch)."""
        self.net.train()
        self.sampler.set_epoch(epoch)
        # augments on the device; each rank draws its own augmentation stream
        to_input = self.data.train.batch_transform(epoch, self.device, stream=self.dist.rank)
        sums = torch.zeros(5, device=self.device)
        seen, last_log, n_batches = 0, time.time(), len(self.train_loader)
        for b, (x, y, _) in enumerate(self.train_loader):
            self.stop_check()
            x = to_input(x.to(self.device, non_blocking=True))
            y = y.to(self.device, non_blocking=True)
            loss, cls, trip, correct = self._step(x, y)
            sums += torch.stack([loss * len(y), cls * len(y), trip * len(y), correct.float(),
                                 loss.new_tensor(float(len(y)))])
            seen += len(y)
            if time.time() - last_log > PROGRESS_EVERY_S:  # the .item() here is a sync point
                last_log = time.time()
                logger.info("  epoch %d: batch %d/%d, loss %.4f", epoch, b + 1, n_batches,
                            sums[0].item() / seen)
        loss_sum, cls_sum, trip_sum, correct_sum, seen_all = self.dist.sum_(sums).tolist()
        if not math.isfinite(loss_sum):
            raise FloatingPointError(f"training loss became {loss_sum} in epoch {epoch} "
                                     f"(lr {self.tc.lr:.2e}); this trial cannot continue")
        n = max(1.0, seen_all)
        return {"train_loss": loss_sum / n, "train_cls_loss": cls_sum / n,
                "train_triplet_loss": trip_sum / n, "train_acc": correct_sum / n}

    # -------------------------------------------------------------- the epoch loop
    def fit(self, on_epoch: Callable[[int, dict[str, float]], None],
            resume_from: Path | None = None) -> dict[str, Any]:
        """Train until `epochs`, early stopping or an exception from `on_epoch`/`stop_check`.
        On several ranks `on_epoch` runs on rank 0 only, and the others follow its decision."""
        if resume_from is not None:
            self.load_last(resume_from)
        status = "complete"
        while self.state.epoch < self.tc.epochs:
            epoch = self.state.epoch + 1
            started = time.time()
            row: dict[str, Any] = {"epoch": epoch, "lr": self.optimizer.param_groups[0]["lr"],
                                   **self.train_epoch(epoch)}
            decision, error = "go", None
            if self.dist.is_main:
                try:
                    self._end_epoch(row, started, on_epoch)
                    if self.state.bad_epochs >= self.tc.patience:
                        decision = "early_stop"
                except BaseException as exc:  # noqa: BLE001 - the other ranks must hear of it
                    decision, error = "end", exc
            decision = self.dist.agree(decision)
            if error is not None:
                raise error
            if decision == "end":
                raise RankEnded(f"rank 0 ended the trial after epoch {epoch}")
            self.state.epoch = epoch
            if decision == "early_stop":
                logger.info("Early stopping: no better %s for %d epochs",
                            self.definition.summary or self.definition.name,
                            self.state.bad_epochs)
                status = "early_stopped"
                break
        return self.result(status)

    def _end_epoch(self, row: dict[str, Any], started: float,
                   on_epoch: Callable[[int, dict[str, float]], None]) -> None:
        """Rank 0: validate, record (checkpoints, history), then the caller's `on_epoch`."""
        self.stop_check()
        queries: dict[str, np.ndarray] = {}
        row.update(evaluate(self.model, self.val_loader, self.data.val_page_ids, self.device,
                            queries=queries))
        row["epoch_time_s"] = time.time() - started
        self._keep_queries(queries)
        self._record_epoch(row)
        on_epoch(row["epoch"], row)

    def _keep_queries(self, queries: dict[str, np.ndarray]) -> None:
        st = self.state
        st.query_writers = [int(w) for w in queries["writers"]]
        st.query_top1.append([float(v) for v in queries["top1"]])
        st.query_ap.append([float(v) for v in queries["ap"]])

    def _record_epoch(self, row: dict[str, Any]) -> None:
        """Score the epoch, update the picked one, write best_model.pth / last.pth /
        history.csv, log a line."""
        st = self.state
        if advance(self.definition, st, row):
            self._save_best(row)
        st.epoch = row["epoch"]
        st.history.append(row)
        self.save_last()
        self.write_history()
        logger.info("Epoch %d/%d  loss %.4f (cls %.4f, triplet %.4f)  train acc %.3f  |  val page "
                    "top-1 %.4f top-5 %.4f mAP %.4f  line acc %.3f  page acc %.3f  |  value %.4f"
                    "  |  %.1f s%s",
                    row["epoch"], self.tc.epochs, row["train_loss"], row["train_cls_loss"],
                    row["train_triplet_loss"], row["train_acc"], row["val_page_top1"],
                    row["val_page_top5"], row["val_page_map"], row["val_line_acc"],
                    row["val_page_cls_acc"], row["value"], row["epoch_time_s"],
                    "  *best*" if row["is_best"] else "")

    def result(self, status: str) -> dict[str, Any]:
        """The trial's metrics: those of its picked epoch, the value and its interval (NaN
        before any epoch finished)."""
        st = self.state
        best = dict(st.best) if st.best else {k: float("nan") for k in (*METRIC_KEYS, "value")}
        low, high = float("nan"), float("nan")
        if st.best and st.query_top1:
            low, high = trial_value.bootstrap_interval(
                self.definition, np.array(st.query_top1), np.array(st.query_ap),
                np.array(st.query_writers), seed=self.tc.seed)
        return {**best, "value_low": low, "value_high": high, "trial_value": self.definition.name,
                "best_epoch": st.best_epoch, "epochs_run": st.epoch, "status": status}

    def write_history(self) -> None:
        """history.csv: one row per epoch."""
        import pandas as pd

        with atomic.atomic_path(self.out_dir / "history.csv") as tmp:
            pd.DataFrame(self.state.history).to_csv(tmp, index=False)

    def write_plot(self) -> None:
        """plots/training_curves.png: losses, accuracies and retrieval, learning rate."""
        if self.state.history:
            plot_history(self.state.history, self.out_dir / "plots" / "training_curves.png",
                         title=self.meta.get("title", "Training curves"))


def plot_history(history: list[dict[str, Any]], path: Path, title: str) -> None:
    """Three panels over epochs: losses; accuracy and retrieval; learning rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in history]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for key, label in (("train_loss", "total"), ("train_cls_loss", "classification"),
                       ("train_triplet_loss", "triplet")):
        axes[0].plot(ep, [r[key] for r in history], marker=".", label=label)
    axes[0].set(title="Training loss", xlabel="epoch", ylabel="loss")
    for key in ("train_acc", "val_line_acc", "val_page_cls_acc", "val_page_top1", "val_page_map"):
        axes[1].plot(ep, [r[key] for r in history], marker=".", label=key)
    picked = [r["epoch"] for r in history if r.get("is_best")] or [ep[-1]]
    if "value" in history[0]:
        axes[1].plot(ep, [r["value"] for r in history], color="black", lw=2, label="trial value")
    axes[1].axvline(picked[-1], color="grey", ls="--", lw=1, label=f"picked epoch {picked[-1]}")
    axes[1].set(title="Accuracy and page retrieval", xlabel="epoch", ylabel="value", ylim=(0, 1.02))
    axes[2].plot(ep, [r["lr"] for r in history], marker=".")
    axes[2].set(title="Learning rate (at epoch start)", xlabel="epoch", ylabel="lr")
    for ax in axes[:2]:
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    atomic.save_figure(fig, path, dpi=100)
    plt.close(fig)
