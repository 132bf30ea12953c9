"""The training engine with a toy stage (a linear least-squares model under SGD): what it applies,
counts, saves and resumes, checked against a plain loop written here."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import default_collate

from vqgan_cli.checkpoints.format import load_state, save_state
from vqgan_cli.runtime import Runtime, resolve_precision
from vqgan_cli.train import TrainingError
from vqgan_cli.train.config import TrainConfig
from vqgan_cli.train.engine import StepOut, TrainLog, TrainState, run
from vqgan_cli.train.stream import BatchStream, DataPosition

LR = 0.1
RT = Runtime(torch.device("cpu"))
DATA = [{"x": torch.tensor([float(i), 1.0 - i / 4]), "y": torch.tensor([0.5 * i - 1.0])} for i in range(8)]


class ToyStage:
    """y ~ x w^T; a step may be poisoned (NaN loss) or noisy (global RNG), to test the engine."""

    name, weights_name, unit, items_per_step = "train-toy", "toy.safetensors", "it", 2
    precision = resolve_precision("fp32", torch.device("cpu"))

    def __init__(self, poisoned: set[int] = frozenset(), noise: float = 0.0):
        torch.manual_seed(0)
        self.model = nn.Linear(2, 1, bias=False)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=LR)
        self.poisoned, self.noise = poisoned, noise
        self.applied: list[int] = []
        self.seen: list[dict] = []

    def checkpoint_size(self) -> tuple[int, int]:
        return 1, 1

    def attach(self, forward: nn.Module, log=None, run_dir: Path | None = None) -> None:  # noqa: ANN001
        self.forward = forward

    def step(self, batches: Iterator[dict], step: int) -> StepOut:
        self.opt.zero_grad(set_to_none=True)
        batch = next(batches)
        self.seen.append(batch)
        x = batch["x"] + self.noise * torch.randn_like(batch["x"])
        loss = ((self.forward(x) - batch["y"]) ** 2).mean()
        if step in self.poisoned:
            loss = loss * float("nan")
        finite = bool(torch.isfinite(loss))
        if finite:
            loss.backward()
        return StepOut(finite, {"loss": float(loss.detach())})

    def apply(self, step: int) -> dict[str, float]:
        self.applied.append(step)
        self.opt.step()
        return {}

    def train_log(self, logs: dict[str, float], rate: float, state: TrainState) -> TrainLog:
        return TrainLog(dict(logs), "")

    def images(self, step: int) -> None:
        pass

    def evaluate(self, step: int) -> dict[str, float]:
        return {}

    def val_text(self, val: dict[str, float]) -> str:
        return ""

    def summary(self, final: Path | None) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {"opt": self.opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state["opt"])

    def load_weights(self, path: Path) -> None:
        self.model.load_state_dict(load_file(path))

    def save_weights(self, path: Path, info: dict) -> None:
        save_file(self.model.state_dict(), path)


def _train(stage: ToyStage, run_dir: Path, **train: int) -> object:
    cfg = TrainConfig(**{"max_steps": 6, "batch_size": 2, "ckpt_every": 2, "log_every": 1, "val_every": 100,
                         "image_every": 100, "max_nonfinite": 3, **train})
    stream = BatchStream(DATA, cfg.batch_size, 0, cfg.seed, RT, default_collate)
    return run(stage, cfg, stream, run_dir, RT)


def test_train_state_round_trips_through_a_checkpoint_file(tmp_path):
    rng = [{"torch": torch.get_rng_state(), "python_pos": 3}, {"torch": torch.zeros(5, dtype=torch.uint8)}]
    state = TrainState(step=7, position=DataPosition(2, 5), nonfinite=3, nonfinite_in_a_row=1, rng=rng)
    save_state(tmp_path / "s.pt", state.state_dict())  # loaded back with weights_only=True
    saved = load_state(tmp_path / "s.pt")
    # the keys step checkpoints have always had: old runs still resume
    assert set(saved) == {"step", "epoch", "batch", "rng", "nonfinite", "nonfinite_in_a_row"}
    back = TrainState()
    back.load_state_dict(saved)
    assert (back.step, back.position, back.nonfinite, back.nonfinite_in_a_row) == (7, DataPosition(2, 5), 3, 1)
    assert torch.equal(back.rng[0]["torch"], rng[0]["torch"]) and back.rng[0]["python_pos"] == 3
    assert torch.equal(back.rng[1]["torch"], rng[1]["torch"])


def test_nonfinite_steps_are_counted_and_never_applied(tmp_path):
    stage = ToyStage(poisoned={1, 3})
    w = stage.model.weight.detach().clone()
    result = _train(stage, tmp_path / "run")
    assert stage.applied == [0, 2, 4, 5]
    for step, batch in enumerate(stage.seen):  # plain SGD on the finite steps only
        if step not in (1, 3):
            x, y = batch["x"], batch["y"]
            w = w - LR * 2 / len(x) * ((x @ w.T - y).T @ x)  # d/dw mean((x w^T - y)^2)
    torch.testing.assert_close(stage.model.weight.detach(), w)
    assert result.nonfinite == 2 and result.steps == 6
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["split"] == "run" and lines[0]["precision"] == "fp32"  # the run's own record first
    assert [r["nonfinite_steps"] for r in lines[1:]] == [0, 1, 1, 2, 2, 2]
    last = load_state(tmp_path / "run" / "checkpoints" / "step_0000006.state.pt")
    assert (last["nonfinite"], last["nonfinite_in_a_row"], last["step"]) == (2, 0, 6)
    assert (last["epoch"], last["batch"]) == (1, 2)  # 6 batches of 2 from 8 items: 4 per epoch


def test_too_many_nonfinite_steps_in_a_row_stop_with_the_last_checkpoint_intact(tmp_path):
    stage = ToyStage(poisoned={2, 3, 4})
    with pytest.raises(TrainingError, match="3 non-finite losses in a row"):
        _train(stage, tmp_path / "run")
    assert stage.applied == [0, 1]
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert kept == [f"step_000000{s}.{ext}" for s in (2, 4) for ext in ("safetensors", "state.pt")]
    w = ToyStage().model.weight.detach().clone()  # two plain SGD steps on what the run saw
    for batch in stage.seen[:2]:
        x, y = batch["x"], batch["y"]
        w = w - LR * 2 / len(x) * ((x @ w.T - y).T @ x)
    saved = load_file(tmp_path / "run" / "checkpoints" / "step_0000004.safetensors")
    torch.testing.assert_close(saved["weight"], w)
    state = load_state(tmp_path / "run" / "checkpoints" / "step_0000004.state.pt")
    assert (state["nonfinite"], state["nonfinite_in_a_row"]) == (2, 2)


def test_resumed_run_is_bitwise_the_straight_run(tmp_path):
    straight = ToyStage(noise=0.3)
    _train(straight, tmp_path / "a", max_steps=5)
    first = ToyStage(noise=0.3)
    _train(first, tmp_path / "b", max_steps=2)
    second = ToyStage(noise=0.3)
    result = _train(second, tmp_path / "b", max_steps=5)
    assert result.steps == 5 and second.applied == [2, 3, 4]
    assert torch.equal(second.model.weight, straight.model.weight)
    assert all(torch.equal(a["x"], b["x"]) for a, b in zip(first.seen + second.seen, straight.seen, strict=True))


# ---- signals during validation ---------------------------------------------------------------------

class SlowValStage(ToyStage):
    """A toy whose validation is 5 batches that each check the stop flag; SIGTERM arrives (a real
    signal, through the engine's handler) before batch 2 of the validation at ``kill_step``."""

    def __init__(self, kill_step: int | None = None, noise: float = 0.0):
        super().__init__(noise=noise)
        self.kill_step = kill_step
        self.validated: list[int] = []

    def evaluate(self, step: int) -> dict[str, float]:
        from vqgan_cli.train.signals import check_stop

        for batch in range(5):
            if step == self.kill_step and batch == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            check_stop()
        self.validated.append(step)
        return {"w": float(self.model.weight.detach().sum())}

    def val_text(self, val: dict[str, float]) -> str:
        return f"w {val['w']:.4f}"


def _val_records(run_dir: Path) -> list[int]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in lines if r["split"] == "val"]


