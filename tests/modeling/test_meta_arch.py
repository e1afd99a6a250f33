"""The DINO meta-architecture end to end: training step, gradients, DDP policy, inference,
padding, checkpointing, the class-head interface (incl. the "-1 = not selected" path) and
hooks, and C = 13,204."""

import dataclasses
import time

import pytest
import torch
from detectron2.layers import ShapeSpec
from torch import nn

from cqdino.modeling import DINO, ChannelMapper, ClassHead, ClassHeadState
from tests.modeling.utils import assert_checkpointing_is_exact, batch, tiny_dino

C = 10


def _keys(num_layers):
    suffixes = [""] + [f"_{i}" for i in range(num_layers - 1)] + ["_enc", "_dn"]
    suffixes += [f"_dn_{i}" for i in range(num_layers - 1)]
    return {f"loss_{k}{s}" for k in ("class", "bbox", "giou") for s in suffixes}


def _grad_norm(module):
    return sum(p.grad.abs().sum().item() for p in module.parameters() if p.grad is not None)


def test_training_step_finite_keys_and_gradients():
    torch.manual_seed(0)
    model = tiny_dino(C, embed_dim=64, width=32)
    model.train()
    t0 = time.perf_counter()
    losses = model(batch([(64, 96, 3), (80, 64, 2)], C))
    assert set(losses) == _keys(2)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    print(f"train step (R18/32, d=64, 64x96 + 80x64): {time.perf_counter() - t0:.2f} s")
    for name, mod in [
        ("backbone stem", model.backbone.stem),
        ("encoder", model.transformer.encoder.layers[0]),
        ("decoder", model.transformer.decoder.layers[0]),
        ("class head", model.class_head),
        ("dn table", model.dn_generator),
    ]:
        assert _grad_norm(mod) > 0, f"no gradient reaches the {name}"


@pytest.mark.parametrize("gt_counts", [(3, 0), (0, 0)])
def test_images_without_gt_train_and_every_parameter_gets_a_gradient(gt_counts):
    """DDP policy: find_unused_parameters=False must work, also with no GT in the batch."""
    torch.manual_seed(0)
    model = tiny_dino(C, embed_dim=64, width=32)
    losses = model(batch([(64, 96, gt_counts[0]), (64, 64, gt_counts[1])], C))
    assert set(losses) == _keys(2)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing


def test_activation_checkpointing_gives_the_same_step():
    inputs = batch([(64, 96, 3), (64, 64, 1)], C)
    assert_checkpointing_is_exact(
        lambda ckpt: tiny_dino(C, embed_dim=64, width=32, use_checkpoint=ckpt), inputs
    )


def test_inference_output_format():
    torch.manual_seed(0)
    model = tiny_dino(C, embed_dim=64, width=32).eval()
    inputs = batch([(64, 96, 0), (80, 64, 0)], C)
    inputs[0]["height"], inputs[0]["width"] = 128, 192  # output resolution 2x
    with torch.no_grad():
        out = model(inputs)
    assert len(out) == 2
    a, b = out[0]["instances"], out[1]["instances"]
    assert a.image_size == (128, 192) and b.image_size == (80, 64)
    assert 0 < len(a) <= 300 and 0 < len(b) <= 300
    for inst in (a, b):
        assert inst.pred_classes.min() >= 0 and inst.pred_classes.max() < C
        assert (inst.scores[:-1] >= inst.scores[1:]).all()
        h, w = inst.image_size
        bx = inst.pred_boxes.tensor
        assert (bx[:, 0::2] <= w).all() and (bx[:, 1::2] <= h).all() and (bx >= 0).all()


def test_image_alone_or_batched_with_a_larger_one():
    """End to end: the backbone zeroes padding around every conv (ConvPaddingZeroer), the
    neck's GroupNorm and the transformer ignore it, so the only differences are float rounding
    (~1e-5 in features). Tolerance: each of the image's 50 best detections alone has a
    counterpart batched with the same class, IoU > 0.999 and score within 1e-4. Compared as sets
    because an untrained model's scores are nearly tied, so rounding can swap their order."""
    from detectron2.structures import pairwise_iou

    torch.manual_seed(0)
    model = tiny_dino(C, embed_dim=64, width=32).eval()
    # trainable BN in eval mode uses running statistics: give them non-trivial values
    for m in model.backbone.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    a, big = batch([(96, 128, 0), (160, 224, 0)], C, seed=3)
    with torch.no_grad():
        alone = model([a])[0]["instances"][:50]
        both = model([a, big])[0]["instances"]
    iou = pairwise_iou(alone.pred_boxes, both.pred_boxes)  # (50, N)
    same = alone.pred_classes[:, None] == both.pred_classes[None]
    close = (alone.scores[:, None] - both.scores[None]).abs() <= 1e-4
    ok = ((iou > 0.999) & same & close).any(1)
    assert ok.all(), f"{int((~ok).sum())} of 50 detections changed when batched"


