"""The schema of `lmforge align`'s recipe (configs/align-default.yaml): one dataclass per section,
so every value is checked for type and range when the recipe is loaded (`config.load_config`),
before any model is built, and the recipe reads typed fields (`cfg.train.lr`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from lmforge.common import DEVICE_PATTERN, checked

ALIGN_METHODS = ("dpo", "reward", "grpo", "ppo", "distill", "rlaif")


@dataclass
class AlignModel:
    path: str | None = None  # lmforge checkpoint or HF folder; None: a fresh preset (demo)
    preset: str = "tiny"
    teacher: str | None = None  # distill: the teacher model folder
    reward_model: str | None = None  # ppo/grpo: a reward model folder; None: the task's verifiable reward


@dataclass
class AlignTask:
    name: str = checked("format", choices=("format", "docstring", "arithmetic", "file"))
    path: str | None = None  # task.name=file: the JSONL file
    train_size: int = checked(256, ge=1)
    eval_size: int = checked(64, ge=1)
    seed: int = checked(0, ge=0)


@dataclass
class AlignPeft:
    method: str = checked("full", choices=("full", "lora"))
    r: int = checked(8, ge=1)
    alpha: float = checked(16.0, gt=0)


@dataclass
class AlignTrain:
    steps: int = checked(60, ge=1)
    batch_size: int = checked(16, ge=1)
    lr: float = checked(1e-3, gt=0)
    max_len: int = checked(96, ge=2)
    seed: int = checked(0, ge=0)
    device: str = checked("auto", pattern=DEVICE_PATTERN)


@dataclass
class AlignDPO:
    beta: float = checked(0.1, gt=0)
    loss_type: str = checked("sigmoid", choices=("sigmoid", "ipo"))
    label_smoothing: float = checked(0.0, ge=0, lt=0.5)  # > 0: conservative DPO


@dataclass
class AlignRL:
    group_size: int = checked(8, ge=1)  # grpo: samples per prompt
    prompts_per_step: int = checked(4, ge=1)
    max_new_tokens: int = checked(6, ge=1)
    temperature: float = checked(1.0, gt=0)
    kl_coef: float = checked(0.02, ge=0)
    kl_target: float = checked(0.5, gt=0)
    ppo_epochs: int = checked(2, ge=1)
    clip: float = checked(0.2, gt=0)
    gamma: float = checked(1.0, ge=0, le=1)
    lam: float = checked(0.95, ge=0, le=1)


@dataclass
class AlignDistill:
    temperature: float = checked(2.0, gt=0)
    kind: str = checked("forward", choices=("forward", "reverse"))
    seq_len: int = checked(64, ge=2)


@dataclass
class AlignRlaif:
    judge: str | None = None  # a judge model folder or an OpenAI-compatible endpoint URL
    principles: str = "The answer is wrapped in square brackets and ends with a period."


@dataclass
class AlignRun:
    dir: str = "runs"
    name: str = checked("align", pattern=r"[^/\\]+")


@dataclass
class AlignConfig:
    method: str = checked("dpo", choices=ALIGN_METHODS)
    model: AlignModel = field(default_factory=AlignModel)
    task: AlignTask = field(default_factory=AlignTask)
    peft: AlignPeft = field(default_factory=AlignPeft)
    train: AlignTrain = field(default_factory=AlignTrain)
    dpo: AlignDPO = field(default_factory=AlignDPO)
    rl: AlignRL = field(default_factory=AlignRL)
    distill: AlignDistill = field(default_factory=AlignDistill)
    rlaif: AlignRlaif = field(default_factory=AlignRlaif)
    run: AlignRun = field(default_factory=AlignRun)
