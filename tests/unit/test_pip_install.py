"""tools/pip_install.py hands pip's own settings to uv (pure logic; the real install is
``make install-test`` itself)."""

from __future__ import annotations

from tools.pip_install import parse_config_list, uv_arguments

LISTED = """\
:env:.cert='/etc/ssl/certs/ca-certificates.crt'
:env:.find-links='/opt/wheels'
global.cert='/etc/other.crt'
global.constraint='/etc/xdg/pip/constraints.txt'
global.extra-index-url='file:///opt/pypi/simple file:///opt/pypi-more/simple'
global.find-links='/srv/ignored'
install.no-compile='true'
"""


def test_pip_settings_become_uv_flags_with_pips_index_rule() -> None:
    settings = parse_config_list(LISTED)
    assert settings["find-links"] == ["/opt/wheels"]  # the environment wins over the file
    assert settings["cert"] == ["/etc/ssl/certs/ca-certificates.crt"]
    assert "no-compile" not in settings  # another section: not pip's global options
    assert uv_arguments(settings) == [
        "--index-strategy",
        "unsafe-best-match",
        "--extra-index-url",
        "file:///opt/pypi/simple",
        "--extra-index-url",
        "file:///opt/pypi-more/simple",
        "--find-links",
        "/opt/wheels",
        "--constraint",
        "/etc/xdg/pip/constraints.txt",
    ]


def test_no_pip_settings_leave_uv_on_its_defaults() -> None:
    assert uv_arguments(parse_config_list("")) == ["--index-strategy", "unsafe-best-match"]
    assert uv_arguments({"no-index": ["true"]})[-1] == "--no-index"
