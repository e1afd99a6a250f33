"""Small helpers with no detectron2 dependency: safe file output (``io``)."""
