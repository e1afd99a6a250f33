"""The embedded demo: a small CQ-DINO trained from scratch on the CPU on the synthetic vast
vocabulary (1,000 long-tailed categories in a category tree; ``common/data/synthetic.py``).

    make demo                     # generates the data if absent, trains, evaluates, plots
    python projects/train_net.py --config-file configs/demo.py [--num-gpus N]

Same method as ``v3det.py`` at demo width: R18 (quarter width), d=128, 1 + 3 transformer
layers, 50 queries, top-K 100 (GT categories forced into it in training), tree aggregation
over the dataset's tree, ASL with ancestor masking. What the demo sets differently from the
recipe, each measured at the demo budget (docs/evidence.md, "The demo recipe"):

* compositional category queries: each category's query is the mean of learnable vectors of
  the words of its name (``compositional_queries``; the offline stand-in for the authors' text
  embeddings, learnable), with the projected query added to the selector's tokens
  (``selector_query_skip``);
* the name-word loss (``model.word_head``, :class:`~cqdino.modeling.NameWordHead`, weight
  0.5): every matched query (decoder layers, DN groups, encoder proposals) also predicts the
  words of its GT's name, and at inference the words' log-posterior over the columns is added
  to the logits (``word_score_weight`` 1.0). Trained from scratch without it, the detector
  learns where objects are long before what colour or texture they have (docs/evidence.md,
  "Third round": AP 1.05 -> 8.1 / 8.4 with two seeds at this budget);
* lr 1.2e-3, classification loss weight 5 (with the word loss, two seeds: mean AP 8.24 against
  7.75 at weight 2, whose seeds differ more: 9.05 / 6.45), gradient clip 1.0, one LR drop at
  0.9 of the run, sampling offsets at lr x 0.1 (Deformable-DETR's setting);
* 50 object queries and one encoder layer (the synthetic images hold 1-8 objects, 4 on
  average): a step 1.33x faster, which buys 950 iterations in the time 680 took, and the
  detector learns more per second (docs/evidence.md, "Fourth round": AP 8.1 / 8.4 with 100
  queries, 2 encoder layers and 680 iterations -> 14.7 / 15.4, seeds 0 / 1, with 950);
* the selector scores a category as ``b_c + <W q_c, LN(x_c)> / sqrt(d) + max_n <W' q_c,
  LN(m_n)> / sqrt(d)`` (``selector_score_form="dense+bilinear"``: its own cross-attention
  output read through its query, plus the best image location), with ``b_c`` initialised at
  the logit of the category's fraction of training images (``selector_prior``): ARC@100
  15 % -> 68-69 % at this budget, two seeds (docs/evidence.md, section 5). Inference goes
  through the top-K, as the recipe's (no ``test_topk``); each lever applies unchanged to
  V3Det;
* 1,250 iterations (2.5 epochs; 950 before): through the top-100, `make demo` (seeds 0 / 1,
  a 2-vCPU Intel Xeon VM) AP 8.2 / 6.2 -> 14.5 / 12.8, ARC@100 65 / 59 -> 73 / 69 %; one
  process per run: 15.7 / 15.5. The extra iterations count before the LR drop: a drop at 0.75 of 950
  iterations scores 7.0, at 0.95 of 1,250 the same as at 0.9, and an EMA of the weights
  (decay 0.99) less (docs/evidence.md, section 5, "Iterations");
* NHWC convolutions and fused AdamW (speed only).

The levers that need the synthetic names (compositional queries, query skip, word head, word
loss and scores, class-agnostic evaluation) are switched together by :func:`name_words`; a
config derived from this one for other data turns them off in one line
(``name_words(model, dataloader, False)``; ``custom_coco_small.py`` does).
"""

from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec

from cqdino.data import category_tree_file
from cqdino.data.build import category_words
from cqdino.data.priors import category_image_fraction
from cqdino.modeling import NameWordHead

from .common.data.synthetic import dataloader
from .common.models.cqdino_r50 import model
from .common.optim_cqdino import AdamW as optimizer
from .common.train import lr_multiplier, train

EMBED = 128