def test_13204_classes_train_step():
    torch.manual_seed(0)
    model = tiny_dino(13204, embed_dim=64, width=32, num_queries=30, dn_number=10)
    losses = model(batch([(64, 64, 2), (64, 64, 0)], 13204))
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert model.class_head.decoder_layers[0].weight.grad.shape == (13204, 64)
    model.eval()
    with torch.no_grad():
        out = model(batch([(64, 64, 0)], 13204))
    assert out[0]["instances"].pred_classes.max() < 13204


class SelectHead(ClassHead):
    """Fake CQ-DINO-style head: K columns = per-image selected classes (fixed in prepare),
    logits = query . prototype(class) / sqrt(D) + bias."""

    def __init__(self, num_classes, K, D):
        super().__init__()
        self.K = K
        self.num_dn_labels = K + 1
        self.num_noise_labels = K
        self.unselected_dn_label = K
        self.proto = nn.Embedding(num_classes, D)
        self.bias = nn.Parameter(torch.tensor(-4.595))
        self.seen = []

    def prepare(self, features, image_sizes, gt_classes=None):
        B = len(image_sizes)
        dev = self.proto.weight.device
        indices = torch.stack([torch.arange(self.K, device=dev) * 2 + b for b in range(B)])
        emb = self.proto(indices)
        losses = {"loss_select": self.bias * 0 + 0.5}
        return ClassHeadState(indices=indices, embeddings=emb, losses=losses)

    def forward(self, hidden, state, layer):
        self.seen.append(state.embeddings)
        logits = torch.einsum("bqd,bkd->bqk", hidden, state.embeddings) / hidden.shape[-1] ** 0.5
        return logits + self.bias

    def map_targets(self, gt_classes, state):
        out = []
        for b, g in enumerate(gt_classes):
            hit = g[:, None] == state.indices[b][None]
            out.append(torch.where(hit.any(1), hit.float().argmax(1), torch.full_like(g, -1)))
        return out


class CountingFusion(nn.Module):
    calls = 0

    def forward(self, memory, pos, padding_mask, state):
        CountingFusion.calls += 1
        return memory, dataclasses.replace(state, embeddings=state.embeddings * 1.5)


class CountingCategoryAttn(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, query, query_pos, state):
        self.calls += 1
        assert state.embeddings is not None
        return query


def test_fake_selection_head_hooks_and_unselected_targets():
    from cqdino.modeling import DeformableDecoder, DeformableEncoder

    torch.manual_seed(0)
    K, D = 3, 64
    head = SelectHead(C, K, D)
    model = tiny_dino(C, embed_dim=D, width=32, class_head=head)
    model.transformer.encoder = DeformableEncoder(
        2, D, 8, 128, 4, 4, fusion_layers=[CountingFusion(), None]
    )
    hooks = [CountingCategoryAttn(), CountingCategoryAttn()]
    model.transformer.decoder = DeformableDecoder(2, D, 8, 128, 4, 4, category_attn=hooks)
    assert model.dn_generator.label_embed.num_embeddings == K + 1

    inputs = batch([(64, 96, 0), (64, 64, 0)], C)
    # image 0 selects classes 0, 2, 4; image 1 selects 1, 3, 5
    inputs[0]["instances"] = batch([(64, 96, 3)], C)[0]["instances"]
    inputs[0]["instances"].gt_classes = torch.tensor([2, 7, 4])  # 7 not selected
    inputs[1]["instances"] = batch([(64, 64, 2)], C, seed=1)[0]["instances"]
    inputs[1]["instances"].gt_classes = torch.tensor([6, 3])  # 6 not selected
    state = head.prepare(None, [(64, 96), (64, 64)])
    mapped = head.map_targets([torch.tensor([2, 7, 4]), torch.tensor([6, 3])], state)
    assert mapped[0].tolist() == [1, -1, 2] and mapped[1].tolist() == [-1, 1]
    assert head.map_dn_labels(mapped[0]).tolist() == [1, K, 2]

    CountingFusion.calls = 0
    losses = model(inputs)
    assert losses["loss_select"].item() == 0.5
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert CountingFusion.calls == 1 and all(h.calls == 1 for h in hooks)
    # the head sees the category tokens updated by the encoder fusion
    assert torch.allclose(head.seen[-1], head.proto(state.indices) * 1.5)
    assert head.proto.weight.grad is not None

    model.eval()
    with torch.no_grad():
        out = model(batch([(64, 96, 0), (64, 64, 0)], C))
    assert set(out[0]["instances"].pred_classes.tolist()) <= {0, 2, 4}
    assert set(out[1]["instances"].pred_classes.tolist()) <= {1, 3, 5}


