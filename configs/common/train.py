"""Training settings shared by every recipe (``train``) and the LR schedule (``lr_multiplier``).

Leaves set ``train.max_iter`` from the epoch count: ``max_iter = epochs x images / batch``
(``train.epochs`` and ``train.images_per_epoch`` record the arithmetic; projects/train_net.py
logs it). The schedule's steps are fractions of ``max_iter``, so a command-line
``train.max_iter=...`` moves them too.
"""

from detectron2.config import LazyCall as L

from cqdino.engine import step_schedule

train = dict(
    output_dir="./output",
    init_checkpoint="",  # no ImageNet weights offline: from scratch unless a file is given
    max_iter=90000,
    epochs=None,  # informational: max_iter x batch / images_per_epoch
    images_per_epoch=None,
    device="cuda",  # falls back to the CPU when CUDA is not available
    seed=-1,  # >= 0 makes runs repeatable (rank r uses seed + r)
    amp=dict(enabled=False, dtype="bf16"),  # CUDA only; "fp16" adds a GradScaler
    clip_grad=dict(enabled=True, max_norm=0.1, norm_type=2.0),  # the recipe's L2 clip
    ema=dict(enabled=False, decay=0.9998, eval_with_ema=True),
    ddp=dict(broadcast_buffers=False, find_unused_parameters=False, fp16_compression=False),
    checkpointer=dict(period=5000, max_to_keep=3),
    eval_period=5000,
    log_period=20,
)

# lr x 0.1 at 1/2 and 3/4 of training (24 ep: epochs 12 and 18), warm-up 1000 iters from 0.1x
lr_multiplier = L(step_schedule)(
    max_iter="${train.max_iter}",
    milestones=(0.5, 0.75),
    gamma=0.1,
    warmup_iters=1000,
    warmup_factor=0.1,
)
