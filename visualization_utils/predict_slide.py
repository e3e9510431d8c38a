"""Predict whole slides (any format OpenSlide reads) into pyramidal mask TIFFs, overview PNGs, region GeoJSONs,

The paper's command; the same as ``construct-predict-slides`` (construct/commands/predict_slides.py).
"""

from construct.commands.predict_slides import cli

if __name__ == "__main__":
    cli()
