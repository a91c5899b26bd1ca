r"""TSM2 long-term forecasting (SPEC section 6), Time-Series-Library protocol.

  python train.py --config configs/tsm2.py --workdir runs/tsm2
  python train.py --config configs/tsm2.py:dataset=etth2,horizon=336 --workdir runs/etth2_336 \
      --config.data.data_dir=../shared/data/timeseries
  python train.py --config configs/tsm2.py:smoke --workdir /tmp/tsm2_smoke
  python train.py --config configs/tsm2.py:paper,dataset=etth1,horizon=720 --workdir runs/p720
  python eval.py --workdir runs/tsm2

Arguments (after the colon, comma separated):
  dataset   etth1 (bundled, default), etth2, ettm1, ettm2, weather, exchange_rate, electricity,
            traffic, or a path to a CSV (date first, target OT last).
  horizon   prediction length H (96, 192, 336, 720).
  seq_len   input length (default 336; 512 with `paper`).
  paper     the paper's protocol: input length 512 and the per-dataset hyper-parameters chosen on
            the validation split (benchmarks/tsm2_reproduce.py), GPU-sized.
  seed      random seed.
  smoke     a seconds-long run on tiny shapes (for tests and a first try).

The default (no arguments) is the quick-start job: TSM2 on the bundled ETTh1, H=96, sized to
train on a laptop CPU in a few minutes.
"""

from __future__ import annotations

import ml_collections

from mmx_jax.models.tsm2 import MIXER_PARAMS
from mmx_jax.train.config_args import parse_config_arg
from mmx_jax.train.optim import DEFAULT_DECAY_RULES

# Hyper-parameters per (dataset, horizon) for `paper`, chosen on the validation split only by
# benchmarks/tsm2_reproduce.py: every candidate of its grid_for() at every horizon, seed 0, the
# lowest validation MSE wins (at Exchange 336 and 720, where the re-seed check fired, the lowest
# mean over seeds 0-2). Pairs absent here (electricity, traffic) use PAPER_DEFAULTS.
# Chosen on 2026-11-24 (stages 2, 3 and 4 of the search the same day), on 2026-11-30 (stage 5
# on all six data sets, then the re-seed check) and on 2026-12-01 (stage 7); results/tsm2.md
# has the search and the test table.
PAPER_DEFAULTS = dict(d_model=64, num_layers=2, state_dim=16, dropout=0.2, lr=1e-3,
                      batch_size=64, num_epochs=20, patience=3)
_D64 = dict(d_model=64, lr=1e-3, dropout=0.2)  # the candidates, as the driver names them
_D32 = dict(d_model=32, lr=5e-4, dropout=0.3)
_D16_L1_N4 = dict(d_model=16, num_layers=1, state_dim=4, dropout=0.1, lr=1e-3, batch_size=32,
                  num_epochs=6)
_D16_L1_LR1E4 = dict(d_model=16, num_layers=1, dropout=0.3, lr=1e-4, batch_size=32,
                     num_epochs=10)
