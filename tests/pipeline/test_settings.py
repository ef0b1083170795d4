"""Every setting is described alike in the code, the two configuration files and the README."""

from __future__ import annotations

import configparser
import re

import luigi
from helpers import REPO

from pipeline import config

OURS = {"digifeeds", "s3", "alma", "zephir", "pickup", "metrics"}


def settings_of(name: str) -> dict[str, set[str]]:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(REPO / name)
    return {section: set(parser[section]) for section in parser.sections()}


def readme_rows() -> dict[str, set[str]]:
    """The README's settings tables: section to keys (a row may name several)."""
    rows: dict[str, set[str]] = {}
    for section, keys in re.findall(
        r"^\| (\w+) \| ([\w, ]+) \|", (REPO / "README.md").read_text(), re.M
    ):
        rows.setdefault(section, set()).update(k.strip() for k in keys.split(","))
    return rows


def test_every_setting_is_in_the_code_the_example_and_the_readme() -> None:
    code = {
        section: {name for name, _ in cls.get_params()}
        for section, cls in vars(config).items()
        if isinstance(cls, type) and issubclass(cls, luigi.Config) and section in OURS
    }
    example, sandbox, readme = (
        settings_of("luigi.cfg.example"),
        settings_of("luigi.cfg"),
        readme_rows(),
    )

    assert set(code) == OURS
    for section, keys in code.items():
        assert example[section] == keys, section  # the example lists every key
        assert readme[section] == keys, section
    for section, keys in sandbox.items():
        assert keys <= example[section], section
        assert keys <= readme[section], section
    for section in example.keys() - OURS:
        assert example[section] <= readme[section], section
