"""The auxiliary name-word loss: word targets from the names, the loss against a float64
reference, and the meta-architecture's training step with the word head (keys, DDP policy)."""

import math

import pytest
import torch

from cqdino.modeling import HungarianMatcher, NameWordHead, SetCriterion
from tests.modeling.test_matcher_criterion import rand_boxes
from tests.modeling.test_meta_arch import _rebuild
from tests.modeling.utils import batch, tiny_dino

NAMES = ["red circle", "blue dotted circle with thin dark border", "red star"]


def test_word_targets_and_prior_bias_hand_computed():
    head = NameWordHead(NAMES, embed_dim=8)
    # words in order of first appearance; "with" is a stop word
    assert head.words == ["red", "circle", "blue", "dotted", "thin", "dark", "border", "star"]
    want = torch.tensor(
        [
            [1, 1, 0, 0, 0, 0, 0, 0],
            [0, 1, 1, 1, 1, 1, 1, 0],
            [1, 0, 0, 0, 0, 0, 0, 1],
        ],
        dtype=torch.float,
    )
    assert torch.equal(head.targets(torch.tensor([0, 1, 2])), want)
    assert torch.equal(head.targets(torch.tensor([2, 2])), want[[2, 2]])
    # bias = log-odds of the word's share of the names, clamped to <= 0.5: red and circle
    # (2 of 3) start at 0, the others (1 of 3) at log(1/2)
    expect = [0.0, 0.0] + [math.log(0.5)] * 6
    assert head.linear.bias.tolist() == pytest.approx(expect, abs=1e-6)
    assert head(torch.zeros(2, 5, 8)).shape == (2, 5, 8)
    with pytest.raises(ValueError, match="category names"):
        NameWordHead([], embed_dim=8)


def test_loss_word_against_a_float64_reference(rng_seed):
    """BCE of the matched queries' word logits against their GT's words, summed over words,
    divided by the number of GT boxes, times the weight; written out element by element."""
    gen = torch.Generator().manual_seed(rng_seed)
    Q, N, W = 7, 4, 5
    labels = torch.tensor([2, 0, 3])
    words = (torch.rand(4, W, generator=gen) > 0.5).float()
    t = [{"labels": labels, "boxes": rand_boxes(3, gen), "words": words[labels]}]
    logits = torch.randn(1, Q, N, generator=gen)
    boxes = rand_boxes(Q, gen)[None]
    pred_words = torch.randn(1, Q, W, generator=gen) * 3
    crit = SetCriterion(HungarianMatcher(), loss_word_weight=0.5)
    q, g = crit.matcher(logits, boxes, t)[0]
    out = {"pred_logits": logits, "pred_boxes": boxes, "pred_words": pred_words}
    losses = crit(out, t)
    ref = 0.0
    for qi, gi in zip(q.tolist(), g.tolist()):
        for w in range(W):
            p = 1 / (1 + math.exp(-pred_words[0, qi, w].double().item()))
            y = words[labels[gi], w].item()
            ref -= y * math.log(p) + (1 - y) * math.log(1 - p)
    assert losses["loss_word"].item() == pytest.approx(0.5 * ref / 3, rel=1e-5)
    # without word logits there is no word loss
    assert "loss_word" not in crit({"pred_logits": logits, "pred_boxes": boxes}, t)
    # a word loss of one's own sees the matched rows (query order) and their GT's words
    seen = []

    def own(lg, tg):
        seen.append((lg, tg))
        return lg.new_tensor(6.0)

    crit.use_word_loss(own)
    assert crit(out, t)["loss_word"].item() == pytest.approx(0.5 * 6.0 / 3)
    lg, tg = seen[0]
    assert torch.equal(lg, pred_words[0, q]) and torch.equal(tg, words[labels[g]])
    with pytest.raises(TypeError, match="callable"):
        crit.use_word_loss("bce")


def test_the_meta_architecture_trains_with_its_word_heads_loss():
    """A tree-softmax word head's own loss is the criterion's ``loss_word``."""
    head = NameWordHead(TREE_CATS, embed_dim=64, tree_softmax=True)
    model = tiny_dino(len(TREE_CATS), embed_dim=64, width=32, word_head=head)
    assert model.criterion.word_loss == head.loss
    plain = tiny_dino(3, embed_dim=64, width=32, word_head=NameWordHead(NAMES, 64))
    assert plain.criterion.word_loss == plain.word_head.loss


