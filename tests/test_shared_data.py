"""Tests that need ../shared/data skip only locally: with CI=true a missing file fails them."""

from __future__ import annotations

import pytest

from conftest import require_shared_data


def test_missing_shared_data_fails_in_ci(tmp_path, monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        require_shared_data("market1501-train-dev.tar", root=tmp_path)


def test_missing_shared_data_skips_locally(tmp_path, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="market1501-train-dev.tar"):
        require_shared_data("market1501-train-dev.tar", root=tmp_path)
    (tmp_path / "market1501-train-dev.tar").write_bytes(b"")
    assert require_shared_data("market1501-train-dev.tar", root=tmp_path) == [tmp_path / "market1501-train-dev.tar"]