@pytest.mark.cuda
def test_cuda_training_step_and_inference():
    torch.manual_seed(0)
    model = tiny_dino(C, embed_dim=64, width=32).cuda()
    losses = model(batch([(64, 96, 3), (80, 64, 0)], C))
    assert all(v.device.type == "cuda" for v in losses.values())
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    model.eval()
    with torch.no_grad():
        out = model(batch([(64, 96, 0)], C))
    assert out[0]["instances"].pred_boxes.tensor.device.type == "cuda"


def test_bf16_autocast_training_step():
    torch.manual_seed(0)
    model = tiny_dino(C, embed_dim=64, width=32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(batch([(64, 96, 3), (80, 64, 0)], C))
    total = sum(v.float() for v in losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def _rebuild(model, **kw):
    """A DINO from ``model``'s modules with some constructor arguments replaced."""
    args = {
        k: getattr(model, k)
        for k in ("backbone", "neck", "position_embedding", "transformer", "class_head")
    }
    args.update(criterion=model.criterion, pixel_mean=(0.0,) * 3, pixel_std=(1.0,) * 3)
    return DINO(**{**args, **kw})


def test_neck_inputs_that_do_not_match_the_backbone_fail_at_construction():
    model = tiny_dino(C, embed_dim=64, width=32)  # R18 width 32: res3/4/5 = 64/128/256 channels
    shapes = dict(model.backbone.output_shape())
    features = ["res3", "res4", "res5"]

    def neck(**changed):
        return ChannelMapper({**shapes, **changed}, features, 64, 1, 32)

    bad = neck(res5=ShapeSpec(channels=2048, stride=32))  # the R50 value in an R18 model
    with pytest.raises(ValueError, match=r"model\.neck\.input_shapes\.res5\.channels=2048.*"):
        _rebuild(model, neck=bad)
    with pytest.raises(ValueError, match=r"model\.backbone outputs res5 with channels=256"):
        _rebuild(model, neck=bad)
    with pytest.raises(ValueError, match=r"model\.neck\.input_shapes\.res4\.stride=32"):
        _rebuild(model, neck=neck(res4=ShapeSpec(channels=128, stride=32)))
    features = ["res4", "res5", "res6"]
    with pytest.raises(ValueError, match="reads 'res6', which the backbone does not output"):
        _rebuild(model, neck=neck(res6=ShapeSpec(channels=512, stride=64)))
    with pytest.raises(ValueError, match=r"in_features \['res6'\] have no entry in input_shapes"):
        neck()


def test_input_format_keyword_and_yacs_key():
    model = tiny_dino(C, embed_dim=64, width=32)
    assert model.input_format == "BGR"
    assert _rebuild(model, input_format="RGB").input_format == "RGB"
    with pytest.raises(ValueError, match='input_format must be "RGB" or "BGR", got \'rgb\''):
        _rebuild(model, input_format="rgb")

    from detectron2.config import get_cfg

    from cqdino.config import add_cqdino_config

    cfg = get_cfg()
    add_cqdino_config(cfg)
    cfg.INPUT.FORMAT = "RGB"
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    d = cfg.MODEL.DINO
    d.ENC_LAYERS = d.DEC_LAYERS = 1
    d.HIDDEN_DIM, d.DIM_FEEDFORWARD, d.NUM_QUERIES = 64, 64, 10
    assert DINO(cfg).input_format == "RGB"
