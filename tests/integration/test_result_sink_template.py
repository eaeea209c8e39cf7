"""The ``template`` result handler, as round trips: a CSV template's file parsed back with the
csv module, and a Markdown one parsed back by its sections, match the batch's lines; output
replaces the file atomically, and templates stay in their sandbox."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
from jinja2.exceptions import SecurityError

from tests.integration.result_files import BatchFiles, make_batch
from vllm_batch.config import Settings
from vllm_batch.handlers.template import TemplateHandler, csv_record
from vllm_batch.storage import LocalStorage

CSV_TEMPLATE = """\
custom_id,status,answer,total_tokens
{% for r in results -%}
{{ [r.custom_id,
    "succeeded" if not r.error and r.response.status_code == 200 else "failed",
    r|answer,
    r.response.body.usage.total_tokens]|csv }}
{% endfor -%}
"""

MARKDOWN_TEMPLATE = """\
# Batch {{ batch_id }}

{{ batch.status }} on {{ batch.model }}: {{ results|length }} results, {{ metadata.project }}.
{% for r in results %}
## {{ r.custom_id }}

- status: {{ r.response.status_code if r.response else "never ran" }}
- usage: {{ r.response.body.usage|tojson }}
- error: {{ tojson(r.error) }}

````text
{{ r|answer }}
````
{% endfor %}"""


def render(tmp_path: Path, files: BatchFiles, source: str, name: str) -> Path:
    template = tmp_path / "templates" / name
    template.parent.mkdir(exist_ok=True)
    template.write_text(source, encoding="utf-8")
    handler = TemplateHandler(
        Settings(
            template_handler_template=template,
            template_handler_output=str(tmp_path / "out" / f"{{batch_id}}-{name}"),
        )
    )
    assert handler.name() == "template" and handler.enabled({})
    batch_id = files.stream.batch.id
    assert handler.handle(batch_id, files.stream, files.stream.batch.metadata) is True
    return tmp_path / "out" / f"{batch_id}-{name}"


def test_csv_round_trip(tmp_path: Path) -> None:
    files = make_batch(LocalStorage(tmp_path / "data"), "batch_csv", filler=3)
    path = render(tmp_path, files, CSV_TEMPLATE, "report.csv")

    with open(path, encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["custom_id", "status", "answer", "total_tokens"]
    assert rows[1:] == [
        [
            want.custom_id,
            want.status,
            want.answer or "",
            str(want.usage["total_tokens"]) if want.usage else "",
        ]
        for want in files.expected
    ]
    # Tricky values really went through quoting, byte for byte.
    text = path.read_bytes().decode("utf-8")
    assert '"Windows\r\nline endings\r\n"' in text
    assert '"req, ""quoted"", id"' in text


def test_markdown_round_trip(tmp_path: Path) -> None:
    files = make_batch(LocalStorage(tmp_path / "data"), "batch_md")
    path = render(tmp_path, files, MARKDOWN_TEMPLATE, "report.md")

    text = path.read_bytes().decode("utf-8")
    head, *sections = text.split("\n## ")
    count = len(files.expected)
    assert head == (
        f'# Batch batch_md\n\ncompleted on tiny-llama: {count} results, sinks, "tests".\n'
    )
    section = re.compile(
        r"(?P<id>[^\n]*)\n\n- status: (?P<status>[^\n]*)\n- usage: (?P<usage>[^\n]*)\n"
        r"- error: (?P<error>[^\n]*)\n\n````text\n(?P<answer>.*)\n````\n",
        re.DOTALL,
    )
    assert len(sections) == count
    for want, body in zip(files.expected, sections, strict=True):
        match = section.fullmatch(body)
        assert match, body
        assert match["id"] == want.custom_id
        assert match["status"] == (str(want.status_code) if want.status_code else "never ran")
        usage = want.usage
        assert match["usage"] == ("null" if usage is None else json.dumps(usage))
        assert (match["error"] == "null") == (want.status == "succeeded")
        assert match["answer"] == (want.answer or "")


def test_rerun_replaces_the_file_atomically_and_failures_keep_the_old_one(tmp_path: Path) -> None:
    files = make_batch(LocalStorage(tmp_path / "data"), "batch_at")
    path = render(tmp_path, files, CSV_TEMPLATE, "r.csv")
    first = path.read_bytes()
    path.chmod(0o640)
    path = render(tmp_path, files, CSV_TEMPLATE, "r.csv")  # same batch again: same file
    assert path.read_bytes() == first
    assert path.stat().st_mode & 0o777 == 0o640  # the file's mode survives the replace

    # A template that fails half-way (reaching for the storage behind ``results``): the
    # sandbox refuses, the old report stays whole, no temporary file is left behind.
    bad = CSV_TEMPLATE + "{{ results.storage.delete(batch.output_key) }}"
    with pytest.raises(SecurityError):
        render(tmp_path, files, bad, "r.csv")
    assert path.read_bytes() == first
    assert sorted(p.name for p in path.parent.iterdir()) == ["batch_at-r.csv"]
    assert files.stream.storage.exists(files.stream.batch.output_key)


def test_sandbox_blocks_python_internals(tmp_path: Path) -> None:
    files = make_batch(LocalStorage(tmp_path / "data"), "batch_sb")
    escape = "{{ batch.__class__.__init__.__globals__['os'].system('true') }}"
    with pytest.raises(SecurityError):
        render(tmp_path, files, escape, "x.txt")


def test_csv_helper_and_settings(tmp_path: Path) -> None:
    assert csv_record(["a", 'b "c"', "d,e", None, 3, "x\ny"]) == 'a,"b ""c""","d,e",,3,"x\ny"'
    assert csv_record("one, field") == '"one, field"'
    assert not TemplateHandler(Settings()).enabled({})
    assert not TemplateHandler(Settings(template_handler_template=tmp_path / "t.j2")).enabled({})
    handler = TemplateHandler(
        Settings(
            template_handler_template=tmp_path / "t.j2", template_handler_output="/x/{batch_id}"
        )
    )
    with pytest.raises(ValueError, match="unsafe batch id"):
        handler.output_path("../etc/passwd")
