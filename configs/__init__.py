"""Config files (`get_config(arg)`, one per model family) and what they share (`common`).

    python train.py --config configs/tsm2.py:dataset=etth2,horizon=336 --workdir runs/x

Each file's docstring lists its arguments and command lines. From Python:
`from configs import tsm2; config = tsm2.get_config("smoke")`.
"""
