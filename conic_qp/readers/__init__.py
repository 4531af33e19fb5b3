"""Slide readers beyond tiffslide and Pillow, each a :class:`~conic_qp.slides.PyramidSource`.

* :mod:`conic_qp.readers.dicom`: DICOM whole-slide images through wsidicom (a folder with one
  file per level, or a single file), with a pydicom frame reader for single-instance files
  wsidicom refuses;
* :mod:`conic_qp.readers.openslide`: the formats tiffslide cannot read (MIRAX ``.mrxs``,
  Hamamatsu ``.vms``/``.vmu``, Sakura ``.svslide``, Leica/Ventana variants) through
  openslide-python with the openslide-bin library, as a fallback.

Both import their library lazily: the readers are optional extras (``dicom``, ``openslide``).
"""
