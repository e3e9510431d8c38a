"""Evaluate a trained checkpoint on val/test: per-class IoU/Dice, mIoU, mDice, FwIoU, pixel accuracy (method.md §8).

The paper's command; the same as ``construct-evaluate`` (construct/commands/evaluate.py).
"""

from construct.commands.evaluate import cli

if __name__ == "__main__":
    cli()
