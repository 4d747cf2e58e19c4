"""`serve`'s options are derived from the Settings fields: every field has its option, with the field's default."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

from tang_server.cli import parser, settings_from
from tang_server.settings import Settings

from .support import BIN


def test_every_setting_is_an_option_of_serve_with_its_help() -> None:
    shown = subprocess.run([str(BIN / "tang-server"), "serve", "--help"], capture_output=True, text=True, check=True)
    text = " ".join(shown.stdout.split())
    for setting in dataclasses.fields(Settings):
        flag = setting.metadata["argparse"].get("flag", "--" + setting.name.replace("_", "-"))
        assert f" {flag} " in text or f" {flag}, " in text, flag
        assert " ".join(setting.metadata["help"].split()) in text, setting.name


def test_the_command_lines_defaults_are_the_settings_defaults(tmp_path: Path) -> None:
    """`serve --keys-dir DIR` alone gives exactly Settings(keys_dir=DIR): no default restated elsewhere differs."""
    args = parser().parse_args(["serve", "--keys-dir", str(tmp_path)])
    assert settings_from(args) == Settings(keys_dir=tmp_path)


def test_repeatable_options_and_fleet(tmp_path: Path) -> None:
    args = parser().parse_args(["serve", "--keys-dir", str(tmp_path), "--trusted-proxy", "10.0.0.0/8",
                                "--trusted-proxy", "192.0.2.1", "--fleet", "--handoff-socket", "none"])  # fmt: skip
    settings = settings_from(args)
    assert settings.trusted_proxies == ("10.0.0.0/8", "192.0.2.1")
    assert settings.auto_keygen is False and settings.handoff_socket == ""