def name_words(model, dataloader, on: bool = True, tree: bool = False) -> None:
    """The demo's word levers, switched together: the words of the category names (``on``)
    and the nodes of the category tree (``tree``). Name words are on in this demo and off in a
    config derived from it for a dataset whose category names share no words
    (``name_words(model, dataloader, False)``, as ``custom_coco_small.py`` does); tree words
    need only the dataset's category tree, so they apply to any name style (V3Det's names
    share few words, its tree is deep). Each lever needs from the dataset:

    * ``class_head.compositional_queries`` with ``class_head.category_names``: each
      category's words (:func:`~cqdino.data.build.category_words`): the words of its name
      (many shared across categories: "red dotted star") and/or one token per tree node above
      it; its query is the mean of learnable vectors of those words (the offline stand-in for
      text embeddings), so a rare category starts from what its words and ancestors learnt
      elsewhere; names that share no word and no tree gain nothing over a free query;
    * ``class_head.selector_query_skip``: nothing; it adds each category's projected query to
      the selector's tokens, which compositional queries need (shared word vectors made the
      tokens nearly parallel: docs/evidence.md, "The demo recipe");
    * ``model.word_head`` (:class:`~cqdino.modeling.NameWordHead`) and
      ``criterion.loss_word_weight`` 0.5: the same words; every matched query also predicts
      its GT's words (with the tree: the box is a positive for every ancestor), which teaches
      more than the class label only when a word is shared by many categories;
    * ``model.word_score_weight`` 1.0: the word head (its log-posterior over the columns is
      added to the logits at inference; with the tree, a coarse-to-fine score);
    * ``dataloader.evaluator.class_agnostic``: the V3Det-style evaluator (a dataset with
      ``evaluator_type="v3det"``); detectron2's ``COCOEvaluator`` has no class-agnostic AP.

    Both off: free category queries (``init_embeddings`` or random), no word head or word
    loss, no word scores, per-category AP only. Set in place, at load time: a config derived
    from this one calls it after importing ``model`` and ``dataloader``."""
    head = model.class_head
    words = on or tree
    if words:
        head.init_embeddings = None
        head.compositional_queries = True
        head.category_names = L(category_words)(
            dataset_name="${dataloader.train.dataset.names}",
            num_classes="${..num_categories}",
            names=on,
            tree=tree,
        )
        head.selector_query_skip = True
        model.word_head = L(NameWordHead)(
            category_names="${..class_head.category_names}", embed_dim="${..transformer.embed_dim}"
        )
    else:
        head.compositional_queries = False
        head.category_names = None
        head.selector_query_skip = False
        model.word_head = None
    model.criterion.loss_word_weight = 0.5 if words else 0.0
    model.word_score_weight = 1.0 if words else 0.0
    dataloader.evaluator.class_agnostic = words


# R18 at quarter width; the transformer reads res4, res5 and one extra level (strides 16-64)
model.backbone.depth = 18
model.backbone.width = 16
model.backbone.out_features = ["res4", "res5"]
model.neck.input_shapes = {
    "res4": L(ShapeSpec)(channels=64, stride=16),
    "res5": L(ShapeSpec)(channels=128, stride=32),
}
model.neck.in_features = ["res4", "res5"]
model.transformer.num_levels = 3
model.neck.out_channels = EMBED
model.neck.num_groups = 32
model.position_embedding.num_pos_feats = EMBED // 2
model.transformer.embed_dim = EMBED
for part, layers in (("encoder", 1), ("decoder", 3)):
    getattr(model.transformer, part).num_layers = layers
    getattr(model.transformer, part).embed_dim = EMBED
    getattr(model.transformer, part).ffn_dim = 512
    getattr(model.transformer, part).num_levels = 3
model.transformer.num_queries = 50
model.dn_number = 30
model.transformer.encoder.fusion_layers.fusion_dim = 128
model.transformer.decoder.category_attn.num_heads = 8

model.class_head.num_categories = 1000
model.class_head.topk = 100
model.class_head.query_dim = 128
model.class_head.selector_memory_dim = 128
model.class_head.selector_ffn_dim = 256
model.class_head.selector_num_layers = 1
model.class_head.force_gt = True  # training: GT categories always among the K (an option)
model.class_head.relation = "tree"
model.class_head.tree_file = L(category_tree_file)(dataset_name="${dataloader.train.dataset.names}")
name_words(model, dataloader, True)  # the name-word levers (name_words' docstring)
# the selector (docs/evidence.md, section 5): per-category bias from the training images'
# category frequencies and the bilinear + dense (max over locations) score forms; inference
# through the top-K, as the recipe (the dense box-level loss, dense_loss_weight, moved neither
# ARC nor AP over two seeds: off)
model.class_head.selector_score_form = "dense+bilinear"
model.class_head.selector_prior = L(category_image_fraction)(
    dataset_name="${dataloader.train.dataset.names}", num_classes="${..num_categories}"
)
model.backbone.channels_last = True
model.criterion.loss_class_weight = 5.0

optimizer.lr = 1.2e-3
optimizer.fused = True
optimizer.params.module_multipliers = {"sampling_offsets": (0.1, 1.0)}

# 2.5 epochs x 4,000 images / 8 per batch = 1,250 iterations, sized for the 10-minute CPU budget
# of `make demo` (data generation and two evaluations included) on a 2-vCPU AMD EPYC VM at
# 0.38-0.41 s per iteration with two processes; a 2-vCPU Intel Xeon VM's 0.446 s takes 10.6 min
# (docs/evidence.md, section 5, "Iterations"). lr x 0.1 at 0.9 of max_iter, warm-up 50
# iterations
train.epochs = 2.5
train.images_per_epoch = 4000
train.max_iter = 1250
train.seed = 0
lr_multiplier.warmup_iters = 50
lr_multiplier.milestones = (0.9,)
train.clip_grad.max_norm = 1.0
train.checkpointer = dict(period=400, max_to_keep=2)
train.eval_period = 0  # only after the last iteration (an evaluation costs ~40 s of the budget)
train.log_period = 20
train.output_dir = "./output/demo"
