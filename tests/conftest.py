"""Fixtures shared by every test: tiny random models built from configs, offline."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

from tests.tiny_models import ARCHITECTURES, build_tiny_model, build_tokenizer

# The models are tiny: one thread is faster, and does not spin-wait when other processes share the cores.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory):
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir):
    """One tiny random checkpoint per supported family, in fp32."""
    root = tmp_path_factory.mktemp("models")
    return {arch: build_tiny_model(root / arch, arch, tokenizer_dir) for arch in ARCHITECTURES}


@pytest.fixture(scope="session")
def tiny_llama(tiny_models):
    return tiny_models["llama"]


@pytest.fixture
def make_engine():
    """Engine factory on CPU; keyword arguments go to EngineConfig (model is a checkpoint folder)."""
    from tokenmill.engine import Engine, EngineConfig

    def make(model, **kwargs):
        kwargs.setdefault("device", "cpu")
        return Engine(EngineConfig(model=str(model), **kwargs))

    return make


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    """tokenmill's Tokenizer over the fixture's byte-level BPE."""
    from tokenmill.engine.tokenizer import Tokenizer

    return Tokenizer(tokenizer_dir)
