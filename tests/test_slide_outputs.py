"""The mask as QuPath opens it: the colour pyramid read by Bio-Formats (QuPath's default reader for it) and
by tifffile, beside the class indices, which every reader gets as integers."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tifffile
from support import BCSS

from construct.data.mask_tiff import MaskTiffWriter, colour_table, pyramid_sizes, write_colour_pyramid
from construct_lab.bioformats.probe import missing, probe

SIZE = (530, 700)  # (width, height): three levels, uneven edges


@pytest.fixture(scope="module")
def masks(tmp_path_factory):
    """(class indices, index TIFF, colour OME-TIFF) of a random 530 × 700 mask at 0.5 µm/px."""
    folder = tmp_path_factory.mktemp("masks")
    mask = np.random.default_rng(0).integers(0, 5, SIZE[::-1], dtype=np.uint8)
    MaskTiffWriter(folder / "slide_mask.tif", SIZE, 0.5, folder, BCSS).write([(0, mask)])
    write_colour_pyramid(folder / "slide_mask.tif", folder / "slide_mask_rgb.ome.tif", BCSS, 0.5, "slide")
    return mask, folder / "slide_mask.tif", folder / "slide_mask_rgb.ome.tif"


def test_colour_pyramid_is_an_ome_tiff_with_subifd_levels(masks):
    """The structure Bio-Formats reads a pyramid from: one OME image, reduced levels as SubIFDs, µm/px in OME-XML."""
    mask, _, colours = masks
    with tifffile.TiffFile(colours) as tif:
        assert tif.is_ome and len(tif.pages) == 1 and len(tif.series) == 1
        page = tif.pages[0]
        assert page.is_tiled and (page.tilewidth, page.tilelength) == (256, 256) and page.photometric == 2  # RGB
        assert len(page.subifds) == 2
        metadata = tif.ome_metadata
        assert 'PhysicalSizeX="0.5"' in metadata and 'PhysicalSizeXUnit="µm"' in metadata and 'Name="slide"' in metadata
        levels = tif.series[0].levels
        assert [(level.shape[1], level.shape[0]) for level in levels] == pyramid_sizes(*SIZE)
        for index, level in enumerate(levels):
            factor = 2**index
            np.testing.assert_array_equal(level.asarray(), colour_table(BCSS)[mask[::factor, ::factor]])
    assert colour_table(BCSS)[:5].tolist() == [list(rgb) for rgb in BCSS.palette]


def test_bioformats_reads_the_colour_mask_as_a_pyramid_and_the_index_mask_as_integers(masks):
    """Read through Bio-Formats itself (bioformats_package.jar, as QuPath does); `make test` fetches the jar."""
    reason = missing()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"Bio-Formats check cannot run in CI: {reason}")
        pytest.skip(reason)
    mask, indices, colours = masks
    result = probe(colours, pixels=True)
    assert result.format == "OME-TIFF" and len(result.series) == 1
    [series] = result.series
    assert [tuple(size) for size in series["resolutions"]] == pyramid_sizes(*SIZE)
    assert series["tile"] == [256, 256] and series["rgb"] and series["size_c"] == 3 and not series["indexed"]
    assert series["pixel_type"] == "uint8" and series["physical_size_um"] == pytest.approx([0.5, 0.5])
    np.testing.assert_array_equal(result.coarsest, colour_table(BCSS)[mask[::4, ::4]])  # the class colours

    # The index mask: one channel of the class indices (Bio-Formats ignores its palette and its reduced levels).
    result = probe(indices, pixels=True)
    [series] = result.series
    assert series["size_c"] == 1 and not series["rgb"] and series["pixel_type"] == "uint8"
    assert series["physical_size_um"] == pytest.approx([0.5, 0.5])
    np.testing.assert_array_equal(result.coarsest[..., 0], mask)