@pytest.mark.parametrize("kill_step", [3, 6])  # a validation mid-run, and the final one
def test_sigterm_during_validation_saves_the_step_and_the_rerun_validates_then_goes_on(tmp_path, kill_step):
    handler = signal.getsignal(signal.SIGTERM)
    straight = SlowValStage(noise=0.3)
    _train(straight, tmp_path / "a", val_every=3, ckpt_every=100)
    assert straight.validated == [3, 6]

    cut = SlowValStage(kill_step, noise=0.3)
    result = _train(cut, tmp_path / "b", val_every=3, ckpt_every=100)
    assert result.stopped_by_signal == 143 and result.steps == kill_step
    assert cut.validated == [3] if kill_step == 6 else cut.validated == []
    assert not (tmp_path / "b" / "toy.safetensors").exists()  # no final weights from a stopped run
    saved = load_state(tmp_path / "b" / "checkpoints" / f"step_{kill_step:07d}.state.pt")
    assert saved["step"] == kill_step and saved["val_due"] is True
    assert signal.getsignal(signal.SIGTERM) == handler  # restored after the run

    again = SlowValStage(noise=0.3)
    result = _train(again, tmp_path / "b", val_every=3, ckpt_every=100)
    assert result.stopped_by_signal is None and result.steps == 6
    assert again.validated == ([3, 6] if kill_step == 3 else [6])  # the cut validation first, once
    assert again.applied == list(range(kill_step, 6))  # resumed at the saved step, not restarted
    assert _val_records(tmp_path / "b") == _val_records(tmp_path / "a") == [3, 6]
    assert torch.equal(again.model.weight, straight.model.weight)  # exactly the straight run
    assert load_file(tmp_path / "b" / "toy.safetensors")["weight"].equal(straight.model.weight.detach())
    resaved = load_state(tmp_path / "b" / "checkpoints" / f"step_{kill_step:07d}.state.pt")
    assert "val_due" not in resaved  # done: a later resume from this step does not validate again


