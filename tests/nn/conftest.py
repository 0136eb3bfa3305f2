"""Shared tiny-model params, built once per session."""

import dataclasses

import pytest

from jaxquant.nn import TransformerConfig
from tests.nn.helpers import random_params

TINY = TransformerConfig.tiny()


@pytest.fixture(scope="session")
def tiny_params():
    return random_params(TINY)


@pytest.fixture(scope="session")
def untied_params():
    return random_params(dataclasses.replace(TINY, tie_embeddings=False))