def _keys(num_layers, word):
    suffixes = [""] + [f"_{i}" for i in range(num_layers - 1)] + ["_enc", "_dn"]
    suffixes += [f"_dn_{i}" for i in range(num_layers - 1)]
    keys = {f"loss_{k}{s}" for k in ("class", "bbox", "giou") for s in suffixes}
    if word:  # every decoder layer, DN group and the encoder proposals
        keys |= {f"loss_word{s}" for s in suffixes}
    return keys


@pytest.mark.parametrize("gt_counts", [(3, 2), (3, 0), (0, 0)])
def test_training_step_with_word_head_keys_and_every_parameter_gets_a_gradient(gt_counts):
    torch.manual_seed(0)
    C = 3
    model = tiny_dino(C, embed_dim=64, width=32, word_head=NameWordHead(NAMES, 64))
    model.train()
    losses = model(batch([(64, 96, gt_counts[0]), (64, 64, gt_counts[1])], C))
    assert set(losses) == _keys(2, word=True)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    if sum(gt_counts):
        assert model.word_head.linear.weight.grad.abs().sum() > 0
        assert losses["loss_word"] > 0
    # inference is unchanged by the word head
    model.eval()
    with torch.no_grad():
        out = model(batch([(64, 96, 0)], C))
    fields = {"pred_boxes", "scores", "pred_classes", "pred_query"}
    assert set(out[0]["instances"].get_fields()) == fields


def test_column_log_probs_is_the_posterior_of_the_independent_word_model(rng_seed):
    """log_softmax over the columns of <l, y_c> equals the normalised joint likelihood
    prod_w p_w^y (1 - p_w)^(1 - y), p = sigmoid(l), written out in float64."""
    gen = torch.Generator().manual_seed(rng_seed)
    head = NameWordHead(NAMES, embed_dim=6)
    hidden = torch.randn(2, 4, 6, generator=gen)
    columns = torch.tensor([[2, 0], [1, 2]])
    got = head.column_log_probs(hidden, columns)
    got_all = head.column_log_probs(hidden)  # the columns are the C classes (DINO)
    logits = head(hidden).double()
    Y = head.word_targets.double()
    for b in range(2):
        for q in range(4):
            p = logits[b, q].sigmoid()
            joint = torch.stack(
                [(Y[c] * p.log() + (1 - Y[c]) * (1 - p).log()).sum() for c in range(3)]
            )
            post = joint - torch.logsumexp(joint, 0)
            assert got_all[b, q].double().tolist() == pytest.approx(post.tolist(), abs=1e-5)
            sub = joint[columns[b]]
            post_k = sub - torch.logsumexp(sub, 0)
            assert got[b, q].double().tolist() == pytest.approx(post_k.tolist(), abs=1e-5)


def test_word_score_weight_changes_the_scores_and_needs_a_word_head():
    torch.manual_seed(0)
    C = 3
    model = tiny_dino(C, embed_dim=64, width=32, word_head=NameWordHead(NAMES, 64)).eval()
    inputs = batch([(64, 96, 0)], C)
    with torch.no_grad():
        plain = model(inputs)[0]["instances"]
        model.word_score_weight = 1.0
        scored = model(inputs)[0]["instances"]
    assert len(plain) == len(scored)
    assert not torch.allclose(plain.scores, scored.scores)
    # the word term is a log-probability (<= 0): no score can grow
    assert scored.scores.max() <= plain.scores.max() + 1e-6
    with pytest.raises(ValueError, match="word_score_weight"):
        _rebuild(model, word_head=None, word_score_weight=0.5)
    # a string from a command-line override ("None" instead of null) is named, not used
    with pytest.raises(TypeError, match="model.word_head=null"):
        _rebuild(model, word_head="None")


