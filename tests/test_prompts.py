"""Named prompt sets: read from the cache, downloaded through the real code paths (the hub's offline cache, a
local HTTP server), and one line when neither works. No test touches the network."""

import http.server
import json
import threading
from functools import partial

import huggingface_hub.constants
import pytest

from plumbing import prompts
from plumbing.prompts import PromptSource
from plumbing.runtime import UsageError


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty prompt cache and an empty hub cache, offline."""
    monkeypatch.setenv("CHUNK_GRPO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return tmp_path


def test_a_cached_set_is_read_from_the_cache(cache):
    path = prompts.cache_file("hpdv2:train")
    path.parent.mkdir(parents=True)
    path.write_text("a cat on a mat\n\nan astronaut riding a horse\n")
    assert PromptSource("hpdv2:train").lines == ["a cat on a mat", "an astronaut riding a horse"]


def test_offline_and_uncached_ends_with_one_line_naming_the_file(cache):
    with pytest.raises(UsageError) as error:
        PromptSource("hpdv2:test")
    message = str(error.value)
    assert "\n" not in message and "ymhao/HPDv2" in message
    assert message.endswith(f"place its prompts, one per line, in {prompts.cache_file('hpdv2:test')}")


def test_hub_set_is_parsed_from_the_hub_cache_and_kept_once_each(cache):
    # The hub's own cache layout: what hf_hub_download returns offline once the file was downloaded.
    repo = cache / "hub" / "datasets--ymhao--HPDv2"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    records = [{"prompt": "a red fox ", "image_path": ["0.jpg", "1.jpg"]}, {"prompt": "a castle"}]
    records.append({"prompt": "a red fox", "image_path": ["2.jpg", "3.jpg"]})  # one record per compared pair
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "train.json").write_text(json.dumps(records))
    assert PromptSource("hpdv2:train").lines == ["a red fox", "a castle"]
    assert prompts.cache_file("hpdv2:train").read_text() == "a red fox\na castle\n"


def test_url_set_is_downloaded_once_then_read_from_the_cache(cache, monkeypatch):
    (cache / "train.txt").write_text("a hill in a sunset\nan owl\na hill in a sunset\n")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(cache)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/train.txt"
    monkeypatch.setitem(prompts.PROMPT_SETS, "pickapic:train", (url, None))
    try:
        assert PromptSource("pickapic:train").lines == ["a hill in a sunset", "an owl"]
    finally:
        server.shutdown()
        server.server_close()
    assert PromptSource("pickapic:train").lines == ["a hill in a sunset", "an owl"]  # the server is gone


def test_a_file_of_that_name_wins_and_unknown_names_list_the_sets(cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "hpdv2:test").write_text("my own prompt\n")
    assert PromptSource("hpdv2:test").lines == ["my own prompt"]
    with pytest.raises(UsageError, match="hpdv2:train, hpdv2:test, pickapic:train, pickapic:test"):
        PromptSource("hpdv3:train")
