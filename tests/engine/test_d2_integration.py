"""CQDINO swapped into a plain Detectron2 project, the two ways docs/using_cqdino.md describes:
a yacs config trained by detectron2's own ``DefaultTrainer``, and the LazyConfig flow trained by
detectron2's own ``SimpleTrainer`` (as its ``tools/lazyconfig_train_net.py`` does). Both on the
tiny synthetic vocabulary, a few CPU iterations each."""

import math

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyConfig, get_cfg, instantiate
from detectron2.engine import DefaultTrainer, SimpleTrainer, create_ddp_model, hooks
from detectron2.modeling import build_model

from cqdino.config import add_cqdino_config
from cqdino.data import category_tree_file
from cqdino.modeling import CQDINO

from .conftest import ROOT, TINY_CATEGORIES, TINY_OVERRIDES

pytestmark = pytest.mark.slow


def _losses(trainer) -> dict:
    """{loss name: [(value, iteration), ...]} of every iteration the trainer ran."""
    history = trainer.storage.histories()
    return {k: h.values() for k, h in history.items() if k.startswith("loss_") or k == "total_loss"}


def _check_losses(trainer, iterations: int) -> None:
    losses = _losses(trainer)
    assert "loss_select" in losses and "loss_class" in losses and "loss_bbox" in losses
    for name, values in losses.items():
        assert [it for _, it in values] == list(range(iterations)), name
        assert all(math.isfinite(v) for v, _ in values), (name, values)
    assert all(v > 0 for v, _ in losses["total_loss"])


def tiny_yacs_cfg(output_dir: str):
    """A user's yacs config: detectron2 defaults + ``add_cqdino_config`` + CQDINO at test size
    (R18, d=64, 1 + 2 layers, 20 queries, K=10, the dataset's category tree)."""
    cfg = get_cfg()
    add_cqdino_config(cfg)
    cfg.MODEL.META_ARCHITECTURE = "CQDINO"
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64  # detectron2 requires 64 for R18/R34
    d = cfg.MODEL.DINO
    d.NUM_CLASSES = TINY_CATEGORIES
    d.HIDDEN_DIM = 64
    d.NHEADS = 4
    d.DIM_FEEDFORWARD = 128
    d.ENC_LAYERS = 1
    d.DEC_LAYERS = 2
    d.NUM_QUERIES = 20
    d.DN_NUMBER = 10
    d.NUM_SELECT = 50
    c = cfg.MODEL.CQDINO
    c.TOPK = 10
    c.QUERY_DIM = 64
    c.RELATION = "tree"
    c.TREE_FILE = category_tree_file("synthetic_vocab_train")
    c.SELECTION_LOSS = "asl"
    c.SELECTOR_MEMORY_DIM = 64
    c.SELECTOR_FFN_DIM = 128
    c.SELECTOR_NUM_LAYERS = 1
    c.FUSION_DIM = 64
    c.DECODER_CATEGORY_HEADS = 4
    cfg.DATASETS.TRAIN = ("synthetic_vocab_train",)
    cfg.DATASETS.TEST = ()
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.INPUT.MIN_SIZE_TRAIN = (64,)
    cfg.INPUT.MAX_SIZE_TRAIN = 80
    cfg.INPUT.MIN_SIZE_TEST = 64
    cfg.INPUT.MAX_SIZE_TEST = 80
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.SOLVER.BASE_LR = 1e-4
    cfg.SOLVER.MAX_ITER = 3
    cfg.SOLVER.STEPS = ()
    cfg.SOLVER.WARMUP_ITERS = 0
    cfg.SOLVER.CHECKPOINT_PERIOD = 1000
    cfg.TEST.EVAL_PERIOD = 0
    cfg.SEED = 0
    cfg.OUTPUT_DIR = output_dir
    return cfg


def test_yacs_default_trainer(synthetic_vocab, tmp_path):
    """``MODEL.META_ARCHITECTURE: "CQDINO"`` trains with detectron2's DefaultTrainer and its
    default data pipeline (``DatasetMapper``, ``INPUT.FORMAT``), optimizer and checkpointer."""
    cfg = tiny_yacs_cfg(str(tmp_path))
    cfg.freeze()
    trainer = DefaultTrainer(cfg)
    assert type(trainer.model) is CQDINO
    assert trainer.model.class_head.num_categories == TINY_CATEGORIES
    assert trainer.model.input_format == cfg.INPUT.FORMAT
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.resume_or_load(resume=False)
    trainer.train()

    _check_losses(trainer, cfg.SOLVER.MAX_ITER)
    final = tmp_path / "model_final.pth"
    assert final.is_file()
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"
    # the checkpoint holds the trained weights and loads back into a fresh yacs-built model
    state = torch.load(final, map_location="cpu", weights_only=False)
    assert state["iteration"] == cfg.SOLVER.MAX_ITER - 1
    name = "class_head.selector.input_proj.weight"
    assert not torch.equal(state["model"][name], before[name])  # it trained
    fresh = build_model(cfg)
    DetectionCheckpointer(fresh).load(str(final))
    assert torch.equal(fresh.state_dict()[name], state["model"][name])


def test_lazyconfig_simple_trainer(synthetic_vocab, tmp_path):
    """configs/demo.py instantiated piece by piece and trained by detectron2's SimpleTrainer
    with detectron2's hooks and checkpointer (``tools/lazyconfig_train_net.py``'s loop)."""
    cfg = LazyConfig.load(str(ROOT / "configs" / "demo.py"))
    cfg = LazyConfig.apply_overrides(
        cfg, TINY_OVERRIDES + [f"train.output_dir={tmp_path}", "train.max_iter=3"]
    )
    torch.manual_seed(0)
    device = cfg.train.device if torch.cuda.is_available() else "cpu"  # as train_net.py does
    model = instantiate(cfg.model).to(device)
    assert type(model) is CQDINO
    assert model.class_head.num_categories == TINY_CATEGORIES
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    train_loader = instantiate(cfg.dataloader.train)
    model = create_ddp_model(model, **cfg.train.ddp)
    trainer = SimpleTrainer(model, train_loader, optimizer)
    checkpointer = DetectionCheckpointer(
        model, cfg.train.output_dir, optimizer=optimizer, trainer=trainer
    )
    trainer.register_hooks(
        [
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer),
        ]
    )
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=False)
    trainer.train(0, cfg.train.max_iter)

    _check_losses(trainer, cfg.train.max_iter)
    # the config's LR schedule drove the optimizer: warm-up from 0.1 x 4e-4 over 100
    # iterations, cut to end at the first step (1/2 of 3 iterations)
    lrs = [v for v, _ in trainer.storage.history("lr").values()]
    assert lrs[0] == pytest.approx(cfg.optimizer.lr * 0.1)
    assert (tmp_path / "model_final.pth").is_file()
