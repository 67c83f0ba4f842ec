"""``aiobatch batches ...`` and ``aiobatch files ...`` against the fake over HTTP (the
plugin's ``aiobatch_server``): tables and ``--json``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import Cli, create

from aiobatch import BatchClient
from aiobatch.cli import main
from aiobatch.testing import chat_requests

#: Batches stay in progress long enough to be listed open and cancelled.
SLOW = {"validation_seconds": 0.0, "lines_per_second": 0.001}


def table_rows(text: str) -> dict[str, list[str]]:
    """The rows of a printed table by their first column (the header skipped)."""
    return {line.split()[0]: line.split() for line in text.splitlines()[1:]}


@pytest.mark.aiobatch(**SLOW)
async def test_list_prints_a_table_and_filters(
    cli: Cli, aiobatch_server_client: BatchClient
) -> None:
    """``batches list`` prints id, status, progress, created, endpoint and metadata;
    ``--metadata`` and ``--status`` filter."""
    nightly = await create(aiobatch_server_client, 2, project="nightly")
    other = await create(aiobatch_server_client, 3, project="other")
    code, text, err = await cli("batches", "list")
    assert code == 0, err
    assert text.splitlines()[0].split() == [
        "ID", "STATUS", "PROGRESS", "CREATED", "ENDPOINT", "METADATA"
    ]  # fmt: skip
    rows = table_rows(text)
    assert set(rows) == {nightly.id, other.id}
    assert rows[nightly.id][1] == "in_progress"
    assert rows[nightly.id][2] == "0/2"
    assert "/v1/chat/completions" in rows[nightly.id]
    assert any("project=nightly" in cell for cell in rows[nightly.id])
    code, text, _ = await cli("batches", "list", "--metadata", "project=other")
    assert set(table_rows(text)) == {other.id}
    code, text, _ = await cli("batches", "list", "--status", "completed")
    assert table_rows(text) == {}


@pytest.mark.aiobatch(**SLOW)
async def test_list_and_show_json(cli: Cli, aiobatch_server_client: BatchClient) -> None:
    """``--json`` prints the batches as the API's objects."""
    batch = await create(aiobatch_server_client, 2, project="x")
    code, text, _ = await cli("batches", "list", "--json", "--status", "open")
    assert code == 0
    data = json.loads(text)
    assert [item["id"] for item in data] == [batch.id]
    assert data[0]["metadata"]["project"] == "x"
    code, text, _ = await cli("batches", "show", batch.id, "--json")
    assert json.loads(text)["input_file_id"] == batch.input_file_id
    code, text, _ = await cli("batches", "show", batch.id)
    assert code == 0 and batch.input_file_id in text and "in_progress" in text


@pytest.mark.aiobatch(**SLOW)
async def test_cancel_by_metadata_needs_yes(cli: Cli, aiobatch_server_client: BatchClient) -> None:
    """``batches cancel --metadata`` cancels only the matching open batches, and only
    with ``--yes`` when no terminal can confirm (exit 2, nothing cancelled)."""
    keep = await create(aiobatch_server_client, 2, project="keep")
    drop = [await create(aiobatch_server_client, 2, project="drop") for _ in range(2)]
    code, _, err = await cli("batches", "cancel", "--metadata", "project=drop")
    assert code == 2 and "--yes" in err
    assert (await aiobatch_server_client.retrieve_batch(drop[0].id)).status.value == ("in_progress")
    code, text, err = await cli("batches", "cancel", "--metadata", "project=drop", "--yes")
    assert code == 0, err
    assert set(table_rows(text)) == {b.id for b in drop}
    for batch in drop:
        status = (await aiobatch_server_client.retrieve_batch(batch.id)).status.value
        assert status in ("cancelling", "cancelled")
    assert (await aiobatch_server_client.retrieve_batch(keep.id)).status.value == "in_progress"


async def test_download_saves_the_output_file(
    cli: Cli, aiobatch_server_client: BatchClient, tmp_path: Path
) -> None:
    """``batches download`` saves a finished batch's output file."""
    batch = await create(aiobatch_server_client, 3)
    done = await aiobatch_server_client.wait(batch, poll_interval=0.01)
    code, text, err = await cli("batches", "download", done.id, "-d", str(tmp_path))
    assert code == 0, err
    saved = tmp_path / f"{done.id}.output.jsonl"
    ids = sorted(json.loads(line)["custom_id"] for line in saved.read_text().splitlines())
    assert ids == ["req-0", "req-1", "req-2"]
    assert str(saved) in text


async def test_show_of_an_unknown_batch_exits_4(cli: Cli) -> None:
    """A batch the provider does not know: exit 4 with its error."""
    code, _, err = await cli("batches", "show", "batch_nope")
    assert code == 4
    assert "batch_nope" in err


async def test_files_upload_list_delete(cli: Cli, tmp_path: Path) -> None:
    """``files upload`` then ``files list`` (table and JSON) then ``files delete``."""
    source = tmp_path / "in.jsonl"
    source.write_bytes(chat_requests(2))
    code, text, err = await cli("files", "upload", str(source), "--json")
    assert code == 0, err
    file_id = json.loads(text)["id"]
    code, text, _ = await cli("files", "list")
    assert text.splitlines()[0].split()[:3] == ["ID", "PURPOSE", "BYTES"]
    assert table_rows(text)[file_id][1] == "batch"
    code, text, _ = await cli("files", "list", "--json")
    assert [f["filename"] for f in json.loads(text) if f["id"] == file_id] == ["in.jsonl"]
    code, text, _ = await cli("files", "delete", file_id)
    assert code == 0 and f"{file_id}: deleted" in text
    code, text, _ = await cli("files", "list", "--json")
    assert file_id not in [f["id"] for f in json.loads(text)]


def test_a_missing_key_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without the provider's key variable: exit 2 naming it."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert main(["batches", "list"]) == 2
    assert "OPENAI_API_KEY" in capsys.readouterr().err
