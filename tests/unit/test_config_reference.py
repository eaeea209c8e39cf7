"""docs/configuration.md is generated from the settings model and the CLI, and is current.

The page lists every field of ``Settings`` with the environment variables pydantic-settings
really reads for it, and every option of the commands that build settings.
"""

from __future__ import annotations

import re

import pytest
import typer.main
from pydantic_settings import EnvSettingsSource

from tools import config_reference
from vllm_batch.cli import app
from vllm_batch.config import Settings

PAGE = config_reference.PAGE


def rows() -> dict[str, str]:
    """The settings tables' rows, by setting name."""
    found = re.findall(
        r"^\| (`.*?<small>setting `([a-z_0-9]+)`</small>.*)$", PAGE.read_text(), re.M
    )
    return {name: row for row, name in found}


def test_committed_page_is_current() -> None:
    assert PAGE.read_text() == config_reference.render(), (
        "docs/configuration.md is stale: run python tools/config_reference.py"
    )


def test_every_setting_is_listed_with_a_description() -> None:
    listed = rows()
    assert sorted(listed) == sorted(Settings.model_fields)
    for name in Settings.model_fields:
        description = listed[name].rstrip(" |").rsplit("|", 1)[1].strip()
        assert len(description) > 10, name


def test_every_comment_documents_something() -> None:
    """A comment in the settings class is a field's description, a section title or its
    introduction: none is lost (a field's own comment would hide the lines above it)."""
    comments = config_reference.source_comments(Settings)
    assert comments.unused == []
    assert len(comments.headers) >= 10


@pytest.mark.parametrize("name", sorted(Settings.model_fields))
def test_listed_environment_variables_are_read(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each variable the page names for a field sets that field (and nothing else does)."""
    info = Settings.model_fields[name]
    envs = config_reference.env_names(name, info, "VLLM_BATCH_")
    assert f"`{envs[0]}`" in rows()[name]
    for env in envs:
        for other in envs:
            monkeypatch.delenv(other, raising=False)
        monkeypatch.setenv(env, "probe")
        read = EnvSettingsSource(Settings)()
        # pydantic-settings keys a value by the field's name, or by its first alias.
        assert "probe" in {read.get(key) for key in (name, *envs)}, (name, env, read)
        monkeypatch.delenv(env)


def test_every_flag_of_the_settings_commands_is_documented() -> None:
    group = typer.main.get_command(app)
    commands = set(group.commands)  # type: ignore[attr-defined]
    assert commands == {
        *config_reference.SETTINGS_COMMANDS,
        *config_reference.COMMANDS_WITHOUT_SETTINGS,
    }
    text = PAGE.read_text()
    flags = config_reference.flags()
    for name in config_reference.SETTINGS_COMMANDS:
        command = group.commands[name]  # type: ignore[attr-defined]
        visible = [p for p in command.params if p.opts and not p.hidden]
        assert len([f for f in flags if f.command == name]) == len(visible), name
    for flag in flags:
        assert flag.opts in text, flag
    by_opts = {(f.command, f.opts): f.settings for f in flags}
    # Spot checks of the probe against what the CLI's code does.
    assert by_opts[("serve", "`--model`")] == ("models",)
    assert by_opts[("serve", "`--api-key-file`")] == ("api_key",)
    assert by_opts[("worker", "`--ray-address`")] == ("ray_address",)
    assert by_opts[("run", "`--model`")] == ()
    assert by_opts[("run", "`--enable-metrics`")] == ("metrics_enabled",)
