"""The built-in synthetic datasets: each generator module holds one :class:`~.spec.SyntheticSpec`
(how one image is drawn); :mod:`.spec` and :mod:`.panoptic_files` write and register them."""
