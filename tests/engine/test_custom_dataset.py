"""configs/custom_coco.py: one's own COCO-format data trained and evaluated by
projects/train_net.py from paths given as overrides, with no Python written; the class count
comes from the json, and nothing is written into the data folder."""

import hashlib

import pytest

from .conftest import ROOT, TINY_OVERRIDES, run_train_net

pytestmark = pytest.mark.slow

# the tiny test sizes, without the class-count overrides (the config reads them from the json)
SMALL = [o for o in TINY_OVERRIDES if "num_categories" not in o and "num_classes" not in o]


def _digests(folder):
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_own_coco_json_trains_and_evaluates(tiny_datasets, tmp_path):
    data = tiny_datasets / "synthetic_vocab"  # any COCO-format json + image folder
    before = _digests(data)
    ann = data / "annotations"
    args = ["--config-file", str(ROOT / "configs" / "custom_coco.py"), *SMALL]
    args += [f"dataloader.train.dataset.json_file={ann / 'synthetic_vocab_train.json'}"]
    args += [f"dataloader.train.dataset.image_root={data / 'images'}"]
    args += [f"dataloader.test.dataset.json_file={ann / 'synthetic_vocab_val.json'}"]
    args += [f"dataloader.test.dataset.image_root={data / 'images'}"]
    args += ["train.max_iter=2", f"train.output_dir={tmp_path}"]
    proc = run_train_net(tiny_datasets, args)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    assert "Evaluation results" in text and "| bbox" in text
    assert (tmp_path / "model_final.pth").is_file()
    assert _digests(data) == before


def test_own_coco_json_without_paths_is_one_line(tiny_datasets, tmp_path):
    args = ["--config-file", str(ROOT / "configs" / "custom_coco.py"), *SMALL]
    proc = run_train_net(tiny_datasets, args + [f"train.output_dir={tmp_path}"])
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "dataloader.train.dataset.json_file is not set" in last
