"""OMERO batch jobs: read images from an OMERO server, run the model, write results back.

Modules, in data-flow order (omero-py is imported lazily, only through :mod:`.connection`):

``refs``        ``omero://host/image/ID`` and QuPath-project / OMERO.web URLs -> :class:`OmeroRef` (pure)
``connection``  the fence around omero-py/Ice: credentials, sessions, errors, secret-safe logging
``source``      an OMERO image as a :class:`~conic_qp.slides.SlideSource` (RawPixelsStore pyramid tiles)
``regions``     an image's OMERO ROIs (polygons, rectangles, ellipses, QuPath-exported) as regions
``results``     the sink: OMERO.table, GeoJSON attachment, key-value pairs, capped polygon ROIs
``jobs``        :func:`~conic_qp.omero.jobs.run_omero_image` (one image, end to end) and the batch loop

See docs/omero.md.
"""

from conic_qp.omero.refs import OmeroRef, is_omero_ref, parse_ref

__all__ = ["OmeroRef", "is_omero_ref", "parse_ref"]
