"""docs/using_cqdino.md's recipe ``Trainer`` (the second code block) honours the yacs input
sizes: its training mapper resizes as ``INPUT.MIN_SIZE_TRAIN`` / ``MAX_SIZE_TRAIN`` say."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _recipe_block() -> str:
    text = (ROOT / "docs" / "using_cqdino.md").read_text()
    blocks = re.findall(r"```python[^\n]*\n(.*?)```", text, flags=re.S)
    return next(b for b in blocks if "class Trainer(DefaultTrainer)" in b)


def test_docs_trainer_reads_input_min_size_train():
    from detectron2.config import get_cfg
    from detectron2.data import transforms as T
    from detectron2.engine import DefaultTrainer

    from cqdino.config import add_cqdino_config
    from cqdino.data import DetrDatasetMapper
    from cqdino.evaluation import build_evaluator

    captured = {}

    def build_detection_train_loader(cfg, mapper):
        captured["mapper"] = mapper
        return "loader"

    namespace = dict(
        DefaultTrainer=DefaultTrainer,
        DetrDatasetMapper=DetrDatasetMapper,
        build_detection_train_loader=build_detection_train_loader,
        build_evaluator=build_evaluator,
    )
    exec(compile(_recipe_block(), "docs/using_cqdino.md", "exec"), namespace)
    cfg = get_cfg()
    add_cqdino_config(cfg)
    cfg.MODEL.DINO.NUM_CLASSES = 7
    cfg.INPUT.MIN_SIZE_TRAIN = (96, 128)
    cfg.INPUT.MAX_SIZE_TRAIN = 160
    assert namespace["Trainer"].build_train_loader(cfg) == "loader"
    resize = [a for a in captured["mapper"].augmentation if isinstance(a, T.ResizeShortestEdge)]
    assert len(resize) == 1
    assert tuple(resize[0].short_edge_length) == (96, 128) and resize[0].max_size == 160
