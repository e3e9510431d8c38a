"""One figure per image: the image, its ground truth, the prediction and every prototype's similarity heatmap.

The paper's command; the same as ``construct-prototypes`` (construct/commands/prototypes.py).
"""

from construct.commands.prototypes import cli

if __name__ == "__main__":
    cli()
