// What Bio-Formats (the reader QuPath uses by default for TIFF files that are not plain RGB) makes of an
// image file, reader set up as QuPath's BioFormatsImageServer sets it up (OME-XML metadata store,
// resolution levels kept together). Prints one JSON object on stdout; with a second argument, also
// writes the pixels of the coarsest resolution of the first series there, as openBytes returns them.
//
//   java -cp bioformats_package.jar BioFormatsProbe.java IMAGE [PIXELS_OUT]

import java.io.FileOutputStream;
import java.util.ArrayList;
import java.util.List;

import loci.common.DebugTools;
import loci.formats.FormatTools;
import loci.formats.ImageReader;
import loci.formats.MetadataTools;
import loci.formats.meta.IMetadata;
import ome.units.UNITS;
import ome.units.quantity.Length;

public class BioFormatsProbe {
    public static void main(String[] args) throws Exception {
        DebugTools.setRootLevel("ERROR");
        IMetadata meta = MetadataTools.createOMEXMLMetadata();
        ImageReader reader = new ImageReader();
        reader.setFlattenedResolutions(false);
        reader.setMetadataStore(meta);
        reader.setId(args[0]);
        StringBuilder out = new StringBuilder();
        out.append("{\"format\": \"").append(reader.getFormat()).append("\", \"series\": [");
        for (int series = 0; series < reader.getSeriesCount(); series++) {
            reader.setSeries(series);
            if (series > 0) out.append(", ");
            out.append("{\"resolutions\": [");
            for (int level = 0; level < reader.getResolutionCount(); level++) {
                reader.setResolution(level);
                if (level > 0) out.append(", ");
                out.append("[").append(reader.getSizeX()).append(", ").append(reader.getSizeY()).append("]");
            }
            reader.setResolution(0);
            out.append("], \"tile\": [").append(reader.getOptimalTileWidth()).append(", ")
               .append(reader.getOptimalTileHeight()).append("]")
               .append(", \"rgb\": ").append(reader.isRGB())
               .append(", \"size_c\": ").append(reader.getSizeC())
               .append(", \"indexed\": ").append(reader.isIndexed())
               .append(", \"interleaved\": ").append(reader.isInterleaved())
               .append(", \"pixel_type\": \"").append(FormatTools.getPixelTypeString(reader.getPixelType())).append("\"")
               .append(", \"physical_size_um\": [").append(micrometres(meta.getPixelsPhysicalSizeX(series)))
               .append(", ").append(micrometres(meta.getPixelsPhysicalSizeY(series))).append("]}");
        }
        out.append("]}");
        System.out.println(out);
        if (args.length > 1) {
            reader.setSeries(0);
            reader.setResolution(reader.getResolutionCount() - 1);
            try (FileOutputStream pixels = new FileOutputStream(args[1])) {
                pixels.write(reader.openBytes(0));
            }
        }
        reader.close();
    }

    private static String micrometres(Length length) {
        if (length == null) return "null";
        Number value = length.value(UNITS.MICROMETER);
        return value == null ? "null" : value.toString();
    }
}
