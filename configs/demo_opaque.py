"""The demo on names that say nothing: ``demo.py`` on ``synthetic_vocab_opaque`` (the same
images, boxes and category tree as ``synthetic_vocab``, every category and tree node named by
a unique made-up token; generated on first use), with the category tree's words instead of the
names' (:func:`~configs.demo.name_words` ``on=False, tree=True``): each category's query is
the mean of learnable vectors of the tree nodes on its path, and every matched box also
predicts those nodes. This is the lever that applies unchanged to V3Det, whose 13,204 names
share few words but whose tree is deep; docs/evidence.md, section 6, measures it (and the
levers that did not help) against the same recipe without it and against DINO.

    python projects/train_net.py --config-file configs/demo_opaque.py
"""

from .demo import dataloader, lr_multiplier, model, name_words, optimizer, train

dataloader.train.dataset.names = "synthetic_vocab_opaque_train"
dataloader.test.dataset.names = "synthetic_vocab_opaque_val"
name_words(model, dataloader, False, tree=True)
train.output_dir = "./output/demo_opaque"
