"""`jaxvc CMD --help`: every flag explained, defaults shown once."""
import argparse
import importlib

from jaxvc.cli import COMMANDS, HelpFormatter


def test_every_command_flag_has_help_and_no_contradicting_default():
    """``jaxvc CMD --help`` explains every flag; a default is shown once (not "(default: None)" after a help that
    says what happens without the flag)."""
    for name, (module, _) in COMMANDS.items():
        parser = argparse.ArgumentParser(prog=f"jaxvc {name}", formatter_class=HelpFormatter)
        importlib.import_module(module).add_arguments(parser)
        assert [a.dest for a in parser._actions if not a.help] == [], name
        text = parser.format_help()
        assert "(default: None)" not in text and "(default: False)" not in text, name
    parser = argparse.ArgumentParser(formatter_class=HelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="sampling steps")
    parser.add_argument("--frames", type=int, default=None, help="frames (default: the model's)")
    text = " ".join(parser.format_help().split())
    assert "sampling steps (default: 30)" in text and "frames (default: the model's)" in text
