"""Every training option in one place: `TrainConfig`, each field declared once with its default, help and
constraints (`featcache.options`), validated by the one validator; the CLI builds its options from it."""

from __future__ import annotations

from dataclasses import dataclass

from featcache import system
from featcache.backbones import PRECISIONS
from featcache.errors import BadInputError
from featcache.options import declared, option, validate
from heads.balance import CLASS_WEIGHTS, IMBALANCE_RATIO
from heads.builders import MODELS, POOLINGS

#: The default head: the best by validation loss of a small grid (heads.train.auto_grid): the conv head (on maps
#: held in RAM) or the reference dense head (on pooled vectors), and the linear probe.
AUTO = "auto"
#: Where runs (and searches, curves, studies) write their folders unless told otherwise.
RUNS_DIR = "runs"
#: The widest Dense layer a head may have.
MAX_UNITS = 65536
#: auto's candidates on pooled vectors; on one layer's maps held in RAM, the conv head replaces the dense head.
AUTO_CANDIDATES = ("dense", "linear")
VIEWS_MODES = ("sample", "all", "original")
LR_SCHEDULES = ("constant", "cosine")
#: The commands each field is an option of (besides the Python API).
HEAD, BASELINE, CURVE = "train-head", "train-baseline", "curve"


@dataclass(frozen=True)
class TrainConfig:
    model: str = option(
        "dense", "auto: the conv head (where one layer's maps fit --memory-budget; its filters set by the map "
        "size) or else the dense head, and the linear probe: whichever has the lower validation loss (the probe "
        "wins on small splits); dense: pooling -> standardise -> BatchNorm -> Dense(units) -> Dropout -> softmax; "
        "linear: a linear probe (logistic regression solved by L-BFGS, L2 strength chosen on validation); conv: "
        "BatchNorm -> 1x1 Conv(filters) -> Flatten -> Dense(units) -> softmax; knn: cosine k-nearest-neighbour "
        "vote on standardised pooled features (k and temperature chosen on validation); finetune: the backbone's "
        "layers above the cached one (to --tune-to, from the cache's weights) then the dense head, trained in two "
        "stages (--warmup-epochs of the head alone, then all at --finetune-lr).", kind="str",
        choices=(AUTO, *MODELS), label="model", cli=())
    # at most 65,536 a layer: 10^9 units passed every check and died in TensorFlow's allocator after the data loaded
    units: tuple[int, ...] = option((400, 256, 256), "Dense layer sizes of the dense and conv heads.", kind="units",
                                    high=MAX_UNITS, cli=(HEAD,))
    pooling: str = option("gap", "How feature maps become vectors: global average, flatten, or global max.",
                          kind="str", choices=POOLINGS, cli=(HEAD,))
    batchnorm: bool = option(True, "Leave out the dense head's BatchNormalization.", kind="bool", flag="--no-batchnorm",
                             cli=(HEAD,))
    dropout: float = option(0.2, "Dropout rate before the classifier (dense and conv heads; cnn baseline).",
                            kind="float", low=0, high=1, high_open=True, cli=(HEAD, BASELINE))
    l2: float = option(0.0, "Weight decay: L2 strength on the kernels of the dense and conv heads (0: none).",
                       kind="float", low=0, cli=(HEAD,))
    class_weight: str = option(
        "auto", f"Weigh each class by n / (k * n_class) in training and in the validation loss that chooses the "
        f"model: balanced; none; auto: balanced when the largest training class has {IMBALANCE_RATIO:g}x the rows of "
        "the smallest or more, else none.", kind="str", choices=CLASS_WEIGHTS, cli=(HEAD, CURVE))
    epochs: int = option(50, "Most epochs to train; early stopping usually ends sooner.", kind="int", low=1,
                         cli=(HEAD, BASELINE, CURVE))
    patience: int = option(5, "Early stopping: epochs without a better validation loss (best weights restored); "
                           "never before 200 optimiser steps.", kind="int", low=0, cli=(HEAD, BASELINE))
    batch_size: int = option(256, "Largest batch; a small training split gets smaller ones (at least 8 steps per "
                             "epoch).", kind="int", low=1, cli=(HEAD, BASELINE))
    lr: float | None = option(None, "Learning rate [default: 1e-3 for Adam models, 1e-2 for the SGD ann].",
                              kind="float", low=0, low_open=True, cli=(HEAD, BASELINE))
    lr_schedule: str = option("constant", "Learning rate over the training: constant, or cosine (decayed from --lr "
                              "to 0 over --epochs; with --head finetune, from --finetune-lr over the epochs after "
                              "the warm-up).", kind="str", choices=LR_SCHEDULES, cli=(HEAD,))
    val_fraction: float = option(0.1, "Share of the training split (or of each --per-class subset) held out for "
                                 "validation (stratified, at least one per class).", kind="float", low=0, high=1,
                                 low_open=True, high_open=True, cli=(HEAD, BASELINE, CURVE))
    seed: int = option(0, "Seed of the validation split, weight initialisation and shuffling.", kind="int",
                       cli=(HEAD, BASELINE))
    name: str | None = option(None, "Run name (default: the model name).", kind="str", cli=(HEAD, BASELINE))
    filters: int = option(128, "conv head only: channels of its 1x1 convolution.", kind="int", low=1, cli=(HEAD,))
    views_mode: str = option("sample", "With cached views: one random view per image per epoch, every view, or "
                             "the originals only.", kind="str", choices=VIEWS_MODES, cli=(HEAD,))
    per_class: int | None = option(None, "Train and validate on N training images per class, drawn from the cache "
                                   "(stratified, seeded by --subset-seed); the test split stays whole.", kind="int",
                                   low=1, cli=(HEAD,))
    subset_seed: int = option(0, "Which images --per-class draws.", kind="int", cli=(HEAD,))
    refit: bool = option(False, "After validation chose the setting (auto's head, its epochs, the probe's C, the kNN "
                         "vote's k), train that setting again on train + validation (that many epochs, that C or k, "
                         "nothing chosen again) and test the refitted model; the run's validation figures stay the "
                         "choosing fit's. Not for --head finetune.", kind="bool", flag=True, cli=(HEAD,))
    tune_to: str | None = option(None, "--head finetune: the highest backbone layer trained [default: the end of "
                                 "the block above the cached layer, e.g. block3_pool for a VGG16 block2_pool "
                                 "cache].", kind="str", cli=(HEAD,))
    warmup_epochs: int = option(2, "--head finetune: epochs training the head alone (the backbone's layers frozen) "
                                "before all of it trains.", kind="int", low=0, cli=(HEAD,))
    map_shift: int = option(0, "--head finetune: in training, shift each cached map by up to N cells each way "
                            "(zero-filled): the padded random crop, done on the cache (a VGG16 block2_pool cell is "
                            "4 input pixels; 0: off).", kind="int", low=0, cli=(HEAD,))
    finetune_lr: float = option(1e-4, "--head finetune: learning rate once the backbone's layers train too (the "
                                "warm-up's is --lr).", kind="float", low=0, low_open=True, cli=(HEAD,))

    train_precision: str = option(
        "auto", "--head finetune: compute precision of training: float32, bfloat16 or float16 (Keras mixed "
        "precision: float32 weights, output layer and loss), or auto: what --precision auto picks for extraction "
        "on this machine (bfloat16 on GPUs and CPUs with bfloat16 instructions, else float32).", kind="str",
        choices=PRECISIONS, cli=(HEAD,))

    def __post_init__(self):
        validate(self)
        system.check_name(self.name)
        for name, value, default in (("tune_to", self.tune_to, None), ("map_shift", self.map_shift, 0)):
            if value != default and self.model != "finetune":
                raise BadInputError(f"--{name.replace('_', '-')} applies to --head finetune, not {self.model}")
        if self.refit and self.model == "finetune":   # its two stages each choose their epochs on validation
            raise BadInputError("--refit does not apply to --head finetune; fix: leave out --refit")

    @property
    def learning_rate(self) -> float | None:
        if self.lr is not None:
            return self.lr
        return MODELS[self.model].lr if self.model in MODELS else None


def options(command: str | None = None) -> list:
    """The declared fields of TrainConfig, in order; with `command`, those that are its options."""
    return [f for f in declared(TrainConfig) if command is None or command in f.metadata.get("cli", ())]


def reads_maps_if_they_fit(config: TrainConfig) -> bool:
    """Whether `config` trains on one layer's maps where they fit the memory budget, and on pooled vectors
    where they do not (auto: its conv head needs the maps, its other candidates do not)."""
    return config.model == AUTO


def pools_first(config: TrainConfig) -> bool:
    """Whether every model `config` fits starts with a global pooling (then it can train on pooled vectors)."""
    models = AUTO_CANDIDATES if config.model == AUTO else (config.model,)
    return all(MODELS[m].prepooled({k: getattr(config, k) for k in MODELS[m].options}) is not None for m in models)
