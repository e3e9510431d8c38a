"""Train ConStruct: python main.py --config configs/bcss.yaml --gpu 0 (the paper's command).

The same as ``construct-train``, plus the lab's preparation of a config's ``testbed`` section
(synthetic tiles and tiny towers on first use), so the demo configs run from a fresh clone.
"""

from functools import partial

from construct.cli import run_cli
from construct.commands.train import build_parser, main
from construct_lab.prepare import prepare_inputs

if __name__ == "__main__":
    run_cli(partial(main, prepare=prepare_inputs), build_parser())
