"""Write predicted masks (palette PNGs), optionally CAMs and colour overlays, for a split or a folder of images.

The paper's command; the same as ``construct-export`` (construct/commands/export.py).
"""

from construct.commands.export import cli

if __name__ == "__main__":
    cli()
