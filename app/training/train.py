"""Algorithm 1 of the paper: ε-prediction trained with L_simple, plus EMA, warm-up, clipping, resume.

A run lives in one folder: `state.pt` (everything needed to resume, written atomically),
`model/` (the EMA weights in the diffusers layout: what gets served) and `previews/`. A checkpoint
writes model/ first and state.pt last, so model/ is never behind state.pt; a resume re-exports model/
if its step is not state.pt's.

A non-finite loss, or a finite loss with a non-finite gradient norm, stops the run with
FloatingPointError before the update, after saving the run as it was then (its weights and EMA are
the last good ones): no step is lost, and nothing non-finite is written (skipping such steps would hide
a diverging run; lower --lr and resume).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from app.diffusion import Schedule, q_sample, sample_ddim
from app.engine.fastpath import cpu_has_native_bf16
from app.images import make_grid, save_png
from app.nets import SchedulerConfig, UNet, UNetConfig, load_checkpoint, save_checkpoint
from app.sampling import schedule_from
from app.training.data import DataError, load_images, pad_to

log = logging.getLogger(__name__)

TRAIN_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class TrainConfig:
    """Everything that defines a run. Saved in state.pt; a resumed run must agree on the model."""

    data: str
    out: str
    resolution: int | None = None  # pad images up to this size (e.g. 28 -> 32); None keeps them
    ch: int = 32
    ch_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (7,)
    dropout: float = 0.1
    # GroupNorm groups. At 1 channel a group (ch=32 with the paper's 32) every norm removes each
    # channel's spatial mean, and the net cannot pass x_t's mean through to ε: samples drift to a
    # grey background. Small models want ≥ 2 channels a group. None: default_norm_groups(ch), i.e.
    # min(32, ch // 4) (8 for ch 32, as the bundled model; the paper's 32 from ch 128), or on a resume
    # the run's own.
    norm_num_groups: int | None = None
    num_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    variance_type: str = "fixed_large"
    steps: int = 10_000
    batch_size: int = 128
    lr: float = 2e-4
    warmup: int = 500
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    hflip: bool = False
    seed: int = 0
    checkpoint_every: int = 500
    preview_every: int = 1000
    preview_steps: int = 50
    device: str = "cpu"
    # autocast of the forward and the loss (backward follows its casts): "bfloat16" runs convolutions and
    # matmuls in 16 bits (1.45x faster a step on an AVX-512 BF16 CPU); weights, Adam and the EMA stay float32
    dtype: str = "float32"
    holdout: list[int] = field(default_factory=list)  # dataset indices never trained on
    init_from: str | None = None  # a checkpoint folder whose weights start a new run (fine-tuning)

    MODEL_KEYS = (
        "ch",
        "ch_mult",
        "num_res_blocks",
        "attn_resolutions",
        "dropout",
        "num_timesteps",
        "beta_schedule",
        "beta_start",
        "beta_end",
        "resolution",
        "norm_num_groups",
    )

    # What a resumed run may change, but with a warning: the data and the optimisation. (`steps`, the
    # intervals, the device and `--max-minutes` change freely; the model keys not at all.)
    RUN_KEYS = (
        "data",
        "holdout",
        "batch_size",
        "lr",
        "warmup",
        "grad_clip",
        "ema_decay",
        "hflip",
        "seed",
        "variance_type",  # the sampling variance written to model/, not the training
    )

    def unet_config(self, *, resolution: int, channels: int) -> UNetConfig:
        return UNetConfig.ddpm(
            resolution=resolution,
            in_channels=channels,
            ch=self.ch,
            ch_mult=tuple(self.ch_mult),
            num_res_blocks=self.num_res_blocks,
            attn_resolutions=tuple(self.attn_resolutions),
            dropout=self.dropout,
            norm_num_groups=self.norm_num_groups or default_norm_groups(self.ch),
        )

    def scheduler_config(self) -> SchedulerConfig:
        return SchedulerConfig(
            num_train_timesteps=self.num_timesteps,
            beta_schedule=self.beta_schedule,
            beta_start=self.beta_start,
            beta_end=self.beta_end,
            variance_type=self.variance_type,
            clip_sample=True,
        )


def default_norm_groups(ch: int) -> int:
    """min(32, ch // 4) GroupNorm groups, lowered to a divisor of ch: at least 4 channels a group."""
    groups = max(1, min(32, ch // 4))
    while ch % groups:
        groups -= 1
    return groups


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr over cfg.warmup steps (the paper warms up over 5000), then constant."""
    return cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema ← decay·ema + (1 − decay)·θ for every parameter (buffers copied)."""
    ema_params = list(ema.parameters())
    torch._foreach_lerp_(ema_params, list(model.parameters()), 1.0 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers(), strict=True):
        b_ema.copy_(b)


def ema_decay_at(step: int, decay: float) -> float:
    """Warm the EMA up so early weights do not linger: min(decay, (1 + step) / (10 + step))."""
    return min(decay, (1 + step) / (10 + step))


def training_loss(
    model: torch.nn.Module, schedule: Schedule, x0: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Algorithm 1, lines 2–5: t ~ U{1..T}, ε ~ N(0, I), ‖ε − ε_θ(√ᾱ_t x₀ + √(1−ᾱ_t) ε, t)‖²."""
    t = torch.randint(0, schedule.num_timesteps, (x0.shape[0],), generator=generator, device=x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device)
    return F.mse_loss(model(q_sample(schedule, x0, t, noise), t).float(), noise)


def _atomic_save(obj: object, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_write_text(text: str, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# A run started from a model without a training.json (e.g. a converted one): its EMA counts as warmed up.
_WARMED_UP = 10**9


class Trainer:
    """Owns one run folder; `run()` trains until cfg.steps, checkpointing and resuming as it goes."""

    def __init__(self, cfg: TrainConfig):
        if cfg.dtype not in TRAIN_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(TRAIN_DTYPES)}, got {cfg.dtype!r}")
        self.out = Path(cfg.out)  # made at the end, once the data and the settings have passed
        state_path = self.out / "state.pt"
        state = torch.load(state_path, map_location="cpu", weights_only=True) if state_path.exists() else None
        if cfg.norm_num_groups is None:  # a resumed run keeps its own (older runs saved the paper's 32)
            saved_groups = state["config"].get("norm_num_groups") if state else None
            cfg = dataclasses.replace(cfg, norm_num_groups=saved_groups or default_norm_groups(cfg.ch))
        if cfg.ch // cfg.norm_num_groups < 2:
            log.warning(
                "%d GroupNorm groups for %d channels: fewer than 2 channels a group, so every norm removes "
                "each channel's mean and samples drift to a grey background; --norm-groups %d (the default "
                "for --ch %d) or fewer avoids it",
                cfg.norm_num_groups,
                cfg.ch,
                default_norm_groups(cfg.ch),
                cfg.ch,
            )
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        if cfg.dtype == "bfloat16" and self.device.type == "cpu" and not cpu_has_native_bf16():
            log.warning(
                "bfloat16 on a CPU without native bfloat16 (no AVX-512 BF16 or AMX) is emulated: "
                "about 10x slower per step than float32 (docs/benchmarks.md)"
            )
        self.data = self._load_data()
        _, channels, resolution, _ = self.data.shape
        self.unet_config = cfg.unet_config(resolution=resolution, channels=channels)
        sched = cfg.scheduler_config()
        self.scheduler_config = sched
        self.schedule = schedule_from(sched).to(self.device)
        torch.manual_seed(cfg.seed)  # initial weights only; every later draw uses self.generator
        self.model = UNet(self.unet_config).to(self.device)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self.data_generator = torch.Generator().manual_seed(cfg.seed + 1)
        self.preview_noise = torch.randn(
            (64, *self.data.shape[1:]), generator=torch.Generator().manual_seed(cfg.seed + 2)
        ).to(self.device)
        self.step = 0
        self.order = torch.empty(0, dtype=torch.long)
        self.elapsed = 0.0
        self.earlier = _earlier_training(cfg.init_from)  # steps and seconds the started-from model had
        self.stopped_by: int | None = None  # the signal (SIGINT, SIGTERM) that ended the last run()
        self.saved_step: int | None = None  # the step state.pt holds
        self._model_behind = False  # model/ holds an older step than state.pt: run() writes it again
        self._sigints = 0  # Ctrl-Cs during this run()
        self._saving = False
        self._stop_now = False  # Ctrl-C again while a checkpoint was being written: stop when it is
        started_from = cfg.init_from
        if state is not None:
            self._resume(state)
            started_from = state["config"].get("init_from") or cfg.init_from
        elif cfg.init_from:
            self._init_from(cfg.init_from)
        # The EMA warm-up counts on from the steps of the model a run started from (its weights are
        # already an average: a warm-up from step 0 would wash them out with the first noisy updates).
        self.ema_offset = self.earlier["step"] or (_WARMED_UP if started_from else 0)
        self.out.mkdir(parents=True, exist_ok=True)

    def _load_data(self) -> torch.Tensor:
        x = load_images(self.cfg.data)
        if (size := self.cfg.resolution) is not None:
            h, w = x.shape[-2:]
            if (size - h) % 2 or (size - w) % 2:  # the classifier of `ddpm eval` center-crops back
                raise DataError(
                    f"--resolution {size} would pad {h}×{w} images unevenly; pick one that adds an even "
                    f"margin (e.g. {size + 1}) so the images stay centred"
                )
            x = pad_to(x, size)
        if x.shape[-1] != x.shape[-2]:
            raise DataError(f"{self.cfg.data}: images must be square, got {tuple(x.shape[-2:])}")
        if self.cfg.holdout:
            keep = torch.ones(len(x), dtype=torch.bool)
            keep[torch.tensor(self.cfg.holdout)] = False
            x = x[keep]
        return x

    def _resume(self, state: dict) -> None:
        saved = state["config"]
        clashes = {
            k: (saved.get(k), getattr(self.cfg, k))
            for k in TrainConfig.MODEL_KEYS
            if _norm(saved.get(k)) != _norm(getattr(self.cfg, k))
        }
        if clashes:
            raise SystemExit(
                f"{self.out}/state.pt was trained with other settings {clashes} "
                "(saved, asked); use another --out folder"
            )
        changed = [
            f"{k} {saved[k]!r} -> {getattr(self.cfg, k)!r}"
            for k in TrainConfig.RUN_KEYS
            if k in saved and _norm(saved[k]) != _norm(getattr(self.cfg, k))
        ]
        if changed:
            log.warning("%s goes on with changed settings: %s", self.out, ", ".join(changed))
        if (trained_in := saved.get("dtype", "float32")) != self.cfg.dtype:
            log.warning(
                "%s was trained in %s so far; it goes on in %s (--dtype)",
                self.out,
                trained_in,
                self.cfg.dtype,
            )
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = self.saved_step = state["step"]
        self._restore_noise_generator(state)
        self.data_generator.set_state(state["data_generator"])
        if "torch_rng" in state:  # runs saved before this was recorded resume without it
            torch.set_rng_state(state["torch_rng"])
        if self.device.type == "cuda" and "cuda_rng" in state:  # dropout on CUDA draws from this one
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        self.order = state["order"]
        had = state.get("data_len")  # runs saved before this was recorded: an index past the end tells
        if (had is not None and had != len(self.data)) or (
            len(self.order) and self.order.max() >= len(self.data)
        ):
            log.warning(
                "%s: the data holds %d images now (%s before): the shuffled epoch under way starts afresh",
                self.out,
                len(self.data),
                "another number" if had is None else had,
            )
            self.order = torch.empty(0, dtype=torch.long)
        self.elapsed = state.get("elapsed", 0.0)
        self.earlier = state.get("earlier", self.earlier)
        exported = _exported_step(self.out / "model")
        if exported != self.step:  # a crash between the two writes (or an older run's order of them)
            log.warning(
                "%s holds step %s, state.pt step %d: it is written again",
                self.out / "model",
                exported,
                self.step,
            )
            self._model_behind = True  # run() saves at its end, even with no step left to train
        log.info("resumed %s at step %d", self.out, self.step)

    def _restore_noise_generator(self, state: dict) -> None:
        """The t and ε generator lives on the training device, and a CPU state does not fit a CUDA
        generator nor the reverse: on another kind of device it is seeded afresh, with a warning."""
        saved_on = state.get("generator_device")  # None: a run saved before this was recorded
        try:
            if saved_on not in (None, self.device.type):
                raise RuntimeError(f"saved on {saved_on}")
            self.generator.set_state(state["generator"])
        except RuntimeError:
            self.generator.manual_seed(self.cfg.seed + 3 + self.step)
            log.warning(
                "%s: its noise generator was saved on %s, this run is on %s: the draws of t and ε go on "
                "from a fresh seed (the run goes on, but not draw for draw as it would have there)",
                self.out,
                saved_on or "another kind of device",
                self.device.type,
            )

    def _init_from(self, path: str) -> None:
        """Start from a saved model (e.g. the bundled one) with a fresh optimizer: the way to go on
        training across machines, where state.pt did not travel."""
        ckpt = load_checkpoint(path, device=self.device)
        if dataclasses.replace(ckpt.unet.config, dropout=self.unet_config.dropout) != self.unet_config:
            raise SystemExit(f"{path} has another architecture than this run: {ckpt.unet.config}")
        theirs, ours = ckpt.scheduler, self.scheduler_config
        keys = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "trained_betas")
        if clashes := {
            k: (getattr(theirs, k), getattr(ours, k)) for k in keys if getattr(theirs, k) != getattr(ours, k)
        }:
            raise SystemExit(
                f"{path} was trained with another noise schedule than this run: {clashes} (its, this run's); "
                "its ε_θ would not fit this run's β_t: give its schedule (--beta-schedule) or start afresh"
            )
        if theirs.variance_type != ours.variance_type:
            log.warning(
                "%s samples with variance_type %s; this run's model/ will say %s (--variance-type)",
                path,
                theirs.variance_type,
                ours.variance_type,
            )
        self.model.load_state_dict(ckpt.unet.state_dict())
        self.ema.load_state_dict(ckpt.unet.state_dict())
        log.info("initialised %s from %s", self.out, path)

    def _unsaved(self) -> bool:
        """Whether the run has something a save would write: steps since state.pt, or a model/ behind it."""
        return self.saved_step != self.step or self._model_behind

    def save(self) -> None:
        """Write state.pt atomically, then the EMA model in the diffusers layout."""
        self._saving = True
        try:
            self._save()
            self.saved_step = self.step
            self._model_behind = False
        finally:
            self._saving = False
        if self._stop_now:
            raise StopNow

    def _save(self) -> None:
        # model/ first and state.pt last: a crash in between leaves state.pt behind model/, and the
        # resume trains those steps again and writes both (the other way round model/ could stay behind)
        save_checkpoint(self.out / "model", self.ema, self.scheduler_config)
        _atomic_write_text(
            json.dumps(
                {
                    "step": self.step,
                    "train_seconds": round(self.elapsed, 1),
                    # counting the runs this one started from (--init-from), so a card can say the total
                    "total_step": self.step + self.earlier["step"],
                    "total_train_seconds": round(self.elapsed + self.earlier["train_seconds"], 1),
                    "device": str(self.device),
                    "config": dataclasses.asdict(self.cfg),
                },
                indent=2,
                default=list,
            ),
            self.out / "model" / "training.json",
        )
        cuda = {"cuda_rng": torch.cuda.get_rng_state(self.device)} if self.device.type == "cuda" else {}
        _atomic_save(
            {
                "config": dataclasses.asdict(self.cfg),
                "step": self.step,
                "elapsed": self.elapsed,
                "earlier": self.earlier,
                "model": self.model.state_dict(),
                "ema": self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "generator": self.generator.get_state(),
                "generator_device": self.device.type,  # the state's format: CPU and CUDA ones differ
                "data_generator": self.data_generator.get_state(),
                "order": self.order,
                "data_len": len(self.data),  # what `order` indexes
                "torch_rng": torch.get_rng_state(),  # dropout draws from the global generator (on a CPU)
                **cuda,  # and on CUDA from the device's own
            },
            self.out / "state.pt",
        )

    def next_batch(self) -> torch.Tensor:
        """Shuffled epochs without replacement, drawn from a generator that is saved with the run."""
        b = self.cfg.batch_size
        if len(self.order) < b:
            self.order = torch.cat(
                [self.order, torch.randperm(len(self.data), generator=self.data_generator)]
            )
        idx, self.order = self.order[:b], self.order[b:]
        x = self.data[idx]
        if self.cfg.hflip:
            flip = torch.rand(len(x), generator=self.data_generator) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x.to(self.device, non_blocking=True)

    @torch.no_grad()
    def preview(self) -> Path:
        """A grid of 64 EMA samples (DDIM, fixed noise) so runs can be watched improving."""
        x = sample_ddim(self.ema, self.preview_noise, self.schedule, steps=self.cfg.preview_steps, eta=0.0)
        path = self.out / "previews" / f"step-{self.step:07d}.png"
        path.parent.mkdir(exist_ok=True)
        save_png(str(path), make_grid(x, ncol=8))
        return path

    def train_step(self, x0: torch.Tensor) -> float:
        """One step of Algorithm 1 on the batch x0, then the EMA; returns the loss. A non-finite loss or
        gradient norm raises FloatingPointError before the weights change."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, self.cfg)
        with self._autocast():
            loss = training_loss(self.model, self.schedule, x0, self.generator)
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"loss is {value} at step {self.step}; lower --lr")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip))
        if not math.isfinite(norm):  # clipping by it would turn every weight into NaN
            self.optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError(
                f"gradient norm is {norm} at step {self.step} (loss {value:.4g}); stopped before the update; "
                "lower --lr"
            )
        self.optimizer.step()
        ema_update(self.ema, self.model, ema_decay_at(self.step + self.ema_offset, self.cfg.ema_decay))
        self.step += 1
        return value

    def _autocast(self) -> torch.autocast:
        dtype = self.cfg.dtype
        return torch.autocast(self.device.type, TRAIN_DTYPES[dtype], enabled=dtype != "float32")

    def _on_signal(self, signum, frame) -> None:
        self._sigints += signum == signal.SIGINT
        if self.stopped_by is None:
            log.warning("signal %d: saving at the end of this step, then stopping", signum)
            self.stopped_by = signum
        elif self._sigints < 2:
            log.warning("signal %d: already stopping at the end of this step", signum)
        elif self._saving:
            log.warning("Ctrl-C again: stopping as soon as the checkpoint being written is")
            self._stop_now = True
        else:  # a second Ctrl-C: stop now, without waiting for the step to end
            raise StopNow

    def run(self, max_seconds: float | None = None) -> Path:
        """Train to cfg.steps; with `max_seconds`, stop after the first step that ends past that much
        wall time (a checkpoint is saved either way, and the same command resumes). SIGINT and SIGTERM
        stop it the same way, at the end of the step; `stopped_by` then holds the signal. A second SIGINT
        before then raises StopNow at once, saving nothing more (state.pt holds `saved_step`); while a
        checkpoint is being written it waits for the write. No preview is drawn once stopping."""
        cfg = self.cfg
        self.stopped_by = None
        self._sigints, self._stop_now = 0, False
        deadline = None if max_seconds is None else time.monotonic() + max_seconds
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        self.model.train()
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        smoothed = None
        try:
            while self.step < cfg.steps and self.stopped_by is None:
                started = time.perf_counter()
                try:
                    loss = self.train_step(self.next_batch())
                except FloatingPointError:  # stopped before the update: what the run has is still good
                    if self._unsaved():
                        self.save()
                    raise
                took = time.perf_counter() - started
                self.elapsed += took
                smoothed = loss if smoothed is None else 0.98 * smoothed + 0.02 * loss
                bar.set_postfix(loss=f"{smoothed:.4f}", img_s=f"{cfg.batch_size / took:.0f}")
                bar.update(1)
                if self.step % cfg.checkpoint_every == 0:
                    self.save()
                if cfg.preview_every and self.step % cfg.preview_every == 0 and self.stopped_by is None:
                    self.preview()
                if deadline is not None and time.monotonic() >= deadline:
                    log.info("time limit of %.0f s reached at step %d", max_seconds, self.step)
                    break
            bar.close()
            if self._unsaved():
                self.save()  # under the handlers still: a Ctrl-C now waits for the write
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)
            bar.close()
        log.info("step %d: saved %s (%.0f s of training)", self.step, self.out / "model", self.elapsed)
        return self.out / "model"


class StopNow(KeyboardInterrupt):
    """Ctrl-C twice: the run stopped at once (Trainer.saved_step is the step state.pt holds)."""


def _earlier_training(init_from: str | None) -> dict[str, float]:
    """The totals in the training.json of the model a run starts from (zero when there is none)."""
    record = Path(init_from or "") / "training.json"
    if not init_from or not record.is_file():
        return {"step": 0, "train_seconds": 0.0}
    saved = json.loads(record.read_text())
    return {
        "step": int(saved.get("total_step", saved.get("step", 0))),
        "train_seconds": float(saved.get("total_train_seconds", saved.get("train_seconds", 0.0))),
    }


def _exported_step(model: Path) -> int | None:
    """The step model/training.json records (None if there is none to read)."""
    try:
        return int(json.loads((model / "training.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _norm(v):
    return list(v) if isinstance(v, tuple | list) else v
