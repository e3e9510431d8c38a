"""The user commands (console scripts ``construct-*``; ``main.py`` and ``visualization_utils/`` run them too).

Each module has ``build_parser()``, ``main(args)`` and ``cli()``. They sit on top of the library:
no other construct package imports from here.
"""
