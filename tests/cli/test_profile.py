"""`tokenmill profile`: measure a tiny model's step times and write a timing profile."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tokenmill.cli.main import app
from tokenmill.engine import Engine, EngineConfig, SamplingParams, TimingModel
from tokenmill.engine.clock import VirtualClock


@pytest.fixture(scope="module")
def profiled(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("profile") / "p.json"
    args = [
        "profile",
        "--quick",
        "--repeats",
        "1",
        "--model",
        str(tiny_llama),
        "-o",
        str(out),
        "--device",
        "cpu",
    ]
    result = CliRunner().invoke(app, args)
    return result, out


def test_profile_writes_a_timing_model(profiled, tiny_llama):
    result, out = profiled
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in " ".join(result.output.split())
    model = TimingModel.from_json(out.read_text())
    assert model.fit["samples"] > 0
    assert 0 <= model.fit["median_relative_error"] <= model.fit["p90_relative_error"]
    coefficients = (
        "overhead_s",
        "per_token_s",
        "per_decode_s",
        "per_context_token_s",
        "per_attention_pair_s",
    )
    assert all(getattr(model, c) >= 0 for c in coefficients)
    assert model.overhead_s + model.per_token_s > 0, "a step cannot be free"
    assert (model.model, model.device, model.dtype) == (str(tiny_llama), "cpu", "float32")
    assert model.kv_cache_tokens and model.kv_cache_tokens > 0
    assert "measured_at" in json.loads(out.read_text())["fit"]


def test_profile_drives_a_simulated_engine(profiled, tiny_llama):
    """The written file is a timing_profile a simulated engine of the same model runs on."""
    _, out = profiled
    clock = VirtualClock()
    engine = Engine(
        EngineConfig(model=str(tiny_llama), runner="simulated", timing_profile=str(out), max_model_len=128),
        clock=clock,
    )
    assert engine.runner.timing == TimingModel.load(out)
    engine.add_request("r", [5, 6, 7], SamplingParams(max_tokens=3))
    while engine.has_unfinished_requests():
        engine.step()
    assert clock.now() == pytest.approx(engine.runner.busy_seconds) and clock.now() > 0


def test_profile_of_a_missing_model_fails_clearly(tmp_path):
    missing = tmp_path / "no-such-model"
    out = tmp_path / "p.json"
    result = CliRunner().invoke(app, ["profile", "--quick", "--model", str(missing), "-o", str(out)])
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "error" in text and "does not exist" in text and "no-such-model" in text
    assert not out.exists()


def test_profile_into_a_missing_folder_fails_before_profiling(tmp_path, monkeypatch):
    from tokenmill.engine import profiler

    def must_not_run(*args, **kwargs):
        raise AssertionError("profiled although the output folder does not exist")

    monkeypatch.setattr(profiler, "profile_engine", must_not_run)
    out = tmp_path / "missing" / "p.json"
    result = CliRunner().invoke(app, ["profile", "--quick", "-o", str(out)])
    assert result.exit_code == 2
    assert "does not exist" in " ".join(result.output.split())


@pytest.mark.parametrize("where", ["folder", "proc"])
def test_profile_into_a_folder_or_an_unwritable_place_fails_before_profiling(tmp_path, monkeypatch, where):
    from tokenmill.engine import profiler

    def must_not_run(*args, **kwargs):
        raise AssertionError("profiled although the output cannot be written")

    monkeypatch.setattr(profiler, "profile_engine", must_not_run)
    out = tmp_path if where == "folder" else Path("/proc/p.json")
    result = CliRunner().invoke(app, ["profile", "--quick", "-o", str(out)])
    said = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert ("is a folder" if where == "folder" else "cannot write in /proc") in said