_D32_L1_LR1E4 = dict(d_model=32, num_layers=1, dropout=0.3, lr=1e-4, num_epochs=10)
# Stage 2, "+td2_ra" (time_directions=2, revin_affine=True), is chosen nowhere now.
# Stage 3, "+ls0_mlr": residual branches start as the identity, mixers at 0.1 x the lr.
_LS0_MLR = dict(layer_scale=0.0, lr_scale_rules=((MIXER_PARAMS, 0.1),))
# Stage 4, "+ls0_mlr_d0_lr1e-3": stage 3 without dropout, at lr 1e-3.
_LS0_MLR_D0 = dict(_LS0_MLR, dropout=0.0, lr=1e-3)
# Stage 5, "+ls0_mlr001_d0_lr1e-3": stage 4 with the mixers at 0.01 x the lr.
_LS0_MLR001_D0 = dict(_LS0_MLR_D0, lr_scale_rules=((MIXER_PARAMS, 0.01),))
# Stage 7, "+ls0_mlr001_d0_lr1e-3_wd1e-1": stage 5 with weight decay 0.1.
_S7 = dict(_LS0_MLR001_D0, weight_decay=0.1)
PAPER_HPARAMS: dict[tuple[str, int], dict] = {
    ("etth1", 96): {**_D16_L1_N4, **_S7}, ("etth1", 192): {**_D16_L1_LR1E4, **_S7},
    ("etth1", 336): {**_D32_L1_LR1E4, **_S7}, ("etth1", 720): {**_D32_L1_LR1E4, **_S7},
    ("etth2", 96): {**_D32_L1_LR1E4, **_S7}, ("etth2", 192): {**_D32_L1_LR1E4, **_S7},
    ("etth2", 336): {**_D16_L1_LR1E4, **_S7}, ("etth2", 720): {**_D16_L1_LR1E4, **_S7},
    ("exchange_rate", 96): {**_D32, **_LS0_MLR_D0}, ("exchange_rate", 192): {**_D64, **_LS0_MLR},
    ("exchange_rate", 336): _D32, ("exchange_rate", 720): {**_D64, **_LS0_MLR001_D0},
    ("ettm1", 96): {**_D16_L1_N4, **_LS0_MLR}, ("ettm1", 192): {**_D32, **_LS0_MLR001_D0},
    ("ettm1", 336): {**_D16_L1_LR1E4, **_S7},
    ("ettm1", 720): {**_D16_L1_LR1E4, **_LS0_MLR001_D0},
    ("ettm2", 96): {**_D16_L1_LR1E4, **_S7}, ("ettm2", 192): {**_D16_L1_LR1E4, **_S7},
    ("ettm2", 336): {**_D16_L1_LR1E4, **_S7}, ("ettm2", 720): {**_D32_L1_LR1E4, **_S7},
    ("weather", 96): {**_D64, **_S7}, ("weather", 192): {**_D32, **_S7},
    ("weather", 336): {**_D32, **_LS0_MLR}, ("weather", 720): {**_D32, **_LS0_MLR},
}
# Where each hyper-parameter above lives in the config.
HPARAM_KEYS = {"d_model": "model.d_model", "num_layers": "model.num_layers",
               "state_dim": "model.state_dim", "dropout": "model.dropout", "lr": "optimizer.lr",
               "batch_size": "data.batch_size", "num_epochs": "train.num_epochs",
               "patience": "train.patience", "time_directions": "model.time_directions",
               "revin_affine": "model.revin_affine", "layer_scale": "model.layer_scale",
               "lr_scale_rules": "optimizer.lr_scale_rules",
               "weight_decay": "optimizer.weight_decay"}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_config_arg(arg, dict(dataset="etth1", horizon=96, seq_len=336, paper=False,
                                      seed=0, smoke=False), source="configs/tsm2.py")
    config = ml_collections.ConfigDict()
    config.task = "forecasting"
    config.seed = args["seed"]

    config.data = dict(
        name=args["dataset"],
        data_dir=ml_collections.config_dict.placeholder(str),
        seq_len=args["seq_len"],
        pred_len=args["horizon"],
        features="M",
        target="OT",
        batch_size=32,
        eval_batch_size=256,
        max_eval_windows=0,  # 0: every window (the protocol); smoke runs look at fewer
    )
    config.model = dict(
        name="tsm2",
        patch_len=16,
        stride=8,
        d_model=16,
        num_layers=1,
        expand=2,
        state_dim=4,
        time_directions=1,
        conv_width=4,
        revin=True,
        revin_affine=False,
        dropout=0.1,
        head_dropout=0.0,
        # None, or the initial value of a learned scale on each residual branch (0: identity)
        layer_scale=ml_collections.config_dict.placeholder(float),
        norm="layernorm",
        learnable_averaging=True,
        # The quick start runs on CPUs, where the sequential scan is the fastest (the paper
        # setting switches to "auto": the Pallas kernel on GPU/TPU).
        scan_impl="sequential",
        dtype="float32",
    )
    config.optimizer = dict(
        lr=1e-3,
        weight_decay=1e-4,
        b1=0.9,
        b2=0.999,
        schedule="cosine",  # cosine | tslib (x0.5 every epoch) | constant
        schedule_clock="steps",  # or "time": ends the schedule at train.time_limit_s
        warmup_steps=100,
        min_lr_ratio=0.01,
        grad_clip=1.0,
        ema_decay=0.0,  # 0 disables the EMA of the weights
        lr_scale_rules=(),  # (regex on the parameter path, lr factor), first match wins
        # (regex on the parameter path, decays?), first match wins; unmatched ones decay.
        # The default spares the SSM's A_log, D and dt bias, biases, norm and layer scales,
        # positional embeddings and the averaging weights.
        decay_rules=DEFAULT_DECAY_RULES,
    )
    config.train = dict(
        num_epochs=4,
        steps_per_epoch=0,  # 0: one pass over the training windows
        log_every_steps=25,
        eval_every_steps=0,  # 0: validate at the end of every epoch
        checkpoint_every_steps=100,
        keep_checkpoints=2,
        patience=3,  # epochs (validations) without improvement before stopping; 0 disables
        time_limit_s=0.0,  # stop (validate, save) after this many seconds; 0: no limit
    )
    config.mesh = dict(data=-1, fsdp=1)
    config.sharding = dict(
        fsdp_min_size=2**16,  # parameters smaller than this stay replicated under FSDP
        rules=[],  # (regex on the parameter path, PartitionSpec entries), first match wins
    )
    config.eval = dict(plot_variates=3, plot_windows=2)

    if args["paper"]:
        config.data.seq_len = 512
        hp = {**PAPER_DEFAULTS, **PAPER_HPARAMS.get((args["dataset"], args["horizon"]), {})}
        config.update_from_flattened_dict({HPARAM_KEYS[k]: v for k, v in hp.items()})
        config.model.scan_impl = "auto"
        # The search of results/tsm2.md ran with weight decay on every parameter: kept so
        # that its table reproduces.
        config.optimizer.decay_rules = ((".*", True),)
        config.train.checkpoint_every_steps = 1000
        config.train.log_every_steps = 100
    if args["smoke"]:
        config.data.seq_len = 64
        config.data.pred_len = 16
        config.data.batch_size = 16
        config.data.eval_batch_size = 64
        config.model.d_model = 8
        config.model.num_layers = 1
        config.model.state_dim = 4
        config.train.num_epochs = 2
        config.train.steps_per_epoch = 6
        config.train.log_every_steps = 2
        config.train.checkpoint_every_steps = 4
        config.optimizer.warmup_steps = 2
        config.data.max_eval_windows = 128
    return config