def test_check_stop_is_a_no_op_outside_a_run_and_raises_inside_one():
    from vqgan_cli.faults import Stopped
    from vqgan_cli.train.signals import StopRequest, check_stop

    check_stop()
    stop = StopRequest()
    try:
        check_stop()  # no signal yet
        os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(Stopped) as e:
            check_stop()
        assert e.value.exit_code == 130
    finally:
        stop.close()
    check_stop()


# ---- loader workers that fit the machine ------------------------------------------------------------

@pytest.mark.parametrize("cores, local_world, expected", [(1, 1, 0), (2, 1, 1), (4, 1, 3), (64, 1, 8),
                                                          (8, 2, 3), (2, 2, 0)])
def test_auto_workers_leave_a_core_to_each_process_and_stop_at_eight(monkeypatch, cores, local_world,
                                                                     expected):
    from vqgan_cli import runtime

    monkeypatch.setattr(runtime, "usable_cores", lambda: cores)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world))
    assert runtime.resolve_workers("auto") == expected
    assert runtime.resolve_workers(5) == 5  # a number is taken as given


def test_usable_cores_follow_the_affinity_mask(monkeypatch):
    from vqgan_cli import runtime

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3}, raising=False)
    assert runtime.usable_cores() == 2


def _worker_warnings(workers: int | str) -> list[str]:
    """PyTorch's too-many-workers warnings while a BatchStream over built-in scenes makes a batch."""
    import warnings

    from vqgan_cli.data import DataConfig, build_dataset, collate

    cfg = DataConfig(size=16, val_count=8, builtin_train=16)
    stream = BatchStream(build_dataset(cfg, "train", "image", None, seed=0), 2, workers, 0, RT, collate)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert stream.next()["image"].shape == (2, 3, 16, 16)
    stream.close()
    return [str(w.message) for w in caught if "worker" in str(w.message)]


def test_auto_workers_on_two_cores_make_no_pytorch_warning(monkeypatch, tmp_path):
    from vqgan_cli.data import DataConfig

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)  # what PyTorch checks too
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert DataConfig().workers == "auto"  # the default
    assert _worker_warnings("auto") == []
    cfg = TrainConfig(max_steps=1, batch_size=2, val_every=100, image_every=100)
    run(ToyStage(), cfg, BatchStream(DATA, 2, "auto", 0, RT, default_collate), tmp_path / "run", RT)
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert (first["split"], first["workers"]) == ("run", 1)  # the run records what auto gave
    # the check can fail: more workers than the two cores do make PyTorch warn
    assert any("suggested max number of worker" in w for w in _worker_warnings(3))