def test_word_scores_are_a_posterior_over_each_query_s_classes():
    """With a class head that scores every column 0, the detections' scores are
    sigmoid(log p_c) = p_c / (1 + p_c) with p the word posterior of their query: over the C
    classes of one box, p_c = s / (1 - s) sums to 1 (all Q x C pairs are kept for C = 3)."""
    torch.manual_seed(0)
    C = 3
    model = tiny_dino(C, embed_dim=64, width=32, word_head=NameWordHead(NAMES, 64)).eval()
    for linear in [*model.class_head.decoder_layers, model.class_head.encoder_layer]:
        torch.nn.init.zeros_(linear.weight)
        torch.nn.init.zeros_(linear.bias)
    model.word_score_weight = 1.0
    with torch.no_grad():
        inst = model(batch([(64, 96, 0)], C))[0]["instances"]
    assert len(inst) == model.transformer.num_queries * C
    p = (inst.scores / (1 - inst.scores)).double()
    boxes = inst.pred_boxes.tensor
    _, box_id = torch.unique(boxes, dim=0, return_inverse=True)
    per_box = torch.zeros(int(box_id.max()) + 1, dtype=torch.float64).index_add_(0, box_id, p)
    counts = torch.bincount(box_id)
    full = counts == C  # boxes whose C pairs are all there (a shared box would count twice)
    assert full.sum() >= model.transformer.num_queries // 2
    assert per_box[full].tolist() == pytest.approx([1.0] * int(full.sum()), abs=1e-4)
    # not a constant: the words tell the classes of a query apart
    assert p.max() - p.min() > 1e-3


# ---------------------------------------------------------------- tree softmax (issue 30)
TREE_CATS = [
    ["red", "tree:f1", "tree:s1", "tree:a"],
    ["tree:f1", "tree:s1", "tree:b"],
    ["tree:f1", "tree:s2"],
    ["tree:f2", "tree:d"],
]
# softmax groups by hand: the top level {f1, f2}, children of f1 {s1, s2}, of s1 {a, b}, of f2 {d}
TREE_GROUPS = {"tree:f1": "top", "tree:f2": "top", "tree:s1": "f1", "tree:s2": "f1"}
TREE_GROUPS.update({"tree:a": "s1", "tree:b": "s1", "tree:d": "f2"})


def _tree_reference(words, logits, cat):
    """-log p(path) over the groups plus BCE of the name words, float64, by loops."""
    logits = logits.double()
    col = {w: i for i, w in enumerate(words)}
    loss = 0.0
    for w, i in col.items():
        y = 1.0 if w in TREE_CATS[cat] else 0.0
        if w in TREE_GROUPS:
            if y:
                members = [col[u] for u, g in TREE_GROUPS.items() if g == TREE_GROUPS[w]]
                loss += torch.logsumexp(logits[members], 0) - logits[i]
        else:
            p = torch.sigmoid(logits[i])
            loss -= y * torch.log(p) + (1 - y) * torch.log(1 - p)
    return loss


def test_tree_softmax_loss_and_scores_match_a_float64_reference():
    torch.manual_seed(0)
    head = NameWordHead(TREE_CATS, embed_dim=8, tree_softmax=True)
    assert head.words == ["red", "tree:f1", "tree:s1", "tree:a", "tree:b", "tree:s2"] + [
        "tree:f2",
        "tree:d",
    ]
    W = head.num_words
    # groups: top-level tokens share W, a child points at its parent's index, name words -1
    assert head.word_groups.tolist() == [-1, W, 1, 2, 2, 1, W, 6]
    logits = torch.randn(4, W) * 3
    classes = torch.tensor([0, 1, 2, 3])
    got = head.loss(logits, head.targets(classes))
    want = sum(_tree_reference(head.words, logits[i], c) for i, c in enumerate(classes.tolist()))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    # the column score: log p(path) of the tree tokens plus the name words' logits
    hidden = torch.randn(1, 2, 8)
    lp = head.column_log_probs(hidden)
    raw = head.linear(hidden).double()[0]
    for q in range(2):
        scores = []
        for cat in range(4):
            s = 0.0
            for w in TREE_CATS[cat]:
                i = head.words.index(w)
                if w in TREE_GROUPS:
                    members = [
                        head.words.index(u) for u, g in TREE_GROUPS.items() if g == TREE_GROUPS[w]
                    ]
                    s += raw[q, i] - torch.logsumexp(raw[q, members], 0)
                else:
                    s += raw[q, i]
            scores.append(s)
        want = torch.log_softmax(torch.stack(scores), 0)
        torch.testing.assert_close(lp[0, q].double(), want, rtol=1e-5, atol=1e-5)


def test_tree_softmax_needs_tree_tokens():
    with pytest.raises(ValueError, match="tree tokens"):
        NameWordHead(["red star", "blue star"], embed_dim=4, tree_softmax=True)
